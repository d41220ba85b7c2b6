"""``sessionscope.fan_out``: each item in a unit and session of its own, ORM objects shipped.

Real threads and asyncio tasks here, on an SQLite file and on PostgreSQL (psycopg, asyncpg); gevent
greenlets in a monkey-patched interpreter (``tests/scenarios/fan_out_green.py``); Celery workers in
``tests/test_celery.py``. The workload (``tests/fan_out_workload.py``): each item is a ``Parent``
the caller loaded; its unit adds a ``Child``, renames the parent and commits, or fails after
flushing. The tests check the DATA:

- every item's child exactly once, every parent renamed once, results in the order of the items;
- items arrive in the unit's own session and results in the caller's, without a SELECT, and the
  caller's copies take what the units committed (merge-back);
- no unit holds another item's objects;
- a failing item's flushed child never lands, items that had not started never run, the failure
  is raised;
- no connection checked out and no ``idle in transaction`` backend afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, exc, select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.orm import sessionmaker

import sessionscope
from tests.conftest import ASYNC_PG_URL, PG_URL, sqlite_file_url
from tests.fan_out_workload import Selects, async_work, seed, stored, sync_work
from tests.models import Child, Parent

pytestmark = pytest.mark.timeout(180)
SCENARIO = Path(__file__).parent / "scenarios" / "fan_out_green.py"


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        eng = create_engine(
            sqlite_file_url(tmp_path), connect_args={"timeout": 30, "check_same_thread": False}
        )
    else:
        schema = request.getfixturevalue("pg_schema")
        name = f"ss-fan-out-{uuid.uuid4().hex[:8]}"
        eng = create_engine(
            f"{PG_URL}?options=-csearch_path%3D{schema}&application_name={name}",
            pool_size=8,
            max_overflow=0,
        )
    yield eng
    eng.dispose()


def items_of(registry: Any) -> list[Parent]:
    return list(registry.scalars(select(Parent).order_by(Parent.id)))


def check_merged_back(registry: Any, items: list[Parent], results: list[Any]) -> None:
    caller = registry()
    assert [child.parent_id for child, _ in results] == [p.id for p in items]
    pairs = zip(results, items, strict=True)
    assert all(child in caller and child.parent is parent for (child, _), parent in pairs)
    assert all(parent.name.endswith("+") for parent in items)  # the caller's copies took it
    assert [others for _, others in results] == [0] * len(items)


@pytest.mark.parametrize("count", [200])
def test_threads_ship_items_in_and_results_back_exactly_once(engine: Engine, count: int) -> None:
    seed(engine, count)
    Session = sessionscope.scoped_session(sessionmaker(engine))
    items = items_of(Session)
    with Selects(engine) as selects:
        results = sessionscope.fan_out(sync_work(Session), items, session=Session, limit=4)
    assert selects.count == 0  # no item re-loaded in its unit, no result re-loaded in the caller
    check_merged_back(Session, items, results)
    Session.remove()
    facts = stored(engine)
    assert facts["children"] == {n: 1 for n in range(1, count + 1)}
    assert facts["renamed"] == set(range(1, count + 1))
    assert facts["idle_in_transaction"] == 0
    assert engine.pool.checkedout() == 0


def test_threads_over_a_thousand_items_on_postgresql(pg_schema: str) -> None:
    name = f"ss-fan-out-{uuid.uuid4().hex[:8]}"
    eng = create_engine(
        f"{PG_URL}?options=-csearch_path%3D{pg_schema}&application_name={name}", pool_size=10
    )
    try:
        seed(eng, 1000)
        Session = sessionscope.scoped_session(sessionmaker(eng))
        items = items_of(Session)
        results = sessionscope.fan_out(sync_work(Session), items, session=Session, limit=8)
        check_merged_back(Session, items, results)
        Session.remove()
        facts = stored(eng)
        assert facts["children"] == {n: 1 for n in range(1, 1001)}
        assert facts["idle_in_transaction"] == 0
        assert eng.pool.checkedout() == 0
    finally:
        eng.dispose()


def test_a_failing_item_stops_the_rest_and_leaves_no_rows(engine: Engine) -> None:
    """No item starts once item 21 has failed; how many ran before it failed depends on the
    database: on SQLite, item 21's flush busy-waits for the one write lock, and the thread
    beside it, committing item after item, can overtake it many times (CI once saw 48)."""
    seed(engine, 300, fail_at=(20,))
    Session = sessionscope.scoped_session(sessionmaker(engine))
    items = items_of(Session)
    started: list[int] = []
    with pytest.raises(ValueError, match="item 21 failed after flushing"):
        sessionscope.fan_out(sync_work(Session, started), items, session=Session, limit=2)
    Session.remove()
    facts = stored(engine)
    failure = next(n for n in started if n < 0)
    before, after = started[: started.index(failure)], started[started.index(failure) + 1 :]
    assert len(before) == -failure and 21 in before  # (the record is right)
    # the thread beside it may start one item between the failure and its report to fan_out
    assert len(after) <= 1
    if engine.dialect.name == "postgresql":  # no writer to overtake: most items never ran
        assert len(started) < 300 - 2
    # every item that started and did not fail landed, exactly once; item 21's flushed row did not
    assert facts["children"] == {n: 1 for n in before + after if n != 21}
    assert set(facts["children"]) == facts["renamed"]
    assert facts["idle_in_transaction"] == 0
    assert engine.pool.checkedout() == 0


def test_an_interrupted_fan_out_starts_nothing_more_and_waits_for_the_running_items(
    engine: Engine,
) -> None:
    """Ctrl-C while the caller waits: items not started never run, those running end (their
    uncommitted rows rolled back, their connections returned) before KeyboardInterrupt leaves."""
    seed(engine, 100)
    Session = sessionscope.scoped_session(sessionmaker(engine))
    started: list[tuple[int, float]] = []
    ended: list[int] = []
    interrupted_at: list[float] = []
    interrupted = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:  # Python's own handler, noting when it ran
        interrupted_at.append(time.monotonic())
        interrupted.set()
        raise KeyboardInterrupt

    def work(parent_id: int) -> int:
        started.append((parent_id, time.monotonic()))
        if parent_id == 5:
            # Ctrl-C as the kernel may deliver it: to a thread other than the waiting caller
            # (here this item's own), which Python's handler must still reach in the caller.
            # Before this item writes: SQLite has one writer at a time, and a loaded machine
            # once kept this item waiting for the lock until the other threads had taken every
            # item
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            assert interrupted.wait(30)  # still running as the caller is interrupted
        Session().add(Child(name=f"flushed-{parent_id}", parent_id=parent_id))
        Session().flush()
        time.sleep(0.02)
        ended.append(parent_id)
        return parent_id

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with pytest.raises(KeyboardInterrupt):
            sessionscope.fan_out(work, range(1, 101), session=Session, limit=4)
    finally:
        signal.signal(signal.SIGINT, previous)
    # every item that started had ended when KeyboardInterrupt left fan_out
    assert sorted(n for n, _ in started) == sorted(ended)
    # once the caller was interrupted, nothing more started: at most the three other threads,
    # between the handler and fan_out's stop, each took the item it had reached (a signal can
    # take a while to reach the waiting caller on a loaded machine: the count before varies)
    assert len([n for n, at in started if at > interrupted_at[0]]) <= 3
    assert len(started) < 100
    assert stored(engine)["children"] == {}  # nothing was committed: all of it rolled back
    assert engine.pool.checkedout() == 0


def test_ctrl_c_while_the_threads_start_waits_for_every_item_a_thread_took(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C can reach the caller inside a ``Thread.start()`` whose thread already took an item
    (the start waits for its thread to run, and a loaded machine runs it at once). fan_out waits
    for that item too, and the threads it never started take nothing. (Before, such a thread
    counted as not started: fan_out could leave with its item still writing, as a CI run on
    Python 3.13 showed.)"""
    seed(engine, 20)
    Session = sessionscope.scoped_session(sessionmaker(engine))
    started: list[int] = []
    ended: list[int] = []
    second_took_one = threading.Event()

    def work(parent_id: int) -> int:
        started.append(parent_id)
        if len(started) == 2:
            second_took_one.set()
        Session().add(Child(name=f"flushed-{parent_id}", parent_id=parent_id))
        Session().flush()
        time.sleep(0.05 if parent_id == 1 else 0.5)  # the first thread's item ends long before
        ended.append(parent_id)
        return parent_id

    real_start = threading.Thread.start
    starts: list[str] = []

    def start(thread: threading.Thread) -> None:
        real_start(thread)
        starts.append(thread.name)
        if len(starts) == 2 and thread.name.startswith("sessionscope.fan_out_"):
            assert second_took_one.wait(30)
            raise KeyboardInterrupt  # Ctrl-C as this start() returns: its thread runs an item

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        sessionscope.fan_out(work, range(1, 21), session=Session, limit=4)
    monkeypatch.undo()
    assert len(starts) == 2  # the other two threads were never started
    assert sorted(started) == sorted(ended)  # the second thread's item was waited for
    assert {1, 2} <= set(started)
    assert stored(engine)["children"] == {}
    assert engine.pool.checkedout() == 0


