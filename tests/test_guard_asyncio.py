"""The share-nothing guard under asyncio: AsyncSession (aiosqlite, asyncpg) and Session in tasks.

Owners, borrowers (units that inherited the owner's context) and everybody else, on real event
loops and real databases. Each scenario runs in a fresh loop whose main task is named ``owner``;
afterwards no connection may be checked out and no implicit session left, and warnings are errors.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import logging
import os
import re
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, selectinload, sessionmaker

import sessionscope
from sessionscope import ConcurrentUseError, CrossUnitError, ShareNothingWarning
from tests.models import Child, Parent, Row
from tests.test_async_registry import only_this_task_left

SITE = os.path.relpath(__file__)
CROSS_UNIT = "(Background on this error: sessionscope docs/errors.md#guard-cross-unit)"
CONCURRENT = "(Background on this error: sessionscope docs/errors.md#guard-concurrent)"
# about 0.3 s of work in the database: long enough to be cancelled, or overlapped, mid-statement
SQLITE_COUNT = (
    "with recursive c(x) as (select 1 union all select x + 1 from c where x < 1000000) "
    "select count(*) from c"
)


def line_here() -> int:
    """The caller's line: ``session, line = Scoped(), line_here()`` is where it was created."""
    return sys._getframe(1).f_lineno


def created_at(line: int, function: str = "scenario") -> str:
    return f"created at {SITE}:{line} (in {function})"


def long_statement(url: str) -> Any:
    return text("select pg_sleep(0.3)") if "asyncpg" in url else text(SQLITE_COUNT)


only_aiosqlite = pytest.mark.parametrize("async_url", ["aiosqlite"], indirect=True)


def run(
    async_url: tuple[str, dict[str, Any]],
    scenario: Callable[[Any, AsyncEngine], Awaitable[None]],
    *,
    guard: str = "raise",
) -> None:
    """Run ``scenario(Scoped, engine)`` in the task ``owner`` of a fresh loop; nothing may leak.

    ``Scoped`` is an ``async_scoped_session`` with the given guard mode. Warnings are errors.
    """
    url, connect_args = async_url
    checks: dict[str, int] = {}
    registries: list[Any] = []

    async def main() -> None:
        asyncio.current_task().set_name("owner")  # type: ignore[union-attr]
        engine = create_async_engine(
            url, connect_args=connect_args, pool_size=5, max_overflow=10, pool_timeout=30
        )
        Scoped = sessionscope.async_scoped_session(
            async_sessionmaker(engine, expire_on_commit=False), guard=guard
        )
        registries.append(Scoped)
        try:
            await scenario(Scoped, engine)
            await Scoped.remove()
            await only_this_task_left()
            checks["checkedout"] = engine.pool.checkedout()
        finally:
            await engine.dispose()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asyncio.run(main())
        gc.collect()
    checks["live"] = len(registries[0].registry)
    assert checks == {"checkedout": 0, "live": 0}


async def table(engine: AsyncEngine) -> list[tuple[str, int]]:
    """Every committed row as (owner, n), sorted; read on a connection of its own."""
    async with engine.connect() as conn:
        return sorted(tuple(r) for r in await conn.execute(select(Row.owner, Row.n)))


