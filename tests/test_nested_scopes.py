"""Nested scopes work in SAVEPOINTs; a scope exited from the wrong task leaves its opener usable.

(The same for threads is in test_scope.py.) What is committed is always read on a connection of
its own, and every test ends with the pool empty. SQLite needs SQLAlchemy's recipe for SAVEPOINT
(the driver's own BEGIN handling switched off, SQLAlchemy emitting BEGIN), installed here on the
test engines.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, exc, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import sessionscope
from tests.models import Row


def savepoints_on_sqlite(engine: Engine) -> None:
    """SQLAlchemy's documented recipe for SAVEPOINT with pysqlite and aiosqlite."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def no_driver_transactions(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def emit_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")


@pytest.fixture
def Scoped(engine: Engine) -> Iterator[Any]:
    savepoints_on_sqlite(engine)
    registry = sessionscope.scoped_session(sessionmaker(engine))
    yield registry
    registry.remove()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def committed(engine: Engine) -> Counter[str]:
    """Rows per owner, read on a connection of its own: what is committed, not what is pending."""
    with engine.connect() as conn:
        return Counter(conn.scalars(select(Row.owner)).all())


def add(Scoped: Any, owner: str) -> None:
    """Add a row and flush it: the work is in the database, inside the current transaction."""
    Scoped.add(Row(owner=owner, n=1))
    Scoped.flush()


def test_a_failing_nested_block_rolls_back_only_its_own_work(Scoped: Any, engine: Engine) -> None:
    error = LookupError("inner failure")
    with Scoped.scope() as outer:
        add(Scoped, "outer")
        with pytest.raises(LookupError) as raised:
            with Scoped.scope() as inner:
                assert inner is outer and Scoped() is outer
                add(Scoped, "inner")
                raise error
        assert raised.value is error and raised.value.__context__ is None
        assert Scoped() is outer and outer.get_nested_transaction() is None
        add(Scoped, "after")
    assert committed(engine) == Counter({"outer": 1, "after": 1})


def test_a_successful_nested_block_leaves_the_decision_to_the_outer_one(
    Scoped: Any, engine: Engine
) -> None:
    with Scoped.scope():
        with Scoped.scope():
            add(Scoped, "inner")
        assert committed(engine) == Counter()  # released, not committed
    assert committed(engine) == Counter({"inner": 1})

    with pytest.raises(RuntimeError):
        with Scoped.scope():
            add(Scoped, "outer")
            with Scoped.scope():
                add(Scoped, "inner-2")
            raise RuntimeError("the outer block fails after the nested one succeeded")
    assert committed(engine) == Counter({"inner": 1})


def test_an_uncaught_nested_failure_rolls_back_the_outer_block_too(
    Scoped: Any, engine: Engine
) -> None:
    with pytest.raises(ValueError):
        with Scoped.scope():
            add(Scoped, "outer")
            with Scoped.scope():
                raise ValueError("inner failure, not caught")
    assert committed(engine) == Counter()


def test_commit_false_on_a_nested_scope_discards_its_work_even_on_success(
    Scoped: Any, engine: Engine
) -> None:
    with Scoped.scope():
        add(Scoped, "outer")
        with Scoped.scope(commit=False):
            add(Scoped, "preview")
            assert Scoped.scalar(select(Row.id).where(Row.owner == "preview")) is not None
        assert Scoped.scalar(select(Row.id).where(Row.owner == "preview")) is None
    assert committed(engine) == Counter({"outer": 1})


def test_three_levels(Scoped: Any, engine: Engine) -> None:
    with Scoped.scope():
        add(Scoped, "level-1")
        with Scoped.scope():
            add(Scoped, "level-2")
            with pytest.raises(KeyError):
                with Scoped.scope():
                    add(Scoped, "level-3")
                    raise KeyError("level 3 fails")
            with Scoped.scope():
                add(Scoped, "level-3-retry")
        with pytest.raises(KeyError):
            with Scoped.scope():
                add(Scoped, "level-2-b")
                with Scoped.scope():
                    add(Scoped, "level-3-b")  # released into level 2, which then fails
                raise KeyError("level 2 fails")
    assert committed(engine) == Counter({"level-1": 1, "level-2": 1, "level-3-retry": 1})