def test_what_an_item_did_not_commit_is_rolled_back(engine: Engine) -> None:
    seed(engine, 20)
    Session = sessionscope.scoped_session(sessionmaker(engine))

    def flush_only(parent_id: int) -> int:
        session = Session()
        session.add(Child(name="uncommitted", parent_id=parent_id))
        session.flush()
        return parent_id

    assert sessionscope.fan_out(flush_only, range(1, 21), session=Session) == list(range(1, 21))
    assert stored(engine)["children"] == {}
    assert engine.pool.checkedout() == 0


def test_an_uncommitted_orm_result_is_refused(engine: Engine) -> None:
    seed(engine, 3)
    Session = sessionscope.scoped_session(sessionmaker(engine))

    def flush_only(parent_id: int) -> Child:
        child = Child(name="uncommitted", parent_id=parent_id)
        Session.add(child)
        Session.flush()
        return child

    with pytest.raises(
        sessionscope.NotShippableError, match="flushed in its unit but not committed"
    ):
        sessionscope.fan_out(flush_only, [1, 2, 3], session=Session)
    assert stored(engine)["children"] == {}


def test_plain_items_need_no_session_and_results_come_back_in_order() -> None:
    threads: set[int] = set()
    lock = threading.Lock()

    def square(n: int) -> int:
        with lock:
            threads.add(threading.get_ident())
        time.sleep(0.001)  # let the pool's threads overlap
        return n * n

    assert sessionscope.fan_out(square, range(50), limit=3) == [n * n for n in range(50)]
    assert 1 < len(threads) <= 3 and threading.get_ident() not in threads


