"""Every public call refuses bad input at once, clearly, and leaves nothing behind.

Each refusal is the exact exception (``sqlalchemy.exc.ArgumentError`` for SQLAlchemy's kinds of
arguments, ``TypeError`` for plain values) and its message names the call's argument, what it got
and what it expects, and points into docs/errors.md. No connection stays checked out.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, exc, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import async_scoped_session as sa_async_scoped_session
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.orm.exc import UnmappedInstanceError

import sessionscope
from tests.models import Row


@pytest.fixture
def checked_engine(engine: Engine) -> Iterator[Engine]:
    """The suite's engine (SQLite file, PostgreSQL); afterwards no connection may be out."""
    yield engine
    assert engine.pool.checkedout() == 0


def refused(
    error: type[BaseException], argument: str, expects: str, got: str = ""
) -> Any:  # pytest.RaisesContext is private
    """``pytest.raises`` for a refusal naming ``argument``, what it ``expects`` and ``got``."""
    pattern = rf"argument `{re.escape(argument)}` expects .*{re.escape(expects)}.*; got "
    pattern += re.escape(got) + r".*docs/errors\.md#bad-argument"
    return pytest.raises(error, match=pattern)


NOT_SESSIONS = [
    pytest.param(None, "None", id="None"),
    pytest.param("x", "str 'x'", id="str"),
    pytest.param(123, "int 123", id="int"),
]


# -- sessions expected: SharedSession, hand_off, adopt, copy_to ---------------------------------


@pytest.mark.parametrize("call", ["SharedSession", "hand_off", "adopt"])
@pytest.mark.parametrize(("value", "shown"), NOT_SESSIONS)
def test_a_non_session_is_refused_where_a_session_is_expected(
    call: str, value: Any, shown: str
) -> None:
    with refused(exc.ArgumentError, "session", "a Session or an AsyncSession", shown):
        getattr(sessionscope, call)(value)


@pytest.mark.parametrize("call", ["SharedSession", "hand_off", "adopt"])
@pytest.mark.parametrize(
    "make_registry",
    [
        lambda e: sessionscope.scoped_session(sessionmaker(e)),
        lambda e: sa_scoped_session(sessionmaker(e)),
        lambda e: sessionscope.async_scoped_session(async_sessionmaker()),
        lambda e: sa_async_scoped_session(async_sessionmaker(), scopefunc=lambda: 1),
    ],
    ids=["ours", "sqlalchemy", "ours-async", "sqlalchemy-async"],
)
def test_a_registry_given_as_a_session_is_told_to_call_it(
    call: str, make_registry: Callable[[Engine], Any], checked_engine: Engine
) -> None:
    registry = make_registry(checked_engine)
    with refused(exc.ArgumentError, "session", "a Session", "a ") as caught:
        getattr(sessionscope, call)(registry)
    assert "registry of sessions" in str(caught.value)
    assert "`Session()`" in str(caught.value)


@pytest.mark.parametrize("call", ["SharedSession", "hand_off", "adopt", "copy_to"])
def test_a_sessionmaker_given_as_a_session_is_told_to_call_it(
    call: str, checked_engine: Engine
) -> None:
    args = (Row(owner="a", n=1),) if call == "copy_to" else ()
    with pytest.raises(exc.ArgumentError, match=r"session factory, not a session.*`factory\(\)`"):
        getattr(sessionscope, call)(sessionmaker(checked_engine), *args)


@pytest.mark.parametrize("call", [sessionscope.hand_off, sessionscope.adopt])
def test_an_unguarded_session_is_still_returned_unchanged(
    call: Callable[[Any], Any], checked_engine: Engine
) -> None:
    """guard="off" registries make such sessions; hand_off/adopt have nothing to move."""
    Off = sessionscope.scoped_session(sessionmaker(checked_engine), guard="off")
    for session in (Off(), Session(checked_engine), AsyncSession()):
        assert call(session) is session
    Off().execute(text("select 1"))
    Off.remove()


