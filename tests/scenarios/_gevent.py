"""gevent for the scenarios: patch at the requested moment, and the :class:`Green` adapter.

``before`` patches on import of this module, which each gevent scenario imports before anything
else; ``after`` is done by :func:`patch_after`, once the engine and registry exist.
"""

from __future__ import annotations

from typing import Any

from _cli import args

if args.patch == "before":
    from gevent import monkey

    monkey.patch_all()

import gevent  # noqa: E402  (after patching, on purpose)
from _common import Green, make_engine  # noqa: E402


def make_engine_and_patch_after(url: str) -> Any:
    """The engine exists before ``--patch after`` patches, as in an app that patches late."""
    engine = make_engine(url)
    if args.patch == "after":
        from gevent import monkey

        monkey.patch_all()
    return engine


def patched() -> bool:
    from gevent import monkey

    return bool(monkey.is_module_patched("threading"))


def _kill(g: gevent.Greenlet) -> None:
    g.kill(block=True)


green = Green(
    name="gevent",
    spawn=gevent.spawn,
    sleep=gevent.sleep,
    join_all=lambda greenlets: gevent.joinall(greenlets, raise_error=False),
    kill=_kill,
)
