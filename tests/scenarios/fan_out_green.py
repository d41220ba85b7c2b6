"""``fan_out(via="greenlets")`` in a gevent-patched interpreter; prints its facts as one JSON line.

Usage: ``python tests/scenarios/fan_out_green.py URL``. Patches first (as a gevent server does),
then runs the shared workload (``tests/fan_out_workload.py``) over 1,000 items with merge-back, and
again over 300 items with item 11 planted to fail, limit 2.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import gevent  # noqa: E402
from sqlalchemy import create_engine, select  # noqa: E402
from sqlalchemy.orm import sessionmaker  # noqa: E402
from tests.fan_out_workload import Selects, seed, stored, sync_work  # noqa: E402
from tests.models import Parent  # noqa: E402

import sessionscope  # noqa: E402


def main(url: str) -> dict[str, object]:
    kw: dict[str, object] = {"pool_size": 10, "max_overflow": 0}
    if url.startswith("sqlite"):
        kw = {"connect_args": {"timeout": 30}}
    engine = create_engine(url, **kw)
    facts: dict[str, object] = {"patched": monkey.is_module_patched("threading")}

    seed(engine, 1000)
    Session = sessionscope.scoped_session(sessionmaker(engine))
    items = list(Session.scalars(select(Parent).order_by(Parent.id)))
    inside = [0]
    most = [0]
    work = sync_work(Session)

    def counted(parent: Parent) -> object:
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            gevent.sleep(0)  # let the others in: the units overlap
            return work(parent)
        finally:
            inside[0] -= 1

    with Selects(engine) as selects:
        results = sessionscope.fan_out(counted, items, via="greenlets", limit=20, session=Session)
    facts["results"] = len(results)
    facts["selects"] = selects.count
    caller = Session()
    facts["merged_back"] = all(
        child in caller and child.parent is parent and parent.name.endswith("+")
        for (child, _), parent in zip(results, items, strict=True)
    )
    facts["others"] = sum(others for _, others in results)
    facts["ran_concurrently"] = most[0] > 1
    Session.remove()
    landed = stored(engine)
    facts["children"] = len(landed["children"])
    facts["each_once"] = set(landed["children"].values()) == {1}

    seed(engine, 300, fail_at=(10,))
    items = list(Session.scalars(select(Parent).order_by(Parent.id)))
    started: list[int] = []
    try:
        sessionscope.fan_out(
            sync_work(Session, started), items, via="greenlets", limit=2, session=Session
        )
    except ValueError as error:
        facts["failure"] = str(error)
    Session.remove()
    landed = stored(engine)
    facts["failed_item_landed"] = 11 in landed["children"] or 11 in landed["renamed"]
    failure = next(n for n in started if n < 0)
    facts["started_after_failure"] = len(started) - started.index(failure) - 1
    facts["started"] = len(started) - 1
    facts["landed_as_started"] = landed["children"] == {n: 1 for n in started if n > 0 and n != 11}
    time.sleep(0)
    facts["idle_in_transaction"] = landed["idle_in_transaction"]
    facts["checkedout"] = engine.pool.checkedout()
    engine.dispose()
    return facts


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