def test_shared_session_lock_must_be_a_blocking_lock(checked_engine: Engine) -> None:
    with refused(TypeError, "lock", "acquire() and release()", "int 1"):
        sessionscope.SharedSession(Session(checked_engine), lock=1)  # type: ignore[arg-type]
    with refused(TypeError, "lock", "`with` blocks", "Lock") as caught:
        sessionscope.SharedSession(Session(checked_engine), lock=asyncio.Lock())
    assert "leave `lock` out" in str(caught.value)
    session = Session(checked_engine)
    shared = sessionscope.SharedSession(session, lock=threading.RLock())
    with shared as s:
        s.execute(text("select 1"))
    with shared as s:
        s.close()


def test_shared_session_exit_without_enter_is_refused_and_releases_nothing(
    checked_engine: Engine,
) -> None:
    shared = sessionscope.SharedSession(Session(checked_engine))
    with pytest.raises(exc.InvalidRequestError, match="without being entered.*#guard-shared"):
        shared.__exit__(None, None, None)
    with pytest.raises(exc.InvalidRequestError, match=r"exited \(`async with`\) without"):
        asyncio.run(shared.__aexit__(None, None, None))
    with shared as session:  # still usable: the refused exits released nothing
        session.execute(text("select 1"))
    with pytest.raises(exc.InvalidRequestError, match="exited once more than entered"):
        shared.__exit__(None, None, None)
    with shared as session:
        session.close()


def test_shared_session_exit_of_the_other_kind_is_refused(checked_engine: Engine) -> None:
    shared = sessionscope.SharedSession(Session(checked_engine))

    async def main() -> None:
        session = await shared.__aenter__()
        with pytest.raises(exc.InvalidRequestError, match=r"exited \(`with`\)"):
            shared.__exit__(None, None, None)
        session.close()
        await shared.__aexit__(None, None, None)

    asyncio.run(main())


def test_copy_to_refuses_a_non_session_target_and_bad_arguments(checked_engine: Engine) -> None:
    row = Row(owner="a", n=1)
    for target, shown in [(None, "None"), ("x", "str 'x'"), (checked_engine, "Engine")]:
        with refused(exc.ArgumentError, "session", "a Session, an AsyncSession", shown):
            sessionscope.copy_to(target, row)  # type: ignore[call-overload]
    session = Session(checked_engine)
    with refused(TypeError, "load", "True or False", "str 'no'"):
        sessionscope.copy_to(session, row, load="no")  # type: ignore[call-overload]
    # what merge() cannot take stays SQLAlchemy's UnmappedInstanceError, naming the argument
    with refused(UnmappedInstanceError, "objects", "a mapped instance", "int 1"):
        sessionscope.copy_to(session, 1)
    with refused(UnmappedInstanceError, "objects[1]", "a mapped instance", "str 'x'"):
        sessionscope.copy_to(session, [row, "x"])
    assert not session.new and session.get_bind() is checked_engine
    session.close()


# -- units -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "shown"), [*NOT_SESSIONS, pytest.param(object(), "a object")])
def test_describe_unit_refuses_what_is_not_a_unit(value: Any, shown: str) -> None:
    with refused(TypeError, "unit", "sessionscope.current_unit()", shown):
        sessionscope.describe_unit(value)


def test_describe_unit_still_describes_every_kind_of_unit() -> None:
    import greenlet

    assert sessionscope.describe_unit(sessionscope.current_unit()).startswith("thread ")
    assert sessionscope.describe_unit(greenlet.greenlet(lambda: None)).startswith("greenlet ")

    async def task() -> str:
        return sessionscope.describe_unit(sessionscope.current_unit())

    assert asyncio.run(task()).startswith("asyncio task ")


def test_describe_unit_describes_a_trio_task() -> None:
    trio = pytest.importorskip("trio")

    async def main() -> str:
        return sessionscope.describe_unit(sessionscope.current_unit())

    assert trio.run(main).startswith("trio task ")


@pytest.mark.parametrize("call", [sessionscope.current_unit, sessionscope.unit_of_work])
def test_calls_without_arguments_refuse_arguments(call: Callable[..., Any]) -> None:
    with pytest.raises(TypeError, match=rf"{call.__name__}\(\) takes 0 positional arguments"):
        call(1)


# -- registries: construction ----------------------------------------------------------------------