def test_each_item_gets_a_fresh_implicit_session_even_on_a_reused_pool_thread(
    engine: Engine,
) -> None:
    """Three pool threads, 60 items: no item finds another's session, pending rows, transaction."""
    seed(engine, 1)
    Session = sessionscope.scoped_session(sessionmaker(engine))
    found: list[tuple[int, int, bool]] = []

    def look(n: int) -> int:
        session = Session()
        found.append((id(session), len(session.new), session.in_transaction()))
        session.add(Child(name=f"pending-{n}", parent_id=1))
        return n

    sessionscope.fan_out(look, range(60), session=Session, limit=3)
    assert all(pending == 0 and not in_tx for _, pending, in_tx in found)
    assert stored(engine)["children"] == {}


def test_the_callers_objects_used_directly_by_an_item_are_refused(engine: Engine) -> None:
    """Closing over the caller's object instead of passing it is what the guard catches."""
    seed(engine, 1)
    Session = sessionscope.scoped_session(sessionmaker(engine))
    parent = Session.get(Parent, 1)
    assert parent is not None

    def rename(_: int) -> None:
        parent.name = "renamed by another unit"

    with pytest.raises(sessionscope.CrossUnitError):
        sessionscope.fan_out(rename, [0], session=Session)
    Session.remove()


