"""async_scoped_session: one AsyncSession per task, never inherited, closed when the task ends."""

from __future__ import annotations

import asyncio
import gc
import inspect
import random
import sys
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import event, exc, select, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.ext.asyncio import async_scoped_session as sa_async_scoped_session
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

import sessionscope
from tests.models import Row


def run(
    async_url: tuple[str, dict[str, Any]],
    scenario: Callable[..., Awaitable[None]],
    *,
    loop_factory: Any = None,
) -> None:
    """Run ``scenario(Scoped, engine)`` in a fresh loop; afterwards nothing may be left behind.

    SQLAlchemy warnings (and the garbage-collector connection messages) are errors here.
    """
    url, connect_args = async_url
    checks: dict[str, int] = {}
    registries: list[Any] = []

    async def main() -> None:
        engine = create_async_engine(
            url, connect_args=connect_args, pool_size=5, max_overflow=20, pool_timeout=60
        )
        Scoped = sessionscope.async_scoped_session(
            async_sessionmaker(engine, expire_on_commit=False)
        )
        registries.append(Scoped)
        try:
            await scenario(Scoped, engine)
            await Scoped.remove()
            await only_this_task_left()  # ended tasks' sessions close in tasks of their own
            checks["checkedout"] = engine.pool.checkedout()
        finally:
            await engine.dispose()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if loop_factory is None:
            asyncio.run(main())
        else:
            loop = loop_factory()
            try:
                loop.run_until_complete(main())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
        gc.collect()
    checks["live"] = len(registries[0].registry)  # to_thread threads ended with the executor
    assert checks == {"checkedout": 0, "live": 0}


