"""Implicit sessions are per unit, never inherited, and closed when their unit ends."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import gc
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import greenlet
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

import sessionscope
from sessionscope import _async_session_end, _work_end
from sessionscope._units import _asyncio as _asyncio_units

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


@pytest.mark.parametrize("kind", ["threads", "greenlets", "asyncio"])
def test_an_ended_unit_is_freed_by_reference_counting_not_left_in_a_cycle(
    Scoped: Any, kind: str
) -> None:
    """A unit that took a session leaves nothing for the garbage collector once it has ended.

    A task's context holds its work and the work held its task: 8 objects a task (the coroutine
    and its frame among them) that only a collection could free, into older generations.
    """

    def units(count: int) -> None:
        if kind == "threads":
            for _ in range(count):
                thread = threading.Thread(target=Scoped)
                thread.start()
                thread.join()
        elif kind == "greenlets":
            for _ in range(count):
                greenlet.greenlet(Scoped).switch()
        else:

            async def unit() -> None:
                Scoped()

            async def main() -> None:
                await asyncio.gather(*(unit() for _ in range(count)))
                await asyncio.sleep(0)  # the units' ends

            asyncio.run(main())

    units(3)  # (what a first unit makes once: caches, the loop's machinery)
    gc.collect()
    gc.disable()
    try:
        gc.set_debug(gc.DEBUG_SAVEALL)
        units(20)
        gc.collect()
        garbage = [type(o).__qualname__ for o in gc.garbage if type(o).__qualname__ != "dict"]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    # asyncio.run() leaves its own loop in a cycle (a handful of objects), once per run
    assert len(garbage) < 20, sorted(garbage)


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


class CountingSession(Session):
    """A Session that counts its closes."""

    closes = 0

    def close(self) -> None:
        self.closes += 1
        super().close()


def run_in_thread(target: Any) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


@pytest.mark.parametrize("guard", ["raise", "off"])
def test_a_removed_session_is_not_closed_again_for_nothing_at_its_units_end(
    engine: Engine, guard: str
) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine, class_=CountingSession), guard=guard)
    removed: list[CountingSession] = []

    def request() -> None:
        session = hold_connection(Scoped)
        Scoped.remove()
        removed.append(session)  # type: ignore[arg-type]

    run_in_thread(request)
    assert removed[0].closes == 1  # remove()'s: the unit's end found nothing to close
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_session_used_after_remove_is_still_closed_at_its_units_end(engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine, class_=CountingSession))
    used: list[CountingSession] = []

    def request() -> None:
        session = hold_connection(Scoped)
        Scoped.remove()
        session.execute(text("select 1"))  # still the unit's session: a new transaction
        used.append(session)  # type: ignore[arg-type]

    run_in_thread(request)
    assert used[0].closes == 2 and not used[0].in_transaction()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("guard", ["raise", "off"])
def test_a_session_its_unit_never_used_is_closed_at_its_end(engine: Engine, guard: str) -> None:
    """Empty or not, a session not closed yet is closed: ``close()`` is what a subclass hooks,
    and what makes a ``close_resets_only=False`` session refuse any use since."""
    Scoped = sessionscope.scoped_session(
        sessionmaker(engine, class_=CountingSession, close_resets_only=False), guard=guard
    )
    unused: list[CountingSession] = []
    run_in_thread(lambda: unused.append(Scoped()))
    assert unused[0].closes == 1


def test_remove_in_a_child_task_closes_its_own_session_never_the_parents(
    Scoped: Any, engine: Engine
) -> None:
    """A child task's context holds its parent's unit of work: ``remove()`` there must find the
    child's own (or none), not close the parent's."""

    async def main() -> tuple[Session, Session]:
        parent = hold_connection(Scoped)

        async def child_without_a_session() -> None:
            Scoped.remove()

        async def child_with_one() -> Session:
            session = hold_connection(Scoped)
            Scoped.remove()
            return session

        await asyncio.create_task(child_without_a_session())
        child = await asyncio.create_task(child_with_one())
        still_open = parent.in_transaction() and Scoped() is parent
        Scoped.remove()
        assert still_open
        return parent, child

    parent, child = asyncio.run(main())
    assert child is not parent
    assert not child.in_transaction() and not parent.in_transaction()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


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


@pytest.mark.parametrize("kind", ["thread", "asyncio task"])
def test_several_registries_in_one_unit_each_find_their_own_session_without_a_miss(
    engine: Engine, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A unit of work keeps its first registry's session in two slots and the others in a dict
    (``WorkUnit.get_value``): every registry's lookup finds its own, on the fast path, also after
    the first one's session was removed and another registry's took its slot."""
    from tests.test_guard_handles import fast_path

    registries = [sessionscope.scoped_session(sessionmaker(engine)) for _ in range(3)]
    misses: list[int] = []

    def counting(miss: Any) -> Any:
        def counting_miss() -> Any:
            misses.append(1)
            return miss()

        return counting_miss

    for registry in registries:  # (what its lookup calls when it finds nothing)
        monkeypatch.setattr(registry, "_miss", counting(registry._miss))

    def unit() -> None:
        first = [registry() for registry in registries]  # made: one miss each
        assert len(misses) == 3 and len({id(s) for s in first}) == 3
        for _ in range(3):
            assert [registry() for registry in registries] == first
        assert len(misses) == 3, "a registry's own session was looked up off the fast path"
        registries[0].remove()  # the first slot freed ...
        third_again = registries[2]()
        assert third_again is first[2] and registries[1]() is first[1]
        renewed = registries[0]()  # ... and taken again, by a new session
        assert renewed is not first[0] and len(misses) == 4
        assert [registry() for registry in registries] == [renewed, first[1], first[2]]
        assert len(misses) == 4
        registries[1].remove()
        assert registries[1]() is not first[1] and registries[2]() is first[2]
        for registry in registries:
            registry.execute(text("select 1"))  # each holds a connection until the unit ends

    with fast_path(), no_garbage_collector_cleanup():
        if kind == "thread":
            thread = threading.Thread(target=unit)
            thread.start()
            thread.join()
        else:

            async def main() -> None:
                await asyncio.create_task(_as_task(unit))  # (a task of its own: the unit)

            asyncio.run(main())
    assert len(misses) == 5
    assert [len(registry.registry) for registry in registries] == [0, 0, 0]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def _as_task(fn: Any) -> None:
    fn()


