"""Reused greenlets serving many requests each (gevent or eventlet, patched); facts as JSON.

    python reused_green.py --framework {gevent,eventlet} --registry {sessionscope,sqlalchemy} \
        --boundary {yes,no} --url URL

The framework monkey-patches before anything imports threading, socket or SQLAlchemy. Four
long-lived greenlets each serve 75 requests in a loop (``tests/servers/worker_loop.py``): a third
of the requests flush a row and fail, and every request yields to the others between its add and
its commit. With ``--boundary yes`` each request runs inside ``with sessionscope.unit_of_work():``.

Once every request was served, the greenlets stay alive (parked) while the scenario measures what
they hold: connections checked out of the pool and, on PostgreSQL, this process's backends by state
(a request's transaction left open shows as ``idle in transaction``). Then they are released and
end. The last line of stdout is the facts.

eventlet: psycopg waits cooperatively only with its ``wait_select`` under eventlet (see
``guard_green.py``), selected before psycopg is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

_parser = argparse.ArgumentParser(description="reused greenlets serving many requests")
_parser.add_argument("--framework", choices=("gevent", "eventlet"), required=True)
_parser.add_argument("--registry", choices=("sessionscope", "sqlalchemy"), required=True)
_parser.add_argument("--boundary", choices=("yes", "no"), required=True)
_parser.add_argument("--url", required=True, help="SQLAlchemy database URL")
args = _parser.parse_args()

if args.framework == "gevent":
    from gevent import monkey

    monkey.patch_all()
    import gevent

    spawn, sleep = gevent.spawn, gevent.sleep
else:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eventlet announces its deprecation
        import eventlet
    if args.url.startswith("postgresql"):
        os.environ.setdefault("PSYCOPG_WAIT_FUNC", "wait_select")
    eventlet.monkey_patch()
    spawn, sleep = eventlet.spawn, eventlet.sleep

# isort: split
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from _common import (  # noqa: E402
    capture_diagnostics,
    checked_out,
    is_postgresql,
    make_engine,
    postgres_backends,
    psycopg_wait_function,
    report,
    versions,
)
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import scoped_session as sa_scoped_session  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402
from tests.models import Base  # noqa: E402
from tests.servers.worker_loop import Served, committed_rows, serve, verdict  # noqa: E402

import sessionscope  # noqa: E402

WORKERS = 4
PER_WORKER = 75

capture_diagnostics()
side = create_engine(args.url, poolclass=NullPool)
Base.metadata.drop_all(side)
Base.metadata.create_all(side)
engine = make_engine(args.url)
factory = sessionmaker(engine)
Session: Any = (
    sessionscope.scoped_session(factory)
    if args.registry == "sessionscope"
    else sa_scoped_session(factory)
)
served = Served()
released = False
greenlets_seen: set[int] = set()


def worker(w: int) -> None:
    from greenlet import getcurrent

    greenlets_seen.add(id(getcurrent()))
    ids = range(w * PER_WORKER, (w + 1) * PER_WORKER)
    serve(Session, ids, served, boundary=args.boundary == "yes", switch=lambda: sleep(0))
    while not released:  # parked, alive: whatever the greenlet still holds is measured now
        sleep(0.01)
    if args.registry == "sqlalchemy":
        Session.remove()


workers = [spawn(worker, w) for w in range(WORKERS)]
while len(served.ok) + len(served.failed) + len(served.errors) < WORKERS * PER_WORKER:
    sleep(0.01)
facts: dict[str, Any] = {
    "served": len(served.ok),
    "failed": len(served.failed),
    "greenlets": len(greenlets_seen),
    "checked_out_while_parked": checked_out(engine),
    "backends_while_parked": postgres_backends(args.url) if is_postgresql(args.url) else None,
}
released = True
for g in workers:
    g.wait() if args.framework == "eventlet" else g.join()
facts["verdict"] = verdict(served, committed_rows(side))
facts["checked_out_after"] = checked_out(engine)
facts["psycopg_wait"] = psycopg_wait_function()
facts["versions"] = versions(args.framework)
engine.dispose()
side.dispose()
report(facts)