def test_scoped_functions_called_in_a_scope_run_in_savepoints(Scoped: Any, engine: Engine) -> None:
    @Scoped.scoped
    def record(owner: str, *, fail: bool = False) -> Session:
        add(Scoped, owner)
        if fail:
            raise ValueError(owner)
        session: Session = Scoped()
        return session

    with Scoped.scope() as outer:
        assert record("kept") is outer
        with pytest.raises(ValueError):
            record("failed", fail=True)
        add(Scoped, "outer")
    assert committed(engine) == Counter({"kept": 1, "outer": 1})
    assert record("alone") is not outer  # outside any scope: a scope of its own, committed
    assert committed(engine)["alone"] == 1


def test_new_true_is_independent_of_the_savepoints_around_it(Scoped: Any, engine: Engine) -> None:
    # The independent session writes first: on SQLite the other one would hold the write lock.
    with Scoped.scope() as outer:
        with pytest.raises(RuntimeError):
            with Scoped.scope():
                with Scoped.scope(new=True) as audit:
                    assert audit is not outer and audit.get_nested_transaction() is None
                    add(Scoped, "audit")
                assert committed(engine) == Counter({"audit": 1}) and Scoped() is outer
                add(Scoped, "inner")
                raise RuntimeError("the nested block fails after writing its audit record")
        add(Scoped, "outer")
    assert committed(engine) == Counter({"outer": 1, "audit": 1})


def test_a_nested_scope_before_any_transaction_autobegins_one(Scoped: Any, engine: Engine) -> None:
    with Scoped.scope() as outer:
        assert not outer.in_transaction()
        with pytest.raises(ValueError):
            with Scoped.scope():
                add(Scoped, "inner")
                raise ValueError("fails in the first statement's savepoint")
        with Scoped.scope():
            assert outer.in_nested_transaction()
            add(Scoped, "inner-2")
    assert committed(engine) == Counter({"inner-2": 1})


def test_a_block_that_ends_the_transaction_itself_leaves_nothing_to_release(
    Scoped: Any, engine: Engine
) -> None:
    with Scoped.scope():
        add(Scoped, "outer")
        with Scoped.scope():
            add(Scoped, "inner")
            Scoped.rollback()  # SQLAlchemy's rollback(): the whole transaction, savepoints too
        add(Scoped, "after-rollback")
        with pytest.raises(LookupError):
            with Scoped.scope():
                Scoped.commit()  # commits everything so far, as in SQLAlchemy
                raise LookupError("after the commit, nothing of this block is left to roll back")
    assert committed(engine) == Counter({"after-rollback": 1})


def test_a_swallowed_flush_error_surfaces_at_the_end_of_the_nested_block(
    Scoped: Any, engine: Engine
) -> None:
    with Scoped.scope() as outer:
        outer.add(Row(id=1000, owner="outer", n=1))
        outer.flush()
        with pytest.raises(exc.PendingRollbackError):
            with Scoped.scope():
                with pytest.raises(exc.IntegrityError):
                    outer.add(Row(id=1000, owner="duplicate", n=1))
                    outer.flush()  # the savepoint is rolled back: the block did not succeed
        assert outer.get_nested_transaction() is None
        add(Scoped, "after")  # the outer transaction is intact
    assert committed(engine) == Counter({"outer": 1, "after": 1})


def test_a_failed_release_propagates_and_closes_the_savepoint(Scoped: Any, engine: Engine) -> None:
    release_error = RuntimeError("RELEASE SAVEPOINT failed")

    def fail_release(conn: Any, name: str, context: Any) -> None:
        raise release_error

    event.listen(engine, "release_savepoint", fail_release)
    with pytest.raises(RuntimeError) as raised:
        with Scoped.scope() as outer:
            add(Scoped, "outer")
            try:
                with Scoped.scope():
                    add(Scoped, "inner")
            finally:
                assert outer.get_nested_transaction() is None
    assert raised.value is release_error
    assert committed(engine) == Counter()