REGISTRIES = pytest.mark.parametrize(
    ("registry_class", "call"),
    [
        (sessionscope.scoped_session, "scoped_session()"),
        (sessionscope.async_scoped_session, "async_scoped_session()"),
    ],
    ids=["sync", "async"],
)


@REGISTRIES
@pytest.mark.parametrize(
    ("value", "shown"), [*NOT_SESSIONS, pytest.param(Session(), "a Session object")]
)
def test_a_factory_that_cannot_be_called_is_refused(
    registry_class: Any, call: str, value: Any, shown: str
) -> None:
    with refused(exc.ArgumentError, "session_factory", "sessionmaker", shown) as caught:
        registry_class(value)
    assert str(caught.value).startswith(call)


@REGISTRIES
def test_an_engine_given_as_factory_is_told_to_wrap_it(
    registry_class: Any, call: str, checked_engine: Engine
) -> None:
    maker = "async_" if registry_class is sessionscope.async_scoped_session else ""
    with pytest.raises(exc.ArgumentError, match=rf"pass `{maker}sessionmaker\(engine\)`"):
        registry_class(checked_engine)


@REGISTRIES
@pytest.mark.parametrize(("value", "shown"), [(5, "int 5"), ("task", "str 'task'")])
def test_a_scopefunc_that_cannot_be_called_is_refused(
    registry_class: Any, call: str, value: Any, shown: str
) -> None:
    with refused(exc.ArgumentError, "scopefunc", "None or a function", shown):
        registry_class(async_sessionmaker(), value)


@REGISTRIES
@pytest.mark.parametrize(("value", "shown"), [("x", "'x'"), (None, "None"), (1, "1")])
def test_a_guard_mode_that_does_not_exist_is_refused(
    registry_class: Any, call: str, value: Any, shown: str
) -> None:
    """check_mode (_guard/_install.py) refuses it: ArgumentError naming `guard` and the value."""
    with pytest.raises(
        exc.ArgumentError, match="guard.* one of 'raise', 'warn' or 'off'"
    ) as caught:
        registry_class(async_sessionmaker(), guard=value)
    assert shown in str(caught.value)


# -- async_scoped_session with a sync factory ------------------------------------------------------


@pytest.mark.parametrize(
    "make_factory",
    [
        lambda e: sessionmaker(e),
        lambda e: sessionscope.guard(sessionmaker(e)),
        lambda e: Session,
    ],
    ids=["sessionmaker", "guarded-sessionmaker", "Session-class"],
)
def test_async_scoped_session_refuses_a_sync_maker_at_construction(
    make_factory: Callable[[Engine], Any], checked_engine: Engine
) -> None:
    with refused(exc.ArgumentError, "session_factory", "an async_sessionmaker") as caught:
        sessionscope.async_scoped_session(make_factory(checked_engine))
    assert "sync session" in str(caught.value)
    assert "#bad-argument-sync-factory" in str(caught.value)


@pytest.mark.parametrize(
    "make_factory",
    [
        lambda e: async_sessionmaker(e),
        lambda e: sessionmaker(e, class_=AsyncSession),
        lambda e: sessionscope.guard(sessionmaker(e, class_=AsyncSession)),
        lambda e: AsyncSession,
    ],
    ids=["async_sessionmaker", "sessionmaker-class_", "guarded", "AsyncSession-class"],
)
def test_async_scoped_session_takes_every_async_maker_as_it_is(
    make_factory: Callable[[Engine], Any],
) -> None:
    factory = make_factory(create_async_engine("sqlite+aiosqlite://"))
    assert sessionscope.async_scoped_session(factory).session_factory is factory


