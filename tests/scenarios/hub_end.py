"""Where a gevent greenlet's session is closed as the greenlet ends; facts as JSON.

    python hub_end.py --url URL

gevent (patched first) runs a greenlet's links in the hub, which must never block. Ten greenlets
commit and end holding their session with its objects (no transaction left: closing it only
detaches them); ten end inside their transaction, with a row added (flushed to PostgreSQL; on
SQLite, whose one write lock would serialise them, a query holds the connection instead): closing
rolls it back on the server. A ``persistent_to_detached`` listener of the sessions and a
``rollback`` listener of the engine record whether each close ran in the hub itself or in another
greenlet. The last line of stdout is the facts.
"""

from __future__ import annotations

import argparse
import os
import sys

_parser = argparse.ArgumentParser(description="where a gevent greenlet's end closes its session")
_parser.add_argument("--url", required=True, help="SQLAlchemy database URL")
args = _parser.parse_args()

from gevent import monkey  # noqa: E402

monkey.patch_all()
import gevent  # noqa: E402
import gevent.hub  # noqa: E402

# isort: split
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from _common import (  # noqa: E402
    GreenRow,
    capture_diagnostics,
    checked_out,
    is_postgresql,
    make_engine,
    registry_len,
    report,
    reset_table,
    rows_by_owner,
)
from sqlalchemy import event  # noqa: E402
from sqlalchemy.orm import Session as OrmSession  # noqa: E402
from sqlalchemy.orm import object_session, sessionmaker  # noqa: E402

import sessionscope  # noqa: E402

EACH = 10

capture_diagnostics()
reset_table(args.url)
engine = make_engine(args.url)
Session: Any = sessionscope.scoped_session(sessionmaker(engine))
kept: list[GreenRow] = []  # the committed greenlets' objects stay in their sessions' maps
where: dict[str, list[str]] = {"detached": [], "rolled_back": []}


def _where() -> str:
    return "hub" if isinstance(gevent.getcurrent(), gevent.hub.Hub) else "greenlet"


@event.listens_for(OrmSession, "persistent_to_detached")
def _detached(session: OrmSession, instance: Any) -> None:
    where["detached"].append(_where())


@event.listens_for(engine, "rollback")
def _rolled_back(connection: Any) -> None:
    where["rolled_back"].append(_where())


def committed(i: int) -> None:
    row = GreenRow(owner=f"c{i}", n=0)
    Session.add(row)
    Session.commit()
    Session.refresh(row)  # loaded again, then its transaction ends: the session holds none
    Session.commit()
    kept.append(row)


def in_transaction(i: int) -> None:
    Session.add(GreenRow(owner=f"t{i}", n=0))
    if is_postgresql(args.url):
        Session.flush()  # on the server, uncommitted; the greenlet ends here
    else:
        Session.connection().exec_driver_sql("select 1")  # a connection held; the end is here


greenlets = [gevent.spawn(committed, i) for i in range(EACH)]
greenlets += [gevent.spawn(in_transaction, i) for i in range(EACH)]
gevent.joinall(greenlets, raise_error=True)
gevent.sleep(0.1)  # the links, and the greenlets they spawn
facts: dict[str, Any] = {
    "detached_in": sorted(where["detached"]),
    "rolled_back_in": sorted(where["rolled_back"]),
    "rows": rows_by_owner(args.url),
    "pool_checkedout": checked_out(engine),
    "registry_len": registry_len(Session),
    "sessions_left_with_objects": sum(1 for row in kept if object_session(row) is not None),
}
engine.dispose()
report(facts)