def test_a_release_refused_by_postgresql_propagates(Scoped: Any, engine: Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("only PostgreSQL aborts a transaction on an error the block caught")
    with pytest.raises(exc.InternalError, match="aborted"):
        with Scoped.scope():
            add(Scoped, "outer")
            with Scoped.scope():
                add(Scoped, "inner")
                with pytest.raises(exc.ProgrammingError):
                    Scoped.execute(text("select * from no_such_table"))
    assert committed(engine) == Counter()


def test_an_outer_scope_ended_before_its_nested_one_rolls_back_and_says_so(
    Scoped: Any, engine: Engine
) -> None:
    implicit = Scoped()
    outer = Scoped.scope()
    outer.__enter__()
    add(Scoped, "outer")
    inner = Scoped.scope()
    inner.__enter__()
    add(Scoped, "inner")
    with pytest.raises(exc.InvalidRequestError, match=r"1 scope\(s\) nested in it were still open"):
        outer.__exit__(None, None, None)
    with pytest.raises(exc.InvalidRequestError, match="after a scope around it had ended"):
        inner.__exit__(None, None, None)
    with pytest.raises(exc.InvalidRequestError, match="already exited"):
        inner.__exit__(None, None, None)
    assert committed(engine) == Counter()
    assert Scoped() is implicit  # no scope is left set


def test_nested_scopes_exited_out_of_order_roll_back_and_the_outer_goes_on(
    Scoped: Any, engine: Engine
) -> None:
    with Scoped.scope():
        add(Scoped, "outer")
        first, second = Scoped.scope(), Scoped.scope()
        first.__enter__()
        add(Scoped, "first")
        second.__enter__()
        add(Scoped, "second")
        with pytest.raises(exc.InvalidRequestError, match="rolled back to its savepoint"):
            first.__exit__(None, None, None)
        with pytest.raises(exc.InvalidRequestError, match="after a scope around it had ended"):
            second.__exit__(None, None, None)
        add(Scoped, "after")
    assert committed(engine) == Counter({"outer": 1, "after": 1})


def test_a_nested_scope_in_work_the_block_waits_for_uses_a_savepoint_too(
    Scoped: Any, engine: Engine
) -> None:
    def offloaded(owner: str, *, fail: bool) -> None:
        with Scoped.scope():  # in a to_thread thread, a borrower of the block's session
            add(Scoped, owner)
            if fail:
                raise ValueError(owner)

    async def request() -> None:
        with Scoped.scope():
            add(Scoped, "outer")
            await asyncio.to_thread(offloaded, "offloaded", fail=False)
            with pytest.raises(ValueError):
                await asyncio.to_thread(offloaded, "failed", fail=True)

    asyncio.run(request())
    assert committed(engine) == Counter({"outer": 1, "offloaded": 1})


def test_a_nested_scope_still_refuses_session_arguments(Scoped: Any) -> None:
    with Scoped.scope() as outer:
        with pytest.raises(exc.InvalidRequestError, match="cannot take session arguments"):
            with Scoped.scope(info={"x": 1}):
                pass
        assert outer.get_nested_transaction() is None


# asyncio: the same, with AsyncSession.begin_nested() (aiosqlite and asyncpg).


def run_async(
    async_url: tuple[str, dict[str, Any]], scenario: Callable[[Any, AsyncEngine], Awaitable[None]]
) -> None:
    """Run ``scenario(Scoped, engine)`` in a fresh loop; afterwards the pool must be empty."""
    url, connect_args = async_url
    checked_out: list[int] = []

    async def main() -> None:
        engine = create_async_engine(url, connect_args=connect_args)
        savepoints_on_sqlite(engine.sync_engine)
        Scoped = sessionscope.async_scoped_session(
            async_sessionmaker(engine, expire_on_commit=False)
        )
        try:
            await scenario(Scoped, engine)
            await Scoped.remove()
            checked_out.append(engine.pool.checkedout())  # type: ignore[attr-defined]
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert checked_out == [0]


async def committed_async(engine: AsyncEngine) -> Counter[str]:
    async with engine.connect() as conn:
        return Counter((await conn.scalars(select(Row.owner))).all())


async def add_async(Scoped: Any, owner: str) -> None:
    Scoped.add(Row(owner=owner, n=1))
    await Scoped.flush()


def test_async_nested_scopes_use_savepoints(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        error = LookupError("inner failure")
        async with Scoped.scope() as outer:
            await add_async(Scoped, "outer")
            with pytest.raises(LookupError) as raised:
                async with Scoped.scope() as inner:
                    assert inner is outer
                    await add_async(Scoped, "inner")
                    raise error
            assert raised.value is error
            async with Scoped.scope():
                await add_async(Scoped, "released")
            async with Scoped.scope(commit=False):
                await add_async(Scoped, "preview")
            async with Scoped.scope():
                await add_async(Scoped, "level-2")
                with pytest.raises(KeyError):
                    async with Scoped.scope():
                        await add_async(Scoped, "level-3")
                        raise KeyError("level 3 fails")
            assert await committed_async(engine) == Counter()
        assert await committed_async(engine) == Counter({"outer": 1, "released": 1, "level-2": 1})

        with pytest.raises(RuntimeError):
            async with Scoped.scope():
                async with Scoped.scope(new=True):  # first: on SQLite the other holds the lock
                    await add_async(Scoped, "audit")
                await add_async(Scoped, "outer-2")
                async with Scoped.scope():
                    await add_async(Scoped, "inner-2")
                raise RuntimeError("the outer block fails after the nested ones succeeded")
        assert await committed_async(engine) == Counter(
            {"outer": 1, "released": 1, "level-2": 1, "audit": 1}
        )

    run_async(async_url, scenario)


def test_async_scoped_coroutines_nested_in_a_scope_run_in_savepoints(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        @Scoped.scoped
        async def record(owner: str, *, fail: bool = False) -> None:
            await add_async(Scoped, owner)
            if fail:
                raise ValueError(owner)

        async with Scoped.scope():
            await record("kept")
            with pytest.raises(ValueError):
                await record("failed", fail=True)
            await add_async(Scoped, "outer")
        assert await committed_async(engine) == Counter({"kept": 1, "outer": 1})

    run_async(async_url, scenario)


def test_async_a_cancelled_nested_block_rolls_back_its_savepoint(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        in_nested_block = asyncio.Event()

        async def request() -> None:
            async with Scoped.scope():
                await add_async(Scoped, "outer")
                with pytest.raises(asyncio.CancelledError):
                    async with Scoped.scope():
                        await add_async(Scoped, "cancelled")
                        in_nested_block.set()
                        await asyncio.sleep(10)
                await add_async(Scoped, "after")  # a request that handles its cancellation

        task = asyncio.create_task(request())
        await in_nested_block.wait()
        task.cancel()
        await task
        assert await committed_async(engine) == Counter({"outer": 1, "after": 1})

    run_async(async_url, scenario)


def test_async_an_outer_scope_ended_before_its_nested_one_rolls_back(async_url: Any) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        outer, inner = Scoped.scope(), Scoped.scope()
        await outer.__aenter__()
        await add_async(Scoped, "outer")
        await inner.__aenter__()
        await add_async(Scoped, "inner")
        with pytest.raises(exc.InvalidRequestError, match="were still open"):
            await outer.__aexit__(None, None, None)
        with pytest.raises(exc.InvalidRequestError, match="after a scope around it had ended"):
            await inner.__aexit__(None, None, None)
        assert await committed_async(engine) == Counter()

    run_async(async_url, scenario)


def test_async_after_a_wrong_task_exit_the_opener_gets_its_implicit_session(
    async_url: Any,
) -> None:
    async def scenario(Scoped: Any, engine: AsyncEngine) -> None:
        implicit = Scoped()
        scope = Scoped.scope()
        await scope.__aenter__()
        await add_async(Scoped, "wrong-exit")
        with pytest.raises(sessionscope.CrossUnitError, match="rolled back"):
            await asyncio.create_task(scope.__aexit__(None, None, None))
        assert Scoped() is implicit
        await Scoped.remove()
        assert Scoped() is not implicit
        async with Scoped.scope():
            await add_async(Scoped, "next-scope")
        assert await committed_async(engine) == Counter({"next-scope": 1})

    run_async(async_url, scenario)