def test_tasks_end_in_a_fresh_context_and_loops_in_two_threads_never_collide(
    Scoped: Any, engine: Engine
) -> None:
    """A loop's end callbacks share one registration context (an object less per live task):
    the end itself runs in a fresh context, so the task's variables are not seen there and what
    an event listener sets there does not reach the next task's end; loops running in two
    threads at once each have their own."""
    seen_at_end: list[tuple[str, str]] = []
    request_var: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")
    listener_var: contextvars.ContextVar[str] = contextvars.ContextVar("listener", default="none")

    def at_transaction_end(session: Session, transaction: Any) -> None:
        if transaction.parent is None:
            seen_at_end.append((request_var.get(), listener_var.get()))
            listener_var.set("left by a listener")

    event.listen(Session, "after_transaction_end", at_transaction_end)
    errors: list[BaseException] = []

    async def request(n: int) -> None:
        request_var.set(f"request {n}")
        hold_connection(Scoped)
        await asyncio.sleep(0)

    async def main() -> None:
        for start in range(0, 200, 5):
            await asyncio.gather(*(request(n) for n in range(start, start + 5)))

    def in_a_thread() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    try:
        with no_garbage_collector_cleanup():
            _spawn_threads(in_a_thread, 2)  # (started together, then joined)
    finally:
        event.remove(Session, "after_transaction_end", at_transaction_end)
    assert errors == []
    assert len(seen_at_end) == 400
    assert set(seen_at_end) == {("none", "none")}
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_thread_running_context_after_context_keeps_few_end_listeners_and_ends_the_live_ones(
    Scoped: Any, engine: Engine
) -> None:
    """A thread that runs 300 fresh contexts, each a unit of work of its own holding a
    connection, is told about each of them at its end (weakly): the works of dropped contexts end
    as they are freed and their dead references are pruned (the list stays within twice the live
    ones), and the works whose contexts outlive the loop end with the thread."""
    from sessionscope._units._thread import per_thread

    kept: list[tuple[contextvars.Context, Session]] = []
    listening: list[int] = []

    def body() -> None:
        for i in range(300):
            context = contextvars.Context()
            session = context.run(hold_connection, Scoped)
            if i % 100 == 0:
                kept.append((context, session))  # alive until the thread has ended
            listening.append(len(per_thread.sentinel.listeners))

    with no_garbage_collector_cleanup():
        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
    assert len(kept) == 3 and max(listening) <= 2 * (len(kept) + 1) + 16
    assert not any(session.in_transaction() for _, session in kept)  # ended with the thread
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.skipif(
    sys.version_info < (3, 11) or sys.version_info >= (3, 13),
    reason="a loop's inline attribute values show in gc.get_referents() on 3.11 and 3.12 only",
)
def test_what_sessionscope_keeps_on_an_event_loop_leaves_its_attributes_inline(
    Scoped: Any,
) -> None:
    """Tasks' end context, the loops whose ``close()`` finishes pending AsyncSession closes and
    a lending thread's works are kept by loop, not on the loop: asking a loop for its
    ``__dict__``, or adding attributes past its class's 30 names, turns its inline attribute
    values into a dict, and every attribute read of asyncio's own loop code then takes the
    generic path (slower). The one attribute set is ``close``, the hook itself."""
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=NullPool)  # (closed as returned)
    AsyncScoped = sessionscope.async_scoped_session(async_sessionmaker(engine))

    def attributes_are_a_dict(loop: asyncio.AbstractEventLoop) -> bool:
        return any(type(r) is dict and "_ready" in r for r in gc.get_referents(loop))

    async def sync_unit() -> None:
        hold_connection(Scoped)  # ended by the task's end callback

    async def async_unit() -> None:
        await AsyncScoped().execute(text("select 1"))  # closed on the loop as the task ends

    async def committed_unit() -> None:  # (a lent work ends outside the loop: nothing to close)
        await AsyncScoped().execute(text("select 1"))
        await AsyncScoped.commit()

    async def main() -> None:
        await asyncio.gather(*(sync_unit() for _ in range(5)), async_unit())

    probe = asyncio.new_event_loop()
    probe.close = probe.close  # type: ignore[method-assign]  # (what the hook sets)
    if attributes_are_a_dict(probe):  # earlier code in this process used up the 30 names
        probe.close()
        pytest.skip("this process's loops have no room left for an inline attribute")
    probe.close()
    loop = asyncio.new_event_loop()
    try:
        assert not attributes_are_a_dict(loop)
        before = set(vars(type(loop)))
        loop.run_until_complete(main())
        with sessionscope.unit_of_work(lend_to_tasks=True):  # a thread's work, lent to a task
            loop.run_until_complete(committed_unit())
        assert _asyncio_units._end_contexts.get(loop) is not None
        assert loop in _async_session_end._hooked and loop in _work_end._lent
        assert not attributes_are_a_dict(loop)
        assert set(vars(type(loop))) == before
    finally:
        loop.close()  # finishes the pending closes first
    assert AsyncScoped.registry.has() is False