def test_orm_items_without_a_session_are_refused_before_anything_runs(engine: Engine) -> None:
    seed(engine, 2)
    Session = sessionscope.scoped_session(sessionmaker(engine))
    ran: list[Any] = []
    with pytest.raises(exc.ArgumentError, match="session=") as refused:
        sessionscope.fan_out(ran.append, items_of(Session))
    assert "items[0]" in str(refused.value) and ran == []
    Session.remove()


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"fn": 3}, TypeError, "`fn`"),
        ({"via": "processes"}, exc.ArgumentError, "`via`"),
        ({"via": object()}, exc.ArgumentError, "Celery task"),
        ({"limit": 0}, TypeError, "`limit`"),
        ({"limit": 2.5}, TypeError, "`limit`"),
        ({"items": "abc"}, TypeError, "`items`"),
        ({"items": 12}, TypeError, "`items`"),
        ({"session": sessionmaker()}, exc.ArgumentError, "`session`"),
        ({"session": sa_scoped_session(sessionmaker())}, exc.ArgumentError, "`session`"),
        (
            {"via": "tasks", "session": sessionscope.scoped_session(sessionmaker())},
            exc.ArgumentError,
            "async_scoped_session",
        ),
    ],
)
def test_bad_arguments_are_refused_clearly(kwargs: dict[str, Any], error: type, words: str) -> None:
    call: dict[str, Any] = {"fn": abs, "items": [1, 2], **kwargs}
    fn, items = call.pop("fn"), call.pop("items")
    with pytest.raises(error, match=words):
        sessionscope.fan_out(fn, items, **call)


# -- asyncio tasks ----------------------------------------------------------------------------


@pytest.fixture(params=["aiosqlite", "asyncpg"])
def async_engines(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[AsyncEngine, Engine]]:
    """An AsyncEngine and a sync engine on the same database (seeding, facts)."""
    if request.param == "aiosqlite":
        path = tmp_path / "fan-out.db"
        aeng = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 30})
        eng = create_engine(f"sqlite:///{path}")
    else:
        schema = request.getfixturevalue("pg_schema")
        name = f"ss-fan-out-{uuid.uuid4().hex[:8]}"
        aeng = create_async_engine(
            ASYNC_PG_URL,
            connect_args={"server_settings": {"search_path": schema, "application_name": name}},
        )
        eng = create_engine(f"{PG_URL}?options=-csearch_path%3D{schema}&application_name={name}")
    yield aeng, eng
    eng.dispose()


async def async_items(registry: Any) -> list[Parent]:
    return list(await registry.scalars(select(Parent).order_by(Parent.id)))


def test_tasks_ship_items_in_and_results_back_exactly_once(
    async_engines: tuple[AsyncEngine, Engine],
) -> None:
    aeng, eng = async_engines
    seed(eng, 1000)

    async def main() -> list[Any]:
        ASession = sessionscope.async_scoped_session(async_sessionmaker(aeng))
        items = await async_items(ASession)
        with Selects(aeng.sync_engine) as selects:
            results = await sessionscope.fan_out(
                async_work(ASession), items, via="tasks", limit=10, session=ASession
            )
        assert selects.count == 0
        check_merged_back(ASession, items, results)
        await ASession.remove()
        await aeng.dispose()
        return results

    assert len(asyncio.run(main())) == 1000
    facts = stored(eng)
    assert facts["children"] == {n: 1 for n in range(1, 1001)}
    assert facts["idle_in_transaction"] == 0


