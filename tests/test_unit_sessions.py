"""Implicit sessions are per unit, never inherited, and closed when their unit ends."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import greenlet
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

import sessionscope

UNITS = 10_000


@contextlib.contextmanager
def no_garbage_collector_cleanup() -> Iterator[None]:
    """Fails if any connection was returned by SQLAlchemy's garbage-collector path."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "garbage collector" in m], messages


def hold_connection(Scoped: Any) -> Session:
    """What a request does: use its session, so that it holds a pooled connection."""
    Scoped.execute(text("select 1"))
    session: Session = Scoped()
    return session


@pytest.fixture
def Scoped(engine: Engine) -> Iterator[Any]:
    registry = sessionscope.scoped_session(sessionmaker(engine))
    yield registry
    assert len(registry.registry) == 0, "a unit's session outlived its unit"
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_threads_get_their_own_sessions_closed_when_each_thread_exits(
    Scoped: Any, engine: Engine
) -> None:
    sessions: list[Session] = []
    barrier = threading.Barrier(8)

    def request() -> None:
        sessions.append(hold_connection(Scoped))
        barrier.wait()  # all eight hold a session and a connection at once

    with no_garbage_collector_cleanup():
        threads = [threading.Thread(target=request) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len({id(s) for s in sessions}) == 8
    assert all(not s.in_transaction() for s in sessions)  # closed, not merely dropped


def test_raw_greenlets_get_their_own_sessions_and_a_finished_one_is_closed(Scoped: Any) -> None:
    sessions: list[Session] = []

    def request() -> None:
        mine = hold_connection(Scoped)
        sessions.append(mine)
        greenlet.getcurrent().parent.switch()  # yield while holding the connection
        assert Scoped() is mine  # after the others ran, still its own

    with no_garbage_collector_cleanup():
        units = [greenlet.greenlet(request) for _ in range(5)]
        for unit in units:
            unit.switch()
        assert len(Scoped.registry) == 5 and len({id(s) for s in sessions}) == 5
        for unit in units:
            unit.switch()
        del units, unit
    assert len(Scoped.registry) == 0


def test_a_finished_greenlet_still_referenced_is_swept(Scoped: Any) -> None:
    kept = []
    for _ in range(200):  # more than the sweep threshold
        unit = greenlet.greenlet(lambda: hold_connection(Scoped))
        unit.switch()
        kept.append(unit)
    assert all(unit.dead for unit in kept)
    assert len(Scoped.registry) < 200  # finished greenlets were swept while others were created
    kept.clear()


def test_asyncio_children_never_receive_the_parents_session(Scoped: Any) -> None:
    async def child() -> Session:
        await asyncio.sleep(0)
        return hold_connection(Scoped)

    async def main() -> None:
        mine = hold_connection(Scoped)
        children = await asyncio.gather(child(), child(), asyncio.create_task(child()))
        in_thread = await asyncio.to_thread(lambda: Scoped())
        loop = asyncio.get_running_loop()
        in_executor = await loop.run_in_executor(None, lambda: Scoped())
        assert mine not in children and len({id(c) for c in children}) == 3
        # to_thread runs in a copy of the task's context while it waits: part of its work;
        # run_in_executor copies no context: the pool thread's own
        assert in_thread is mine and in_executor is not mine
        assert Scoped() is mine

    with no_garbage_collector_cleanup():
        asyncio.run(main())


@pytest.mark.parametrize("kind", ["threads", "greenlets", "asyncio"])
def test_ten_thousand_units_that_never_call_remove_leave_nothing_behind(
    Scoped: Any, engine: Engine, kind: str
) -> None:
    """Every unit checks out a connection and ends without remove(): nothing may stay behind."""
    used: list[int] = []

    def request() -> None:
        hold_connection(Scoped)
        used.append(1)

    with no_garbage_collector_cleanup():
        if kind == "threads":
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # spawn threads from one place
                pool.submit(_spawn_threads, request, UNITS).result()
        elif kind == "greenlets":
            for _ in range(UNITS):
                greenlet.greenlet(request).switch()
        else:

            async def main() -> None:
                # pool-sized batches: a sync Session in a task would block the loop on an empty
                # pool, and bigger batches only measure how fast the server opens connections
                for _ in range(0, UNITS, 5):
                    await asyncio.gather(*(_task(request) for _ in range(5)))

            asyncio.run(main())
    assert len(used) == UNITS
    assert len(Scoped.registry) == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def _task(fn: Any) -> None:
    fn()
    await asyncio.sleep(0)


def _spawn_threads(fn: Any, count: int) -> None:
    for start in range(0, count, 16):
        threads = [threading.Thread(target=fn) for _ in range(min(16, count - start))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


def test_a_unit_whose_session_cannot_close_is_invalidated_and_logged(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Session):
        def close(self) -> None:
            raise RuntimeError("connection reset by peer")

    Scoped = sessionscope.scoped_session(sessionmaker(engine, class_=Broken))
    thread = threading.Thread(target=lambda: hold_connection(Scoped))
    with caplog.at_level("ERROR", logger="sessionscope"):
        thread.start()
        thread.join()
    assert "cleaning up after thread" in caplog.text
    assert len(Scoped.registry) == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_remove_closes_only_the_current_units_session(Scoped: Any) -> None:
    mine = hold_connection(Scoped)
    other: list[Session] = []
    release = threading.Event()

    def request() -> None:
        other.append(hold_connection(Scoped))
        release.wait()

    thread = threading.Thread(target=request)
    thread.start()
    while not other:
        pass
    Scoped.remove()
    assert not mine.in_transaction() and other[0].in_transaction()
    assert len(Scoped.registry) == 1
    release.set()
    thread.join()


def test_trio_tasks_get_their_own_sessions_closed_when_each_task_exits(Scoped: Any) -> None:
    trio = pytest.importorskip("trio")
    sessions: list[Session] = []
    live_while_running: list[int] = []

    async def request() -> None:
        mine = hold_connection(Scoped)
        sessions.append(mine)
        await trio.sleep(0)
        assert Scoped() is mine  # after the others ran, still its own
        live_while_running.append(len(Scoped.registry))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(request)
        await trio.sleep(0)

    thread_session = Scoped()  # the thread's own session is not what trio tasks get
    with no_garbage_collector_cleanup():
        trio.run(main)
    assert len({id(s) for s in sessions}) == 5 and thread_session not in sessions
    assert max(live_while_running) == 6  # five tasks and this thread
    assert all(not s.in_transaction() for s in sessions)
    assert len(Scoped.registry) == 1  # only this thread's
    Scoped.remove()
