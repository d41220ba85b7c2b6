"""Explicit scopes: commit, roll back, close; follow the context into handed-off work."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, exc, func, select
from sqlalchemy.orm import Session, sessionmaker

import sessionscope
from tests.models import Row


@pytest.fixture
def Scoped(engine: Engine) -> Iterator[Any]:
    registry = sessionscope.scoped_session(sessionmaker(engine))
    yield registry
    registry.remove()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def count_rows(engine: Engine, owner: str) -> int:
    """Counted on a connection of its own: what is committed, not what a session holds."""
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(Row).where(Row.owner == owner)) or 0


def test_a_successful_block_commits_and_closes(Scoped: Any, engine: Engine) -> None:
    implicit = Scoped()
    with Scoped.scope() as session:
        assert Scoped() is session and session is not implicit
        Scoped.add(Row(owner="ok", n=1))  # the proxies use the scope's session
        assert session.new
    assert count_rows(engine, "ok") == 1
    assert Scoped() is implicit  # the implicit session is back, untouched
    with pytest.raises(exc.InvalidRequestError, match="permanently closed"):
        session.execute(select(1))  # a scope's session can't be reused behind its back


def test_a_failing_block_rolls_back_and_the_exception_propagates_unchanged(
    Scoped: Any, engine: Engine
) -> None:
    error = LookupError("boom")
    with pytest.raises(LookupError) as raised:
        with Scoped.scope():
            Scoped.add(Row(owner="failed", n=1))
            Scoped.flush()  # on the server, inside the transaction
            raise error
    assert raised.value is error and raised.value.__context__ is None
    assert count_rows(engine, "failed") == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_commit_false_ends_with_a_rollback(Scoped: Any, engine: Engine) -> None:
    with Scoped.scope(commit=False):
        Scoped.add(Row(owner="dry-run", n=1))
        Scoped.flush()
        assert Scoped.scalar(select(func.count()).select_from(Row)) == 1
    assert count_rows(engine, "dry-run") == 0


def test_a_failing_commit_propagates_and_leaks_nothing(Scoped: Any, engine: Engine) -> None:
    with Scoped.scope() as session:
        session.add(Row(id=1, owner="first", n=1))
    with pytest.raises(exc.IntegrityError):
        with Scoped.scope() as session:
            session.add(Row(id=1, owner="duplicate", n=1))  # fails only at commit
    assert count_rows(engine, "duplicate") == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# Nested scopes (savepoints) are tested in test_nested_scopes.py, with SQLite's savepoint recipe.


def test_new_true_is_independent_of_the_enclosing_scope(Scoped: Any, engine: Engine) -> None:
    with pytest.raises(RuntimeError):
        with Scoped.scope() as outer:
            Scoped.add(Row(owner="outer", n=1))
            with Scoped.scope(new=True) as audit:
                assert audit is not outer and Scoped() is audit
                Scoped.add(Row(owner="audit", n=1))
            assert Scoped() is outer
            raise RuntimeError("the request fails after writing its audit record")
    assert count_rows(engine, "audit") == 1 and count_rows(engine, "outer") == 0


def test_scope_passes_session_arguments_to_the_factory(Scoped: Any) -> None:
    with Scoped.scope(info={"request": 7}) as session:
        assert session.info == {"request": 7}
        with pytest.raises(exc.InvalidRequestError, match="cannot take session arguments"):
            with Scoped.scope(info={"x": 1}):
                pass
        with pytest.raises(exc.InvalidRequestError, match="Scoped session is already present"):
            Scoped(info={"y": 2})


def test_the_decorator_runs_each_call_in_a_scope(Scoped: Any, engine: Engine) -> None:
    @Scoped.scoped
    def create(owner: str) -> Session:
        Scoped.add(Row(owner=owner, n=1))
        session: Session = Scoped()
        return session

    @Scoped.scoped(new=True, commit=False)
    def preview(owner: str) -> None:
        Scoped.add(Row(owner=owner, n=1))

    first, second = create("a"), create("b")
    preview("c")
    assert first is not second
    assert (count_rows(engine, "a"), count_rows(engine, "b"), count_rows(engine, "c")) == (1, 1, 0)
    assert create.__name__ == "create"


def test_the_decorator_refuses_what_it_cannot_scope(Scoped: Any) -> None:
    async def coroutine() -> None:
        pass

    def generator() -> Iterator[int]:
        yield 1

    with pytest.raises(TypeError, match="async_scoped_session"):
        Scoped.scoped(coroutine)
    with pytest.raises(TypeError, match="first yield"):
        Scoped.scoped(generator)


def test_the_scope_follows_the_context_into_work_it_waits_for(Scoped: Any, engine: Engine) -> None:
    anyio = pytest.importorskip("anyio")

    async def request() -> None:
        with Scoped.scope() as session:
            in_to_thread = await asyncio.to_thread(Scoped)
            in_anyio_pool = await anyio.to_thread.run_sync(Scoped)  # Starlette's thread pool
            loop = asyncio.get_running_loop()
            in_executor = await loop.run_in_executor(None, Scoped)  # copies no context
            await asyncio.to_thread(lambda: Scoped.add(Row(owner="offloaded", n=1)))
            assert in_to_thread is session and in_anyio_pool is session
            assert in_executor is not session
        assert count_rows(engine, "offloaded") == 1

    asyncio.run(request())


def test_a_thread_pool_running_copied_contexts_shares_the_scope(Scoped: Any) -> None:
    with Scoped.scope() as session, concurrent.futures.ThreadPoolExecutor(2) as pool:
        context = contextvars.copy_context()
        assert pool.submit(context.run, Scoped).result() is session
        assert pool.submit(Scoped).result() is not session  # no context copied: its own session


def outliving_worker(Scoped: Any) -> Callable[[], BaseException]:
    """Start a thread in a copy of this context; the result lets it ask for its session later.

    The thread is a unit that outlives a block it was handed off from; what it gets is the error
    it raised.
    """
    outcome: list[BaseException] = []
    started, ask_now = threading.Event(), threading.Event()

    def late_worker() -> None:
        started.set()
        ask_now.wait()
        try:
            Scoped()
        except BaseException as error:  # noqa: BLE001 - recorded for the assertion
            outcome.append(error)

    context = contextvars.copy_context()
    worker = threading.Thread(target=context.run, args=(late_worker,), name="late-worker")
    worker.start()
    started.wait()

    def ask() -> BaseException:
        ask_now.set()
        worker.join()
        (error,) = outcome
        return error

    return ask


def exit_in_a_thread(scope: Any) -> BaseException:
    """Exit ``scope`` from another thread (the misuse); what that raised."""
    errors: list[BaseException] = []

    def exit_elsewhere() -> None:
        try:
            scope.__exit__(None, None, None)
        except BaseException as error:  # noqa: BLE001 - returned for the assertion
            errors.append(error)

    thread = threading.Thread(target=exit_elsewhere, name="other-thread")
    thread.start()
    thread.join()
    (error,) = errors
    return error


def test_a_unit_that_outlives_the_scope_gets_a_clear_error(Scoped: Any) -> None:
    with Scoped.scope():
        ask = outliving_worker(Scoped)
    error = ask()
    assert isinstance(error, sessionscope.ScopeEndedError)
    assert isinstance(error, exc.InvalidRequestError)
    message = str(error)
    assert (
        "MainThread" in message
        and "late-worker" in message
        and "after the block had ended" in message
    )


def test_exiting_a_scope_from_another_unit_rolls_back_closes_and_raises(
    Scoped: Any, engine: Engine
) -> None:
    implicit = Scoped()
    scope = Scoped.scope()
    session = scope.__enter__()
    session.add(Row(owner="wrong-exit", n=1))
    session.flush()
    error = exit_in_a_thread(scope)
    assert isinstance(error, sessionscope.CrossUnitError)
    assert "MainThread" in str(error) and "other-thread" in str(error)
    assert "rolled back" in str(error)
    assert count_rows(engine, "wrong-exit") == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert Scoped() is implicit  # the opener is not left pointing at the ended scope
    assert Scoped.registry.has()
    Scoped.remove()
    assert Scoped() is not implicit
    with Scoped.scope() as again:
        assert again is not session
        again.add(Row(owner="next-scope", n=1))
    assert count_rows(engine, "next-scope") == 1


def test_after_a_wrong_unit_exit_of_an_inner_scope_the_outer_one_is_current_again(
    Scoped: Any, engine: Engine
) -> None:
    with Scoped.scope() as outer:
        independent = Scoped.scope(new=True)
        independent.__enter__().add(Row(owner="independent", n=1))
        assert isinstance(exit_in_a_thread(independent), sessionscope.CrossUnitError)
        assert Scoped() is outer
        outer.add(Row(owner="outer", n=1))
    assert count_rows(engine, "outer") == 1 and count_rows(engine, "independent") == 0


def test_a_scope_exited_in_another_context_of_its_own_unit_recovers_too(
    Scoped: Any, engine: Engine
) -> None:
    implicit = Scoped()
    scope = Scoped.scope()
    scope.__enter__().add(Row(owner="committed", n=1))
    contextvars.copy_context().run(scope.__exit__, None, None, None)  # same unit: no misuse
    assert Scoped() is implicit
    assert count_rows(engine, "committed") == 1


def test_a_unit_that_outlived_a_wrongly_exited_scope_still_gets_scope_ended(Scoped: Any) -> None:
    scope = Scoped.scope()
    scope.__enter__()
    ask = outliving_worker(Scoped)
    assert isinstance(exit_in_a_thread(scope), sessionscope.CrossUnitError)
    assert isinstance(ask(), sessionscope.ScopeEndedError)


def test_remove_inside_a_scope_leaves_the_scopes_session_alone(Scoped: Any) -> None:
    with Scoped.scope() as session:
        Scoped.add(Row(owner="kept", n=1))
        Scoped.remove()
        assert Scoped() is session and session.new


def test_scopes_of_two_registries_are_independent(engine: Engine) -> None:
    first = sessionscope.scoped_session(sessionmaker(engine))
    second = sessionscope.scoped_session(sessionmaker(engine))
    with first.scope() as session:
        assert second() is not session
    second.remove()


def test_a_scope_entered_twice_is_refused() -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(create_engine("sqlite://")))
    scope = Scoped.scope()
    with scope, pytest.raises(exc.InvalidRequestError, match="already entered"):
        scope.__enter__()
