"""eventlet for the scenarios: patch at the requested moment, and the :class:`Green` adapter.

``before`` patches on import of this module, which each eventlet scenario imports before anything
else; ``after`` is done by :func:`patch_after`, once the engine and registry exist. eventlet is
deprecated and says so on import; that warning is expected and ignored.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from _cli import args

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import eventlet

if args.patch == "before":
    eventlet.monkey_patch()

from _common import Green, make_engine  # noqa: E402
from greenlet import GreenletExit  # noqa: E402


def make_engine_and_patch_after(url: str) -> Any:
    """``--patch after`` patches once the registry exists, *then* the engine is made.

    eventlet cannot green the RLock of a pool created before it patched (it says so, and
    SQLAlchemy's pool then fails with "cannot notify on un-acquired lock" whatever the registry).
    """
    if args.patch == "after":
        eventlet.monkey_patch()
    return make_engine(url)


def patched() -> bool:
    return bool(eventlet.patcher.is_monkey_patched("thread"))


def _join_all(threads: list[eventlet.greenthread.GreenThread]) -> None:
    for gt in threads:
        # a killed greenthread re-raises its GreenletExit in wait()
        with contextlib.suppress(GreenletExit):
            gt.wait()


green = Green(
    name="eventlet",
    spawn=eventlet.spawn,
    sleep=eventlet.sleep,
    join_all=_join_all,
    kill=lambda gt: gt.kill(),
)