class Intruder:
    """A task that takes calls through a queue and runs them: another unit, by construction.

    Made before the session it is given (``asyncio.Queue`` hand-over), or with an empty context
    (``context=contextvars.Context()``): it never inherited the owner's context.
    """

    def __init__(self, name: str, *, empty_context: bool = False) -> None:
        self.name = name
        self.inbox: asyncio.Queue[Callable[[], Any] | None] = asyncio.Queue()
        self.outbox: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
        if empty_context:  # create_task(..., context=Context()) on 3.11+; this also on 3.10
            self.task = contextvars.Context().run(asyncio.create_task, self._serve(), name=name)
        else:
            self.task = asyncio.create_task(self._serve(), name=name)

    async def _serve(self) -> None:
        while (call := await self.inbox.get()) is not None:
            try:
                result = call()
                if inspect.isawaitable(result):
                    result = await result
            except Exception as error:  # noqa: BLE001 - handed back to the test
                self.outbox.put_nowait((False, error))
            else:
                self.outbox.put_nowait((True, result))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (sync, or returning an awaitable) in this task; it must succeed."""
        self.inbox.put_nowait(fn)
        ok, outcome = await self.outbox.get()
        if not ok:
            raise AssertionError(f"{self.name} failed: {outcome!r}") from outcome
        return outcome

    async def refused(self, fn: Callable[[], Any], error: type[Exception] = CrossUnitError) -> str:
        """Run ``fn`` in this task; it must raise ``error``. Returns the message."""
        self.inbox.put_nowait(fn)
        ok, outcome = await self.outbox.get()
        assert not ok, f"{self.name} was not refused: returned {outcome!r}"
        assert type(outcome) is error, repr(outcome)
        return str(outcome)

    async def stop(self) -> None:
        self.inbox.put_nowait(None)
        await self.task


# -- 1. units that did not inherit the owner's context -------------------------------------------


def intrusions(session: AsyncSession, anchor: Row) -> dict[str, tuple[str, Callable[[], Any]]]:
    """name -> (what the message says was done, the call). Each would change something."""
    anchor_id = anchor.id
    return {
        "execute": (
            "called AsyncSession.execute()",
            lambda: session.execute(insert(Row).values(owner="intruder", n=-1)),
        ),
        "add": ("called AsyncSession.add()", lambda: session.add(Row(owner="intruder", n=-1))),
        "flush": ("called AsyncSession.flush()", session.flush),
        "commit": ("called AsyncSession.commit()", session.commit),
        "get": ("called AsyncSession.get()", lambda: session.get(Row, anchor_id)),
        "refresh": ("called AsyncSession.refresh()", lambda: session.refresh(anchor)),
        "merge": (
            "called AsyncSession.merge()",
            lambda: session.merge(Row(id=anchor_id, owner="intruder", n=-1)),
        ),
        "connection": ("called AsyncSession.connection()", session.connection),
        # AsyncSession.scalars() is AsyncSession.execute() underneath: that is what is reported
        "scalars": ("called AsyncSession.execute()", lambda: session.scalars(select(Row))),
        "delete": ("called AsyncSession.delete()", lambda: session.delete(anchor)),
        "close": ("called AsyncSession.close()", session.close),
        "write": ("wrote Row.n on an object attached to it", lambda: setattr(anchor, "n", -1)),
    }


def test_a_unit_that_did_not_inherit_the_owners_context_is_refused_every_call(
    async_url: Any,
) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        early = Intruder("early-task")  # exists before the session; gets it through a queue
        session, line = Scoped(), line_here()
        fresh = Intruder("fresh-context", empty_context=True)  # made after, in an empty context
        anchor = Row(owner="anchor", n=0)
        session.add(anchor)
        await session.commit()
        expected = [("anchor", 0)]
        sent: list[str] = []
        event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
        for intruder in (early, fresh):
            for name, (did, call) in intrusions(session, anchor).items():
                pending = Row(owner=f"{intruder.name}/{name}", n=1)
                session.add(pending)  # the owner's unflushed work, which nobody else may touch

                message = await intruder.refused(call)
                assert sent == [], sent  # no statement was sent
                assert f"asyncio task '{intruder.name}' {did}" in message, message
                assert "asyncio task 'owner'" in message
                assert created_at(line) in message
                assert message.endswith(CROSS_UNIT)

                # nothing happened: nothing flushed, expunged, deleted, merged or written
                assert list(session.new) == [pending], name
                assert not session.dirty and not session.deleted
                assert sa_inspect(anchor).persistent and anchor.n == 0
                assert engine.pool.checkedout() == 0  # no connection was taken
                assert await table(engine) == expected

                # and the owner goes on: its row is committed exactly once
                await session.commit()
                expected = sorted([*expected, (pending.owner, 1)])
                assert await table(engine) == expected
                sent.clear()
        await early.stop()
        await fresh.stop()

        # a thread of loop.run_in_executor does not copy the context either
        loop = asyncio.get_running_loop()
        for call in (
            lambda: session.add(Row(owner="executor", n=-1)),
            lambda: setattr(anchor, "n", -1),
            lambda: session.sync_session.get(Row, anchor.id),
        ):
            with pytest.raises(CrossUnitError) as refused:
                await loop.run_in_executor(None, call)
            assert "asyncio task 'owner'" in str(refused.value)
            assert "but thread 'asyncio_" in str(refused.value)
        assert not session.new and not session.dirty and anchor.n == 0
        assert await table(engine) == expected
        assert len(expected) == 1 + 2 * 12
        await session.close()
        assert engine.pool.checkedout() == 0

    run(async_url, scenario)


def test_refused_writes_through_relationships_change_nothing(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        early = Intruder("early-task")
        session = Scoped()
        session.add(Parent(name="p", children=[Child(name="c1")]))
        await session.commit()
        loading = select(Parent).options(selectinload(Parent.children))
        parent = (await session.scalars(loading)).one()
        (c1,) = parent.children

        for call in (
            lambda: setattr(parent, "name", "intruder"),
            lambda: parent.children.append(Child(name="appended")),
            lambda: parent.children.remove(c1),
            lambda: setattr(c1, "parent", None),
            lambda: Child(name="backref", parent=parent),  # a transient child, attached via backref
        ):
            message = await early.refused(call)
            assert "asyncio task 'early-task' wrote " in message and message.endswith(CROSS_UNIT)
            assert parent.name == "p" and parent.children == [c1] and c1.parent is parent
            assert not session.new and not session.dirty
        await early.stop()

        parent.children.append(Child(name="c2"))  # the owner still can
        await session.commit()
        async with engine.connect() as conn:
            names = (await conn.scalars(select(Child.name).order_by(Child.name))).all()
        assert names == ["c1", "c2"]

    run(async_url, scenario)


# -- 2. two admitted units inside at once ---------------------------------------------------------


def test_gather_children_sharing_the_parents_session_the_second_is_stopped(
    async_url: Any,
) -> None:
    url = async_url[0]
    # asyncpg: the server sleeps, so the first child is surely inside; aiosqlite: every execute
    # awaits the connection's thread, which is enough.
    statement = text("select pg_sleep(0.05)") if "asyncpg" in url else text("select 1")

    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        sent: list[str] = []
        event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
        session, line = Scoped(), line_here()

        async def child() -> list[Any]:
            return list((await session.execute(statement)).all())

        for round_ in range(3):
            first = asyncio.create_task(child(), name=f"child-{round_}-a")
            second = asyncio.create_task(child(), name=f"child-{round_}-b")
            results = await asyncio.gather(first, second, return_exceptions=True)
            assert isinstance(results[0], list), results
            assert type(results[1]) is ConcurrentUseError, results
            message = str(results[1])
            assert message.startswith(
                f"asyncio task 'child-{round_}-b' called AsyncSession.execute() while asyncio "
                f"task 'child-{round_}-a' was inside the same AsyncSession ({created_at(line)})"
            ), message
            assert message.endswith(CONCURRENT)
            session.add(Row(owner="parent", n=round_))  # the parent goes on in the same transaction
            await session.flush()

        results = await asyncio.gather(child(), child(), child(), return_exceptions=True)
        assert [type(r) for r in results] == [list, ConcurrentUseError, ConcurrentUseError]
        # the refused calls never reached the driver: one statement per successful child
        assert sum(s == str(statement) for s in sent) == 4

        assert (await session.execute(select(func.count()).select_from(Row))).scalar() == 3
        await session.commit()
        assert await table(engine) == [("parent", 0), ("parent", 1), ("parent", 2)]
        await session.close()
        assert engine.pool.checkedout() == 0

    run(async_url, scenario)


def test_gather_children_in_a_scope_get_its_session_and_overlap_is_stopped(
    async_url: Any,
) -> None:
    url = async_url[0]
    statement = text("select pg_sleep(0.05)") if "asyncpg" in url else text("select 1")

    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        seen: list[Any] = []

        async def child(n: int) -> None:
            seen.append(Scoped())
            await Scoped.execute(statement)
            Scoped.add(Row(owner="child", n=n))

        line = line_here() + 1
        async with Scoped.scope() as session:
            tasks = [asyncio.create_task(child(n), name=f"scoped-{n}") for n in range(3)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert seen == [session] * 3
            assert results[0] is None
            for n in (1, 2):
                assert type(results[n]) is ConcurrentUseError
                assert str(results[n]).startswith(
                    f"asyncio task 'scoped-{n}' called AsyncSession.execute() while asyncio task "
                    f"'scoped-0' was inside the same AsyncSession ({created_at(line)})"
                )
            Scoped.add(Row(owner="scope", n=9))
            await Scoped.flush()
        assert engine.pool.checkedout() == 0
        assert await table(engine) == [("child", 0), ("scope", 9)]

    run(async_url, scenario)


# -- 3. legitimate borrowers ----------------------------------------------------------------------


def test_borrowers_that_inherited_the_owners_context_never_raise(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        session = Scoped()
        anchor = Row(owner="anchor", n=0)
        session.add(anchor)
        await session.commit()

        # wait_for / shield helper tasks (3.10, 3.11), children made after the session
        assert (await asyncio.wait_for(session.execute(select(Row.n)), 5)).scalar_one() == 0
        counted = await asyncio.shield(session.scalar(select(func.count()).select_from(Row)))
        assert counted == 1

        async def child(n: int) -> None:
            session.add(Row(owner="child", n=n))
            await session.flush()
            anchor.n += 1

        await asyncio.create_task(child(1), name="created")
        await asyncio.gather(child(2))
        if sys.version_info >= (3, 11):
            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
                group.create_task(child(3))
        else:
            await asyncio.gather(child(3))

        def in_thread() -> None:  # no I/O here: an AsyncSession's I/O needs the loop
            sync = session.sync_session
            sync.add(Row(owner="thread", n=4))
            assert sync.get(Row, anchor.id) is anchor  # from the identity map
            anchor.n += 1

        await asyncio.to_thread(in_thread)
        await session.commit()
        assert anchor.n == 4

        # a guarded sessionmaker: SQLAlchemy's own helper task closes (and commits) it
        maker = sessionscope.guard(async_sessionmaker(engine, expire_on_commit=False))
        async with maker() as own:
            own.add(Row(owner="maker", n=5))
            await own.commit()
            fresh = Intruder("fresh-context", empty_context=True)
            await fresh.refused(lambda: own.add(Row(owner="intruder", n=-1)))  # the guard is on
        async with maker.begin() as own:
            own.add(Row(owner="maker-begin", n=6))
        assert engine.pool.checkedout() == 0

        # and the owner's session is guarded too: only the borrowers above were let in
        message = await fresh.refused(lambda: session.add(Row(owner="intruder", n=-1)))
        assert "asyncio task 'fresh-context'" in message
        await fresh.stop()
        assert await table(engine) == [
            ("anchor", 4),
            ("child", 1),
            ("child", 2),
            ("child", 3),
            ("maker", 5),
            ("maker-begin", 6),
            ("thread", 4),
        ]

    run(async_url, scenario)


def test_a_task_cancelled_inside_execute_leaves_the_guard_free(async_url: Any) -> None:
    long = long_statement(async_url[0])

    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        session = Scoped()
        session.add(Row(owner="before", n=0))
        await session.commit()

        victim = asyncio.create_task(session.execute(long), name="victim")
        await asyncio.sleep(0)  # the victim runs until it awaits the driver: inside the session
        with pytest.raises(ConcurrentUseError, match="asyncio task 'victim' was inside"):
            await session.execute(select(1))
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        await session.rollback()
        session.add(Row(owner="after-cancel", n=1))
        await session.commit()

        # wait_for's timeout cancels its helper task (3.10, 3.11) or the owner (3.12+) inside
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(session.execute(long), 0.05)
        await session.rollback()
        session.add(Row(owner="after-timeout", n=2))
        await session.commit()

        # shield: the waiter is cancelled, the shielded call goes on and keeps the session
        inner = asyncio.create_task(session.execute(long), name="shielded")
        waiter = asyncio.create_task(asyncio.wait_for(asyncio.shield(inner), 5))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        with pytest.raises(ConcurrentUseError, match="asyncio task 'shielded' was inside"):
            session.add(Row(owner="too-early", n=-1))
        await inner
        session.add(Row(owner="after-shield", n=3))
        await session.commit()

        assert await table(engine) == [
            ("after-cancel", 1),
            ("after-shield", 3),
            ("after-timeout", 2),
            ("before", 0),
        ]
        await session.close()
        assert engine.pool.checkedout() == 0

    run(async_url, scenario)


# -- 4. the end of a unit -------------------------------------------------------------------------


def test_tasks_ending_without_remove_are_cleaned_up_without_guard_errors(
    async_url: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sessionscope")

    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        sessions: dict[int, AsyncSession] = {}

        async def worker(i: int) -> None:
            await Scoped.execute(select(1))  # holds a connection, in a transaction, to the end
            Scoped.add(Row(owner=f"w{i}", n=i))  # pending (SQLite: no write lock between tasks)
            sessions[i] = Scoped()
            if i == 1:
                raise ValueError("a failing task")
            if i == 2:
                await asyncio.sleep(30)  # cancelled

        tasks = [asyncio.create_task(worker(i), name=f"worker-{i}") for i in range(4)]
        while len(sessions) < 4:
            await asyncio.sleep(0.001)
        tasks[2].cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [type(r).__name__ for r in results] == [
            "NoneType",
            "ValueError",
            "CancelledError",
            "NoneType",
        ]
        await only_this_task_left()
        assert engine.pool.checkedout() == 0
        assert len(Scoped.registry) == 0
        assert all(not s.in_transaction() for s in sessions.values())
        assert all(not Session.new.fget(s.sync_session) for s in sessions.values())  # discarded
        assert await table(engine) == []

        # the guard was on: the owner task (their parent) may not use them
        for i, session in sessions.items():
            with pytest.raises(CrossUnitError) as refused:
                session.add(Row(owner="parent", n=i))
            assert "but asyncio task 'owner' called AsyncSession.add()" in str(refused.value)

    run(async_url, scenario)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_an_owner_ending_while_a_borrower_is_inside_still_gets_its_session_closed(
    async_url: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A child the owner did not wait for is still inside when the owner ends: the session is
    closed as the child leaves, not under it, its connection returned, and nobody (the child
    included) may use it afterwards: that would reopen a transaction nobody closes."""
    long = long_statement(async_url[0])

    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        borrowers: list[asyncio.Task[Any]] = []

        async def borrow(session: AsyncSession) -> list[Any]:
            rows = list((await session.execute(long)).all())
            with pytest.raises(CrossUnitError) as refused:
                session.add(Row(owner="late", n=1))
            assert "a unit of work that has ended" in str(refused.value)
            assert "asyncio task 'borrower' called AsyncSession.add()" in str(refused.value)
            return rows

        async def parent() -> None:
            session = Scoped()
            await session.execute(select(1))
            borrowers.append(asyncio.create_task(borrow(session), name="borrower"))
            await asyncio.sleep(0)  # the borrower is inside the session; the parent ends

        await asyncio.create_task(parent(), name="parent")
        assert len(await borrowers[0]) == 1
        await only_this_task_left()
        assert engine.pool.checkedout() == 0
        assert await table(engine) == []

    run(async_url, scenario)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# -- 5. moving a session on purpose ---------------------------------------------------------------