def test_a_failing_task_stops_the_rest(async_engines: tuple[AsyncEngine, Engine]) -> None:
    """No item starts once one has failed (the failure is seen as it is raised, not after its
    unit's rollback); the item running beside it finishes. How many ran before the failure
    depends on the database: SQLite's busy-waiting writer can be overtaken by many others."""
    aeng, eng = async_engines
    seed(eng, 200, fail_at=(5,))
    started: list[int] = []

    async def main() -> None:
        ASession = sessionscope.async_scoped_session(async_sessionmaker(aeng))
        items = await async_items(ASession)
        with pytest.raises(ValueError, match="item 6 failed"):
            await sessionscope.fan_out(
                async_work(ASession, started=started), items, via="tasks", limit=2, session=ASession
            )
        assert aeng.sync_engine.pool.checkedout() == 1  # the caller's own session only
        await ASession.remove()
        assert aeng.sync_engine.pool.checkedout() == 0
        await aeng.dispose()

    asyncio.run(main())
    facts = stored(eng)
    failure = next(n for n in started if n < 0)
    before, after = started[: started.index(failure)], started[started.index(failure) + 1 :]
    assert len(before) == -failure and 6 in before  # (the record is right)
    assert after == []  # nothing started once item 6 had failed
    if eng.dialect.name == "postgresql":  # no writer to overtake: most items never ran
        assert len(before) < 200 - 2
    # every item that started and did not fail landed, exactly once; item 6's flushed row did not
    assert facts["children"] == {n: 1 for n in before if n != 6}
    assert set(facts["children"]) == facts["renamed"]
    assert facts["idle_in_transaction"] == 0


def test_cancelling_the_fan_out_cancels_every_item_and_rolls_them_back(
    async_engines: tuple[AsyncEngine, Engine],
) -> None:
    """Even items wait on an event that never fires (after flushing, but on SQLite before: one
    writer at a time); once odd items have committed, the caller is cancelled."""
    aeng, eng = async_engines
    seed(eng, 40)

    async def main() -> None:
        ASession = sessionscope.async_scoped_session(async_sessionmaker(aeng))
        items = await async_items(ASession)
        hold = asyncio.Event()
        committed: list[int] = []
        fanning = asyncio.ensure_future(
            sessionscope.fan_out(
                async_work(ASession, hold, committed), items, via="tasks", limit=8, session=ASession
            )
        )
        for _ in range(600):  # until odd items have committed and even ones are waiting
            if len(committed) >= 3:
                break
            await asyncio.sleep(0.05)
        assert len(committed) >= 3
        fanning.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fanning
        await ASession.remove()
        assert aeng.sync_engine.pool.checkedout() == 0
        await aeng.dispose()

    asyncio.run(main())
    facts = stored(eng)
    assert facts["children"] and all(parent % 2 == 1 for parent in facts["children"])
    assert facts["idle_in_transaction"] == 0


def test_tasks_with_plain_items_and_a_sync_function() -> None:
    async def main() -> list[int]:
        return await sessionscope.fan_out(lambda n: n + 1, range(5), via="tasks")

    assert asyncio.run(main()) == [1, 2, 3, 4, 5]


# -- gevent greenlets, monkey-patched -----------------------------------------------------------


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_greenlets_under_gevent(db: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if db == "sqlite":
        url = sqlite_file_url(tmp_path)
    else:
        schema = request.getfixturevalue("pg_schema")
        name = f"ss-fan-out-{uuid.uuid4().hex[:8]}"
        url = f"{PG_URL}?options=-csearch_path%3D{schema}&application_name={name}"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCENARIO), url],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["patched"] is True
    assert facts["results"] == 1000 and facts["selects"] == 0
    assert facts["merged_back"] and facts["others"] == 0
    assert facts["children"] == 1000 and facts["each_once"]
    assert facts["failure"] == "item 11 failed after flushing"
    assert not facts["failed_item_landed"] and facts["landed_as_started"]
    assert facts["started_after_failure"] <= 1 and facts["started"] < 300 - 2
    assert facts["ran_concurrently"]
    assert facts["idle_in_transaction"] == 0 and facts["checkedout"] == 0
