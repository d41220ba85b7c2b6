"""Every handle of a guarded session misused by another gevent greenlet; prints facts as JSON.

    python guard_handles_green.py --url URL

gevent monkey-patches before anything else is imported. For each handle of
``tests/guard_handle_cases.py`` a greenlet A (spawned by the main greenlet) takes its session from
``sessionscope.scoped_session``, does Core work through ``session.connection()`` and prepares the
handle; greenlet B, spawned by A (``gevent.spawn`` gives it a fresh context: B is not a borrower),
misuses it while A waits; A carries on, commits and closes. The facts that
``guard_handle_cases.misuse_and_carry_on`` observed for every handle, and how B was described, are
printed as the last line of stdout (one JSON object); ``tests/test_guard_handles.py`` asserts on
them with the same expectations as for threads and tasks.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

# isort: split
import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402
from sqlalchemy.pool import NullPool, QueuePool  # noqa: E402
from tests.guard_handle_cases import (  # noqa: E402
    HANDLES,
    Action,
    Facts,
    Handle,
    Outcome,
    attempt,
    misuse_and_carry_on,
    reset_tables,
    run_with,
)
from tests.models import Base  # noqa: E402
from tests.test_nested_scopes import savepoints_on_sqlite  # noqa: E402

import sessionscope  # noqa: E402
from sessionscope import current_unit, describe_unit  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--url", required=True, help="SQLAlchemy database URL")
args = parser.parse_args()

kw: dict[str, Any] = {}
if args.url.startswith("sqlite"):
    kw["connect_args"] = {"timeout": 30, "check_same_thread": False}
engine = create_engine(args.url, poolclass=QueuePool, pool_size=5, max_overflow=20, **kw)
savepoints_on_sqlite(engine)
Base.metadata.create_all(create_engine(args.url, poolclass=NullPool))
Session = sessionscope.scoped_session(sessionmaker(engine))


def misused_by_another_greenlet(handle: Handle) -> Facts:
    """Greenlet A's side of one misuse; B attempts it while A waits for B."""
    described: list[str] = []

    def b(action: Action) -> Outcome:
        described.append(describe_unit(current_unit()))
        return attempt(action)

    def intrude(action: Action) -> Outcome:
        greenlet_b = gevent.spawn(b, action)
        greenlet_b.join()
        outcome: Outcome = greenlet_b.value
        return outcome

    facts = run_with(intrude, misuse_and_carry_on(Session, engine, handle))
    facts["intruder"] = described[0]
    return facts


def main() -> None:
    found: dict[str, Any] = {}
    for handle in HANDLES:
        reset_tables(engine)
        a = gevent.spawn(misused_by_another_greenlet, handle)
        a.join()
        if a.exception is not None:
            exc = a.exception
            found[handle.name] = {
                "crashed": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            }
        else:
            found[handle.name] = a.value
        gevent.sleep(0.01)  # A's end-of-greenlet cleanup runs in the hub
    report = {
        "patched": bool(monkey.is_module_patched("threading")),
        "facts": found,
        "registry_len": len(Session.registry),  # type: ignore[arg-type]
        "pool_checkedout": engine.pool.checkedout(),  # type: ignore[attr-defined]
    }
    engine.dispose()
    sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
    sys.stdout.flush()


main()