def test_hand_off_and_adopt_through_a_queue(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        inbox: asyncio.Queue[tuple[AsyncSession, asyncio.Task[None]]] = asyncio.Queue()
        refusals: list[str] = []

        async def consumer() -> None:  # created before the session
            session, producer = await inbox.get()
            await producer  # its end does not close what it handed off
            await asyncio.sleep(0)
            with pytest.raises(CrossUnitError) as refused:
                session.add(Row(owner="too-early", n=-1))
            refusals.append(str(refused.value))
            assert sessionscope.adopt(session) is session
            session.add(Row(owner="adopted", n=2))
            await session.commit()  # commits the producer's flushed row too
            refusals.append(await outsider.refused(lambda: session.add(Row(owner="x", n=-1))))
            await session.close()

        consuming = asyncio.create_task(consumer(), name="consumer")
        outsider = Intruder("outsider")

        async def producer() -> None:
            session = Scoped()
            session.add(Row(owner="handed", n=1))
            await session.flush()  # a transaction in progress moves with the session
            assert sessionscope.hand_off(session) is session
            assert Scoped() is not session  # the registry forgot it
            with pytest.raises(CrossUnitError, match="handed off"):
                await session.execute(select(1))
            inbox.put_nowait((session, asyncio.current_task()))  # type: ignore[arg-type]

        await asyncio.create_task(producer(), name="producer")
        await consuming
        await outsider.stop()
        assert "asyncio task 'consumer' called AsyncSession.add()" in refusals[0]
        assert "handed off" in refusals[0] and refusals[0].endswith(CROSS_UNIT)
        assert "asyncio task 'consumer'" in refusals[1]
        assert "but asyncio task 'outsider' called AsyncSession.add()" in refusals[1]
        assert await table(engine) == [("adopted", 2), ("handed", 1)]

    run(async_url, scenario)


def test_shared_session_serializes_read_modify_write_of_one_row(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        session = Scoped()
        counter = Row(owner="counter", n=0)
        session.add(counter)
        await session.commit()
        shared = sessionscope.SharedSession(session)
        assert Scoped() is not session
        inside: list[str] = []
        turns: list[str] = []

        async def increment(name: str) -> None:
            for _ in range(5):
                async with shared as s:
                    inside.append(name)
                    assert len(inside) == 1, inside
                    turns.append(name)
                    value = await s.scalar(select(Row.n).where(Row.id == counter.id))
                    await asyncio.sleep(0)  # every other task gets to run here
                    row = await s.get(Row, counter.id)
                    row.n = value + 1
                    await s.flush()
                    await asyncio.sleep(0)
                    inside.remove(name)

        names = [f"incrementer-{i}" for i in range(4)]
        await asyncio.gather(*(asyncio.create_task(increment(n), name=n) for n in names))
        assert Counter(turns) == {n: 5 for n in names}
        assert turns[:4] != [names[0]] * 4  # the tasks really took turns

        # outside a block nobody may use it, not even its creator
        with pytest.raises(CrossUnitError) as refused:
            await session.execute(select(1))
        assert "asyncio task 'owner' called AsyncSession.execute()" in str(refused.value)
        assert "SharedSession" in str(refused.value) and str(refused.value).endswith(CROSS_UNIT)
        with pytest.raises(CrossUnitError):
            counter.n = 0
        with pytest.raises(sa_exc.InvalidRequestError):
            sessionscope.hand_off(session)

        async with shared as s:
            await s.commit()
            await s.close()
        assert await table(engine) == [("counter", 20)]

    run(async_url, scenario)


# -- 6. modes ---------------------------------------------------------------------------------


def test_guard_warn_warns_and_lets_the_call_proceed(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        early = Intruder("early-task")
        session, line = Scoped(), line_here()
        anchor = Row(owner="anchor", n=0)
        session.add(anchor)
        await session.commit()

        with pytest.warns(ShareNothingWarning) as record:
            await early.call(lambda: session.add(Row(owner="warned-add", n=1)))
            await early.call(lambda: setattr(anchor, "n", 7))
            await early.call(lambda: session.execute(insert(Row).values(owner="warned-sql", n=2)))
        messages = [str(w.message) for w in record]
        for did in ("called AsyncSession.add()", "wrote Row.n", "called AsyncSession.execute()"):
            assert any(f"asyncio task 'early-task' {did}" in m for m in messages), did
        for message in messages:
            assert "asyncio task 'owner'" in message and created_at(line) in message
            assert message.endswith(CROSS_UNIT)
        await early.stop()

        await session.commit()
        assert await table(engine) == [("anchor", 7), ("warned-add", 1), ("warned-sql", 2)]

    run(async_url, scenario, guard="warn")


def test_warn_mode_warns_once_per_misuse_naming_the_call(async_url: Any) -> None:
    """Not again for what SQLAlchemy calls inside it (autoflush, identity lookups, expunge_all)."""

    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        early = Intruder("early-task")
        session = Scoped()
        anchor = Row(owner="anchor", n=0)
        session.add(anchor)
        await session.commit()
        calls: dict[str, Callable[[], Any]] = {
            "AsyncSession.add()": lambda: session.add(Row(owner="warned", n=1)),
            "AsyncSession.execute()": lambda: session.execute(select(Row)),  # autoflushes
            "AsyncSession.get()": lambda: session.get(Row, 12345),
            "AsyncSession.refresh()": lambda: session.refresh(anchor),
            "AsyncSession.merge()": lambda: session.merge(Row(id=anchor.id, owner="anchor", n=5)),
            "AsyncSession.commit()": session.commit,
            "AsyncSession.close()": session.close,
        }
        for name, call in calls.items():
            with pytest.warns(ShareNothingWarning) as record:
                await early.call(call)
            called = [re.findall(r"called (\S+\(\))", str(w.message)) for w in record]
            assert called == [[name]], (name, called)
        await early.stop()
        assert await table(engine) == [("anchor", 5), ("warned", 1)]

    run(async_url, scenario, guard="warn")


def test_guard_off_checks_nothing(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        Off = sessionscope.async_scoped_session(
            async_sessionmaker(engine, expire_on_commit=False), guard="off"
        )
        early = Intruder("early-task")
        guarded, unguarded = Scoped(), Off()
        assert type(unguarded.sync_session) is Session  # as SQLAlchemy makes it
        anchor = Row(owner="anchor", n=0)
        unguarded.add(anchor)
        await unguarded.commit()

        await early.refused(lambda: guarded.add(Row(owner="refused", n=-1)))
        await early.call(lambda: unguarded.add(Row(owner="off-add", n=1)))
        await early.call(lambda: setattr(anchor, "n", 7))
        await early.call(lambda: unguarded.execute(insert(Row).values(owner="off-sql", n=2)))
        await early.call(unguarded.commit)
        await early.stop()
        assert await table(engine) == [("anchor", 7), ("off-add", 1), ("off-sql", 2)]
        await Off.remove()

    run(async_url, scenario)


def test_guard_on_an_async_sessionmaker_and_on_sessions(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        early = Intruder("early-task")
        maker = async_sessionmaker(engine, expire_on_commit=False)
        assert sessionscope.guard(maker) is maker
        session, line = maker(), line_here()
        message = await early.refused(lambda: session.add(Row(owner="refused", n=-1)))
        assert "asyncio task 'owner'" in message and created_at(line) in message

        assert sessionscope.guard(session, "warn") is session
        with pytest.warns(ShareNothingWarning, match="'early-task' called AsyncSession.add()"):
            await early.call(lambda: session.add(Row(owner="warned", n=1)))
        sessionscope.guard(session, "off")
        await early.call(lambda: session.add(Row(owner="off", n=2)))  # no warning: they're errors
        await session.commit()
        await session.close()

        sessionscope.guard(maker, "warn")
        warned = maker()
        with pytest.warns(ShareNothingWarning):
            await early.call(lambda: warned.add(Row(owner="maker-warn", n=3)))
        await warned.commit()
        await warned.close()

        sessionscope.guard(maker, "off")
        unguarded = maker()
        assert type(unguarded.sync_session) is Session
        await early.call(lambda: unguarded.add(Row(owner="maker-off", n=4)))
        await unguarded.commit()
        await unguarded.close()

        plain, plain_line = sessionscope.guard(AsyncSession(engine)), line_here()
        message = await early.refused(lambda: plain.execute(select(1)))
        assert "'early-task' called AsyncSession.execute()" in message
        assert created_at(plain_line) in message
        await plain.close()
        with pytest.raises(sa_exc.ArgumentError):
            sessionscope.guard(maker, "loud")  # type: ignore[arg-type]
        await early.stop()
        assert await table(engine) == [
            ("maker-off", 4),
            ("maker-warn", 3),
            ("off", 2),
            ("warned", 1),
        ]

    run(async_url, scenario)


# -- 7. a sync scoped_session used from tasks ---------------------------------------------------


def test_a_sync_scoped_session_in_tasks_belongs_to_each_task(engine: Engine) -> None:
    is_sqlite = engine.dialect.name == "sqlite"
    long = text(SQLITE_COUNT) if is_sqlite else text("select pg_sleep(0.3)")
    Scoped = sessionscope.scoped_session(sessionmaker(engine, expire_on_commit=False))
    entered = threading.Event()

    @event.listens_for(engine, "before_cursor_execute")
    def mark(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement == str(long):
            entered.set()

    async def main() -> None:
        asyncio.current_task().set_name("main")  # type: ignore[union-attr]
        thief = Intruder("thief")  # exists before any of the sessions
        own: dict[str, Session] = {}

        async def task_a() -> None:
            session, line = Scoped(), line_here()
            own["A"] = session
            row = Row(owner="A", n=0)
            session.add(row)
            session.commit()

            for call, did in (
                (lambda: session.execute(select(Row)), "called Session.execute()"),
                (lambda: session.add(Row(owner="thief", n=-1)), "called Session.add()"),
                (session.commit, "called Session.commit()"),
                (session.close, "called Session.close()"),
                (lambda: setattr(row, "n", -1), "wrote Row.n on an object attached to it"),
            ):
                message = await thief.refused(call)
                assert f"asyncio task 'thief' {did}" in message
                assert "asyncio task 'A'" in message and created_at(line, "task_a") in message
                assert message.endswith(CROSS_UNIT)
            assert row.n == 0 and not session.new and not session.dirty

            # borrowers: a child task and a to_thread thread, both made after the session
            async def child() -> int:
                assert Scoped() is not session  # a task's implicit session is its own
                return session.execute(select(func.count()).where(Row.owner == "A")).scalar_one()

            assert await asyncio.create_task(child()) == 1
            count = select(func.count()).where(Row.owner == "A")
            assert await asyncio.to_thread(lambda: session.execute(count).scalar_one()) == 1

            # two borrowers at once: a thread inside a long statement, a child task calling
            async def late_child() -> None:
                while not entered.is_set():
                    await asyncio.sleep(0.002)
                session.execute(select(1))

            results = await asyncio.gather(
                asyncio.to_thread(lambda: session.execute(long).all()),
                asyncio.create_task(late_child(), name="A-child"),
                return_exceptions=True,
            )
            assert isinstance(results[0], list), results
            assert type(results[1]) is ConcurrentUseError, results
            assert str(results[1]).startswith(
                "asyncio task 'A-child' called Session.execute() while thread 'asyncio_"
            )
            session.add(Row(owner="A", n=1))
            session.commit()  # and ends without remove()

        async def task_b() -> None:
            session = Scoped()
            own["B"] = session
            session.add(Row(owner="B", n=0))
            session.commit()
            await asyncio.sleep(0)

        await asyncio.gather(
            asyncio.create_task(task_a(), name="A"), asyncio.create_task(task_b(), name="B")
        )
        await thief.stop()
        main_session = Scoped()
        assert len({id(own["A"]), id(own["B"]), id(main_session)}) == 3
        await asyncio.sleep(0)
        assert len(Scoped.registry) == 1  # main's: A's and B's were closed at their end
        with pytest.raises(CrossUnitError, match="but asyncio task 'main' called Session.add"):
            own["A"].add(Row(owner="main", n=-1))
        rows = main_session.execute(select(Row.owner, Row.n).order_by(Row.owner, Row.n)).all()
        assert [tuple(r) for r in rows] == [("A", 0), ("A", 1), ("B", 0)]
        Scoped.remove()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asyncio.run(main())
    assert engine.pool.checkedout() == 0
    assert len(Scoped.registry) == 0


# -- regressions: bugs found while writing these tests -------------------------------------------


@only_aiosqlite
def test_a_task_created_before_the_session_is_refused_even_if_the_owner_had_another(
    async_url: Any,
) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        first = Scoped()  # the owner's earlier session
        worker = Intruder("worker")  # made after `first`, before `second`
        second = sessionscope.guard(AsyncSession(engine))
        try:
            await worker.refused(lambda: second.execute(select(1)))
        finally:
            await worker.stop()
            await second.close()
            await first.close()

    run(async_url, scenario)


@only_aiosqlite
def test_warn_mode_points_at_the_applications_line_for_awaited_calls(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        early = Intruder("early-task")
        session = Scoped()
        with pytest.warns(ShareNothingWarning) as record:
            await early.call(lambda: session.flush())
        await early.stop()
        assert [os.path.basename(w.filename) for w in record] == [os.path.basename(__file__)]

    run(async_url, scenario, guard="warn")


@only_aiosqlite
def test_a_refused_backref_write_names_an_attribute_that_exists(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        early = Intruder("early-task")
        session = Scoped()
        parent = Parent(name="p", children=[])
        session.add(parent)
        await session.commit()
        message = await early.refused(lambda: Child(name="c", parent=parent))
        await early.stop()
        assert "wrote Parent.children" in message or "wrote Child.parent" in message, message

    run(async_url, scenario)