async def only_this_task_left(timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(asyncio.all_tasks()) > 1:
        assert loop.time() < deadline, asyncio.all_tasks()
        await asyncio.sleep(0.005)


async def committed(engine: AsyncEngine) -> Counter[str]:
    async with engine.connect() as conn:
        return Counter((await conn.scalars(select(Row.owner))).all())


def test_it_is_sqlalchemys_async_scoped_session_with_the_same_proxies() -> None:
    assert issubclass(sessionscope.async_scoped_session, sa_async_scoped_session)
    for name in vars(sa_async_scoped_session):
        if name.startswith("_") or name in {"remove", "configure"}:
            continue
        ours = inspect.getattr_static(sessionscope.async_scoped_session, name)
        assert ours is inspect.getattr_static(sa_async_scoped_session, name), name
    assert inspect.iscoroutinefunction(sessionscope.async_scoped_session.remove)


def test_children_get_their_own_sessions_and_to_thread_jobs_the_waiting_tasks(
    async_url: Any,
) -> None:
    anyio = pytest.importorskip("anyio")

    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        async def child() -> AsyncSession:
            await Scoped.execute(text("select 1"))
            await asyncio.sleep(0)
            session: AsyncSession = Scoped()
            return session

        mine = Scoped()
        gathered = await asyncio.gather(child(), child())
        created = await asyncio.create_task(child())
        in_group: list[AsyncSession] = []
        if sys.version_info >= (3, 11):
            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
                tasks = [group.create_task(child()) for _ in range(2)]
            in_group = [t.result() for t in tasks]
        in_anyio: list[AsyncSession] = []

        async def anyio_child() -> None:
            in_anyio.append(await child())

        async with anyio.create_task_group() as group:
            group.start_soon(anyio_child)
            group.start_soon(anyio_child)
        in_thread = await asyncio.to_thread(Scoped)
        everyone = [mine, *gathered, created, *in_group, *in_anyio]
        assert len({id(s) for s in everyone}) == len(everyone)
        assert in_thread is mine  # a to_thread job is part of the task that waits for it
        assert Scoped() is mine

    run(async_url, scenario)


def test_a_sessionmaker_of_asyncsession_works_as_factory(async_url: Any) -> None:
    url, connect_args = async_url

    async def main() -> None:
        engine = create_async_engine(url, connect_args=connect_args)
        Scoped = sessionscope.async_scoped_session(sessionmaker(engine, class_=AsyncSession))
        assert isinstance(Scoped(), AsyncSession)
        assert (await Scoped.execute(text("select 1"))).scalar() == 1
        await Scoped.remove()
        assert engine.pool.checkedout() == 0
        await engine.dispose()

    asyncio.run(main())


def test_event_hooks_inside_an_async_session_belong_to_the_driving_task(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        seen: list[tuple[Any, Any]] = []

        @event.listens_for(Scoped().sync_session, "do_orm_execute")
        def hook(_: Any) -> None:
            seen.append((sessionscope.current_unit(), Scoped()))

        await Scoped.execute(select(1))
        assert seen == [(asyncio.current_task(), Scoped())]

    run(async_url, scenario)


def test_a_thousand_tasks_that_never_call_remove_leave_nothing_behind(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        async def short_task(i: int) -> None:
            await Scoped.execute(text("select 1"))  # checks out a connection and keeps it
            if i % 3 == 0:
                raise ValueError("some tasks fail")

        results = await asyncio.gather(
            *(short_task(i) for i in range(1000)), return_exceptions=True
        )
        assert sum(isinstance(r, ValueError) for r in results) == 334

    run(async_url, scenario)


def test_300_concurrent_tasks_commit_their_own_rows_and_never_see_each_others(
    async_url: Any,
) -> None:
    foreign: list[str] = []

    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        async def request(i: int) -> None:
            name = f"t{i}"
            Scoped.add_all([Row(owner=name, n=n) for n in range(2)])
            await asyncio.sleep(0)
            await Scoped.flush()
            foreign.extend(obj.owner for obj in Scoped.new if obj.owner != name)
            foreign.extend(obj.owner for obj in Scoped.identity_map.values() if obj.owner != name)
            await Scoped.commit()

        await asyncio.gather(*(request(i) for i in range(300)))
        assert await committed(engine) == Counter({f"t{i}": 2 for i in range(300)})

    run(async_url, scenario)
    assert foreign == []


def test_cancelling_tasks_mid_flush_or_commit_loses_nothing_committed_and_leaks_nothing(
    async_url: Any,
) -> None:
    finished: list[str] = []

    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        async def request(i: int) -> None:
            name = f"c{i}"
            Scoped.add_all([Row(owner=name, n=n) for n in range(3)])
            await Scoped.flush()
            await Scoped.commit()
            finished.append(name)

        rng = random.Random(1234)
        for _ in range(10):
            tasks = [asyncio.create_task(request(rng.randrange(10**9))) for _ in range(20)]
            for _ in range(rng.randrange(1, 12)):
                await asyncio.sleep(0)  # let them get somewhere: mid-flush, mid-commit, done
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        rows = await committed(engine)
        assert all(count == 3 for count in rows.values())  # a task's rows: all or nothing
        assert set(finished) <= set(rows)  # nothing that was committed is lost
        assert len(finished) < 200  # some were really cancelled

    run(async_url, scenario)


def test_async_scope_commits_rolls_back_closes_nests_and_follows_to_thread(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        implicit = Scoped()
        async with Scoped.scope() as session:
            assert Scoped() is session and session is not implicit
            Scoped.add(Row(owner="committed", n=1))
            async with Scoped.scope() as joined:
                assert joined is session
            assert await asyncio.to_thread(Scoped) is session
            async with Scoped.scope(new=True) as other:
                assert other is not session and Scoped() is other
        with pytest.raises(exc.InvalidRequestError, match="permanently closed"):
            await session.execute(select(1))
        error = KeyError("x")
        with pytest.raises(KeyError) as raised:
            async with Scoped.scope():
                Scoped.add(Row(owner="rolled-back", n=1))
                await Scoped.flush()
                raise error
        assert raised.value is error
        async with Scoped.scope(commit=False):
            Scoped.add(Row(owner="dry-run", n=1))
        assert await committed(engine) == Counter({"committed": 1})
        assert Scoped() is implicit

        @Scoped.scoped
        async def decorated(owner: str) -> None:
            Scoped.add(Row(owner=owner, n=1))

        await decorated("decorated")
        assert (await committed(engine))["decorated"] == 1
        with pytest.raises(TypeError, match="coroutine functions"):
            Scoped.scoped(lambda: None)
        with pytest.raises(TypeError, match="async with"):
            with Scoped.scope():
                pass

    run(async_url, scenario)


def test_a_scope_cancelled_mid_commit_returns_its_connection(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        async def request(i: int) -> None:
            async with Scoped.scope():
                Scoped.add_all([Row(owner=f"s{i}", n=n) for n in range(3)])
                await asyncio.sleep(0)

        for spins in range(1, 15):
            tasks = [asyncio.create_task(request(spins * 100 + i)) for i in range(5)]
            for _ in range(spins):
                await asyncio.sleep(0)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert all(count == 3 for count in (await committed(engine)).values())

    run(async_url, scenario)


def test_sqlalchemys_async_with_session_still_closes_in_its_shielded_helper(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        async with Scoped() as session:  # AsyncSession.__aexit__ closes it in a helper task
            await session.execute(text("select 1"))
        assert engine.pool.checkedout() == 0
        assert Scoped() is session  # still this task's session, closed and reusable

    run(async_url, scenario)


def test_the_main_task_of_asyncio_run_has_its_session_closed_too(async_url: Any) -> None:
    url, connect_args = async_url
    # NullPool closes each connection as it is checked in: only an awaited close, on the live
    # loop, can do that; a connection left to the garbage collector would warn (an error here).
    engine = create_async_engine(url, connect_args=connect_args, poolclass=NullPool)
    Scoped = sessionscope.async_scoped_session(async_sessionmaker(engine))
    pool_events: Counter[str] = Counter()
    for name in ("checkout", "checkin"):
        event.listen(engine.sync_engine, name, lambda *_, name=name: pool_events.update([name]))

    async def main() -> None:
        await Scoped.execute(text("select 1"))  # the main task ends holding its connection

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asyncio.run(main())
        gc.collect()
    assert pool_events == Counter(checkout=1, checkin=1) and len(Scoped.registry) == 0


def test_uvloop_works(async_url: Any) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        async def child() -> AsyncSession:
            await Scoped.execute(text("select 1"))
            session: AsyncSession = Scoped()
            return session

        sessions = await asyncio.gather(*(child() for _ in range(20)))
        assert len({id(s) for s in sessions}) == 20 and Scoped() not in sessions
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)

    run(async_url, scenario, loop_factory=uvloop.new_event_loop)


def test_an_explicit_scopefunc_behaves_as_in_sqlalchemy(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        keyed = sessionscope.async_scoped_session(async_sessionmaker(engine), asyncio.current_task)
        first = keyed()
        assert await asyncio.create_task(_get(keyed)) is not first
        assert keyed() is first
        with pytest.raises(exc.InvalidRequestError, match="already present"):
            keyed(info={"x": 1})
        await keyed.remove()
        assert keyed() is not first
        await keyed.remove()

    run(async_url, scenario)


async def _get(keyed: Any) -> Any:
    session = keyed()
    await keyed.remove()
    return session
