"""Units of work: pool jobs belong to the unit that waits for them; boundaries; recovery."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import gc
import threading
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

import sessionscope
from tests.models import Row as Item


def count_items(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Item)).scalar_one())


def test_a_to_thread_job_uses_the_waiting_tasks_session_and_its_objects(engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))

    async def main() -> None:
        mine = Scoped()
        item = Item(owner="made-in-task", n=0)
        mine.add(item)
        mine.flush()

        def job() -> Session:
            item.owner = "renamed-in-job"  # an object of the waiting unit: no CrossUnitError
            Scoped.flush()
            return Scoped()

        assert await asyncio.to_thread(job) is mine
        made_in_job = await asyncio.to_thread(lambda: sessionscope.guard(Session(engine)))
        # a session made in one job is usable by the waiting task and closable by a later job
        assert made_in_job.execute(text("select 1")).scalar() == 1
        await asyncio.to_thread(made_in_job.close)
        Scoped.commit()

    asyncio.run(main())
    assert count_items(engine) == 1
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_pool_thread_never_carries_a_jobs_session_into_another_units_job(
    engine: Engine,
) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    pool = concurrent.futures.ThreadPoolExecutor(1)  # one thread: reuse is certain
    seen: list[Session] = []

    async def request(n: int) -> None:
        async with sessionscope.unit_of_work():
            loop = asyncio.get_running_loop()

            def job() -> None:
                session = Scoped()
                assert not session.info and not session.new, "state of another request"
                session.info["request"] = n
                session.add(Item(owner=f"pending-{n}", n=0))  # never committed
                seen.append(session)

            ctx = contextvars.copy_context()
            await loop.run_in_executor(pool, ctx.run, job)
            await loop.run_in_executor(pool, contextvars.copy_context().run, job_sees_same, n)

    def job_sees_same(n: int) -> None:
        assert Scoped().info["request"] == n  # a later job of the same request: same session

    async def main() -> None:
        for n in range(20):
            await request(n)

    asyncio.run(main())
    pool.shutdown()
    assert len({id(s) for s in seen}) == 20
    assert count_items(engine) == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_another_requests_job_is_refused_every_time(engine: Engine) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    SessionLocal = sessionscope.guard(sessionmaker(engine))

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def first() -> Session:
            async with sessionscope.unit_of_work():
                session = await loop.run_in_executor(
                    pool, contextvars.copy_context().run, SessionLocal
                )
                # handed out, but its unit of work is still open while another request runs
                await asyncio.create_task(other(session))
                session.close()
                return session

        async def other(session: Session) -> None:
            async with sessionscope.unit_of_work():
                for _ in range(3):
                    with pytest.raises(sessionscope.CrossUnitError, match="unit of work"):
                        await loop.run_in_executor(
                            pool, contextvars.copy_context().run, session.execute, text("select 1")
                        )

        await asyncio.create_task(first())

    asyncio.run(main())
    pool.shutdown()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_parallel_jobs_of_one_unit_on_its_implicit_session_overlap(engine: Engine) -> None:
    maker = sessionmaker(engine)
    Scoped = sessionscope.scoped_session(maker)
    one_inside = threading.Event()
    other_refused = threading.Event()
    errors: list[BaseException] = []

    @event.listens_for(maker, "do_orm_execute")
    def wait_inside(state: Any) -> None:
        # runs inside session.execute(): the first job holds the session while the other
        # tries (not left to the timing of two threads: a fast statement could finish first)
        if not one_inside.is_set():
            one_inside.set()
            other_refused.wait(5)

    def job() -> None:
        try:
            Scoped().execute(text("select 1"))
        except sessionscope.ConcurrentUseError as error:
            errors.append(error)
            other_refused.set()

    async def main() -> None:
        async with sessionscope.unit_of_work():
            Scoped()  # the request's session exists before the jobs start
            await asyncio.gather(asyncio.to_thread(job), asyncio.to_thread(job))

    asyncio.run(main())
    assert len(errors) == 1
    assert "scope(new=True)" in str(errors[0])
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_boundary_closes_its_sessions_and_the_next_starts_clean(engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    SessionLocal = sessionscope.guard(sessionmaker(engine))
    sessions: list[Session] = []
    for n in range(5):
        with sessionscope.unit_of_work():
            session = Scoped()
            assert not session.in_transaction() and not session.info
            session.info["n"] = n
            session.add(Item(owner=f"uncommitted-{n}", n=0))
            session.flush()
            loose = SessionLocal()  # guarded, never closed by the application
            loose.execute(text("select 1"))
            sessions.append(session)
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert len({id(s) for s in sessions}) == 5
    assert count_items(engine) == 0


def test_a_boundary_in_a_greenlet_reused_for_many_requests(engine: Engine) -> None:
    greenlet = pytest.importorskip("greenlet")
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    committed: list[int] = []

    def serve() -> None:
        for n in range(30):
            try:
                with sessionscope.unit_of_work():
                    assert not Scoped().in_transaction()
                    Scoped.add(Item(owner=f"r{n}", n=0))
                    Scoped.flush()
                    if n % 3 == 0:
                        raise RuntimeError("the request failed")
                    Scoped.commit()
                    committed.append(n)
            except RuntimeError:
                pass

    greenlet.greenlet(serve).switch()
    assert count_items(engine) == len(committed) == 20
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_an_ended_owners_session_can_still_be_closed_by_anyone(engine: Engine) -> None:
    SessionLocal = sessionscope.guard(sessionmaker(engine))
    made: list[Session] = []

    def owner() -> None:
        with sessionscope.unit_of_work():
            session = SessionLocal()
            session.execute(text("select 1"))
            made.append(session)

    thread = threading.Thread(target=owner)
    thread.start()
    thread.join()
    session = made[0]
    with pytest.raises(sessionscope.CrossUnitError):
        session.execute(text("select 1"))
    session.close()  # recovery never raises
    session.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_an_async_generator_finished_by_another_task_can_close_its_session(
    async_url: Any,
) -> None:
    url, connect_args = async_url

    async def main() -> None:
        engine = create_async_engine(url, connect_args=connect_args)
        SessionLocal = sessionscope.guard(async_sessionmaker(engine))

        @contextlib.asynccontextmanager
        async def get_db() -> AsyncIterator[AsyncSession]:
            db = SessionLocal()
            try:
                yield db
            finally:
                await db.close()

        manager = get_db()
        db = await asyncio.create_task(manager.__aenter__())  # entered by a task that ends
        await asyncio.sleep(0)
        await asyncio.create_task(manager.__aexit__(None, None, None))  # another task closes
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert db is not None
        await engine.dispose()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asyncio.run(main())


def test_loop_close_after_run_until_complete_returns_the_tasks_connection(
    async_url: Any,
) -> None:
    url, connect_args = async_url
    # connections belong to a loop: a worker with a loop per job keeps no pool between jobs
    engine = create_async_engine(url, connect_args=connect_args, poolclass=NullPool)
    out = {"checked_out": 0}
    event.listen(engine.sync_engine, "checkout", lambda *_: out.update(checked_out=1))
    event.listen(engine.sync_engine, "checkin", lambda *_: out.update(checked_out=0))
    Scoped = sessionscope.async_scoped_session(async_sessionmaker(engine))

    async def job() -> None:
        await Scoped.execute(text("select 1"))  # checked out, in a transaction, never closed

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):  # a worker with a fresh loop per job
            loop = asyncio.new_event_loop()
            loop.run_until_complete(job())
            loop.close()
            assert out["checked_out"] == 0
        gc.collect()


def test_async_boundary_closes_sync_sessions_off_the_loop_and_async_ones_awaited(
    engine: Engine, async_url: Any
) -> None:
    url, connect_args = async_url
    Scoped = sessionscope.scoped_session(sessionmaker(engine))

    async def main() -> None:
        async_engine = create_async_engine(url, connect_args=connect_args)
        AsyncScoped = sessionscope.async_scoped_session(async_sessionmaker(async_engine))
        for _ in range(3):
            async with sessionscope.unit_of_work():
                await asyncio.to_thread(lambda: Scoped().execute(text("select 1")))
                await AsyncScoped.execute(text("select 1"))
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
            assert async_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        await async_engine.dispose()

    asyncio.run(main())


def test_unit_of_work_cannot_be_entered_twice() -> None:
    boundary = sessionscope.unit_of_work()
    with boundary, pytest.raises(Exception, match="already entered"):
        boundary.__enter__()


def test_a_job_of_a_thread_without_boundary_ends_with_its_context(engine: Engine) -> None:
    """Unmarked pool jobs: each is a unit of work of its own, closed when the job is dropped."""
    Scoped = sessionscope.scoped_session(sessionmaker(create_engine(engine.url)))
    pool = concurrent.futures.ThreadPoolExecutor(1)

    # each job runs in a context of its own holding no unit of work (a copy of an unmarked task's)
    def job() -> Session:
        session = Scoped()
        session.execute(text("select 1"))  # a transaction, left open by the job
        return session

    sessions = [pool.submit(contextvars.Context().run, job).result() for _ in range(5)]
    pool.shutdown()
    assert len({id(s) for s in sessions}) == 5
    assert len(Scoped.registry) == 0
    for session in sessions:  # closed as their job was dropped: nothing holds a connection
        assert not session.in_transaction()


def test_a_nested_boundary_may_use_the_outer_works_sessions_but_siblings_may_not(
    engine: Engine,
) -> None:
    SessionLocal = sessionscope.guard(sessionmaker(engine))
    with sessionscope.unit_of_work():
        outer = SessionLocal()
        with sessionscope.unit_of_work():
            assert outer.execute(text("select 1")).scalar() == 1  # the outer work waits for us
            inner = SessionLocal()
            inner.execute(text("select 1"))
        with sessionscope.unit_of_work(), pytest.raises(sessionscope.CrossUnitError):
            inner.execute(text("select 1"))  # a sibling's: ended with its block
        outer.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_an_async_boundary_under_trio_closes_its_sync_sessions_in_a_worker_thread(
    engine: Engine,
) -> None:
    trio = pytest.importorskip("trio")
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    seen: list[Session] = []

    async def main() -> None:
        for _ in range(3):
            async with sessionscope.unit_of_work():
                session = Scoped()
                session.execute(text("select 1"))  # checked out, in a transaction
                seen.append(session)
            assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    trio.run(main)
    assert len({id(s) for s in seen}) == 3


def test_a_long_lived_unit_making_session_after_session_keeps_no_trace_of_closed_ones(
    engine: Engine,
) -> None:
    """A consumer thread that never ends, making a session per message with Session() and
    remove(): its unit of work must not keep a reference per session it ever made."""
    Session = sessionscope.scoped_session(sessionmaker(engine))
    lengths: list[int] = []

    def consumer() -> None:
        for _ in range(2_000):
            Session().execute(select(1))
            Session.remove()
        work = sessionscope._work.current_work()
        assert work is not None
        lengths.append(len(work.owned_guards()))

    thread = threading.Thread(target=consumer)
    thread.start()
    thread.join()
    assert lengths and lengths[0] < 64, lengths


def test_pruning_a_long_lived_units_sessions_keeps_the_live_ones_to_close_at_its_end(
    engine: Engine,
) -> None:
    """Sessions a thread keeps open (from a guarded sessionmaker: only its unit of work closes
    them) while it makes and removes hundreds of others: every prune of the unit's owned list
    must keep them, so they are all closed, their connections back in the pool, when the thread
    ends."""
    maker = sessionscope.guard(sessionmaker(engine))
    churn = sessionscope.scoped_session(sessionmaker(engine))
    made: list[Session] = []
    checked_out_inside: list[int] = []  # (asserted here: an assert in the thread fails nothing)

    def worker() -> None:
        for _ in range(40):
            session = maker()
            session.execute(select(1))  # a connection checked out until the session closes
            made.append(session)
            for _ in range(25):
                churn().execute(select(1))
                churn.remove()
        checked_out_inside.append(engine.pool.checkedout())  # type: ignore[attr-defined]

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert len(made) == 40
    assert checked_out_inside == [40]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert all(session.get_transaction() is None for session in made)