@pytest.mark.parametrize("scopefunc", [None, lambda: "key"], ids=["unit", "scopefunc"])
def test_a_callable_making_sync_sessions_fails_at_its_first_session_not_at_task_end(
    scopefunc: Any, checked_engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    def factory(**kw: Any) -> Session:
        return Session(checked_engine, **kw)

    Scoped = sessionscope.async_scoped_session(factory, scopefunc)
    assert Scoped.session_factory.__wrapped__ is factory

    async def task() -> None:
        with refused(exc.ArgumentError, "session_factory", "an async_sessionmaker", "function"):
            Scoped()
        with pytest.raises(exc.ArgumentError, match="first session is a Session object"):
            await Scoped.execute(text("select 1"))
        with pytest.raises(exc.ArgumentError, match="#bad-argument-sync-factory"):
            async with Scoped.scope():
                pass

    async def main() -> None:
        await asyncio.create_task(task())
        await asyncio.sleep(0.01)  # the task's end has run

    with caplog.at_level(logging.DEBUG, logger="sessionscope"):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_callable_making_async_sessions_is_checked_once_and_works(async_url: Any) -> None:
    url, connect_args = async_url
    made: list[AsyncSession] = []

    async def main() -> None:
        engine = create_async_engine(url, connect_args=connect_args)

        def factory(**kw: Any) -> AsyncSession:
            made.append(AsyncSession(engine, **kw))
            return made[-1]

        Scoped = sessionscope.async_scoped_session(factory)
        assert (await Scoped.execute(text("select 1"))).scalar() == 1
        assert Scoped() is made[0]
        async with Scoped.scope(new=True, info={"k": 1}) as session:
            assert session is made[1] and session.info == {"k": 1}
        await Scoped.remove()
        assert engine.pool.checkedout() == 0
        await engine.dispose()

    asyncio.run(main())


def test_the_wrapper_passes_attributes_through() -> None:
    def factory() -> AsyncSession:
        return AsyncSession()

    factory.kw = {"info": {}}  # type: ignore[attr-defined]
    Scoped = sessionscope.async_scoped_session(factory)
    assert Scoped.session_factory.kw == {"info": {}}
    assert repr(Scoped.session_factory) == repr(factory)


# -- scope flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "shown"), [("new", "x", "str 'x'"), ("commit", None, "None")]
)
def test_scope_flags_must_be_booleans(
    flag: str, value: Any, shown: str, checked_engine: Engine
) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(checked_engine))
    with refused(TypeError, flag, "True or False", shown) as caught:
        Scoped.scope(**{flag: value})
    assert str(caught.value).startswith("Session.scope()")
    AsyncScoped = sessionscope.async_scoped_session(async_sessionmaker())
    with refused(TypeError, flag, "True or False", shown):
        AsyncScoped.scope(**{flag: value})
    assert Scoped.registry.implicit() is None


def test_scoped_with_a_bad_flag_is_refused_by_the_time_it_runs(checked_engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(checked_engine))
    with refused(TypeError, "new", "True or False", "int 1"):

        @Scoped.scoped(new=1)  # type: ignore[arg-type]
        def work() -> None:
            Scoped.execute(text("select 1"))

        work()


def test_scoped_refuses_what_is_not_a_function(checked_engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(checked_engine))
    with refused(TypeError, "fn", "a function", "int 123"):
        Scoped.scoped(123)  # type: ignore[call-overload]


# -- guard() ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [None, "x", 123, sessionscope.scoped_session(sessionmaker())],
    ids=["None", "str", "int", "registry"],
)
def test_guard_refuses_what_is_not_a_session_or_a_maker(target: Any) -> None:
    with pytest.raises(exc.ArgumentError, match="a Session, an AsyncSession"):
        sessionscope.guard(target)


@pytest.mark.parametrize("mode", ["x", None, 1])
def test_guard_refuses_a_mode_that_does_not_exist(mode: Any) -> None:
    with pytest.raises(exc.ArgumentError, match="one of 'raise', 'warn' or 'off'"):
        sessionscope.guard(Session(), mode)


def test_guard_messages_name_the_argument_and_tell_a_registry_to_be_called() -> None:
    with refused(exc.ArgumentError, "target", "a Session", "int 123"):
        sessionscope.guard(123)
    with refused(exc.ArgumentError, "mode", "one of", "str 'x'"):
        sessionscope.guard(Session(), "x")  # type: ignore[arg-type]
    with refused(exc.ArgumentError, "guard", "one of", "str 'x'"):
        sessionscope.scoped_session(sessionmaker(), guard="x")  # type: ignore[arg-type]
    with pytest.raises(exc.ArgumentError, match=r"`Session\(\)`"):
        sessionscope.guard(sessionscope.scoped_session(sessionmaker()))
