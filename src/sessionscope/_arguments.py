"""Checking the arguments of sessionscope's public calls: one clear refusal per wrong argument.

A wrong argument that is let through fails later, somewhere else, with a message about something
else (``AttributeError: merge``, a bare ``AssertionError``, a log line at the end of a task), or
not at all (``hand_off(123)`` returned its argument). So each public call checks what it is given
and refuses it at once, saying, in SQLAlchemy's style, which call and argument, what it got (type
and a short repr), what it expects, how to fix it, and where the background is (docs/errors.md).

Which exception (docs/design.md, "Bad input"): :class:`sqlalchemy.exc.ArgumentError` for
SQLAlchemy's kinds of arguments (a session, a session factory, a ``scopefunc``, a guard mode), as
SQLAlchemy refuses ``create_engine(123)`` or ``select(object())``; :class:`TypeError` for plain
Python values (the flags, a lock, a unit, a function to decorate), as Python does.

The checks run in constructors and in calls made once per move of a session (``hand_off``,
``adopt``, ``copy_to``, ``SharedSession``), never on the hot paths (session lookups, guarded
calls).
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from typing import Any, NoReturn

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from .exc import background

SESSION = "a Session or an AsyncSession"
ASYNC_FACTORY = (
    "an async_sessionmaker, a sessionmaker(class_=AsyncSession), or a callable making AsyncSessions"
)

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 60


def got(value: object) -> str:
    """What a call was given, for a message: the type's name and a short repr."""
    if value is None:
        return "None"
    kind = type(value).__name__
    if type(value).__repr__ is object.__repr__:  # <module.kind object at 0x...> says no more
        return f"a {kind} object"
    return f"{kind} {_short.repr(value)}"


def message(
    call: str, name: str, value: object, expected: str, fix: str = "", anchor: str = "bad-argument"
) -> str:
    """``call: argument `name` expects ...; got ... . fix (Background ...)``."""
    text = f"{call}: argument `{name}` expects {expected}; got {got(value)}."
    if fix:
        text += " " + fix
    return f"{text} {background(anchor)}"


def refuse(
    error: type[Exception],
    call: str,
    name: str,
    value: object,
    expected: str,
    fix: str = "",
    anchor: str = "bad-argument",
) -> NoReturn:
    """Raise ``error`` with :func:`message`: the one way every check here refuses."""
    raise error(message(call, name, value, expected, fix, anchor))


def expect_session(call: str, name: str, value: object) -> None:
    """Refuse anything but a Session or an AsyncSession, guarded or not."""
    if not isinstance(value, Session | AsyncSession):
        refuse(sa_exc.ArgumentError, call, name, value, SESSION, what_it_is(value))


def what_it_is(value: object) -> str:
    """The usual confusion behind a non-session, and its fix."""
    if isinstance(value, scoped_session | async_scoped_session):
        return (
            "That is a registry of sessions, not a session: pass the current unit's session, "
            "`Session()` (call the registry)."
        )
    if isinstance(value, sessionmaker | async_sessionmaker):
        return "That is a session factory, not a session: pass a session it made, `factory()`."
    if isinstance(value, Engine | AsyncEngine | Connection | AsyncConnection):
        return "An engine or connection is not a session: pass `Session(engine)`."
    return ""


def expect_flags(call: str, **flags: object) -> None:
    """Refuse flags that are not True or False (``0``, ``None``, ``"no"`` read as a decision)."""
    for name, value in flags.items():
        if value is not True and value is not False:
            refuse(TypeError, call, name, value, "True or False")


def expect_scopefunc(call: str, value: object) -> None:
    """Refuse a ``scopefunc`` that cannot be called (SQLAlchemy would fail at the first lookup)."""
    if value is not None and not callable(value):
        refuse(
            sa_exc.ArgumentError,
            call,
            "scopefunc",
            value,
            "None or a function returning a hashable token",
            "Leave it out for one session per thread, greenlet and task.",
        )


def expect_factory(
    call: str, value: object, expected: str = "a sessionmaker", maker: str = "sessionmaker"
) -> None:
    """Refuse a session factory that cannot be called (an engine, None, a session)."""
    if callable(value):
        return
    if isinstance(value, Engine | AsyncEngine):
        fix = f"An engine is not a session factory: pass `{maker}(engine)`."
    elif isinstance(value, Session | AsyncSession):
        fix = "A session is not a session factory: pass the sessionmaker that made it."
    else:
        fix = ""
    refuse(sa_exc.ArgumentError, call, "session_factory", value, expected, fix)


_SYNC_FIX = (
    "An async_scoped_session awaits its sessions (close() at task end, commit() at a scope's end), "
    "and a sync Session's methods return no awaitable. Pass `async_sessionmaker(engine)`, or use "
    "`sessionscope.scoped_session` for sync sessions."
)


def async_session_factory(call: str, factory: object) -> Callable[..., Any]:
    """``factory``, checked to make AsyncSessions; a :class:`FirstSessionCheck` if it can't be.

    Makers and classes say what they make; any other callable is known only by what it returns,
    so its first session is checked at the call that makes it (not at the task's end, where an
    ``await`` on a sync session's ``close()`` fails).
    """
    if isinstance(factory, async_sessionmaker):
        return factory
    if isinstance(factory, sessionmaker):
        made = factory.class_
    elif isinstance(factory, type) and issubclass(factory, Session | AsyncSession):
        made = factory
    else:
        expect_factory(call, factory, ASYNC_FACTORY, "async_sessionmaker")
        return FirstSessionCheck(call, factory)  # type: ignore[arg-type]
    if not issubclass(made, AsyncSession):
        refuse(
            sa_exc.ArgumentError,
            call,
            "session_factory",
            factory,
            ASYNC_FACTORY,
            f"It makes {made.__name__}, a sync session. {_SYNC_FIX}",
            "bad-argument-sync-factory",
        )
    return factory


class FirstSessionCheck:
    """A session factory of an ``async_scoped_session`` that could only be checked by calling it.

    The first session it returns must be asynchronous (``_is_asyncio``, SQLAlchemy's own marker,
    which its ``scoped_session`` reads too); after that it only calls through. Attributes
    (``configure``, ``kw``) are the wrapped factory's, which is also ``__wrapped__``.
    """

    def __init__(self, call: str, factory: Callable[..., Any]) -> None:
        self.__wrapped__ = factory
        self._call = call
        self._checked = False

    def __call__(self, *args: Any, **kw: Any) -> Any:
        session = self.__wrapped__(*args, **kw)
        if not self._checked:
            if not getattr(session, "_is_asyncio", False):
                if isinstance(session, Session):
                    session.close()  # nothing checked out yet; nothing left behind either
                refuse(
                    sa_exc.ArgumentError,
                    self._call,
                    "session_factory",
                    self.__wrapped__,
                    ASYNC_FACTORY,
                    f"Its first session is {got(session)}. {_SYNC_FIX}",
                    "bad-argument-sync-factory",
                )
            self._checked = True
        return session

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__wrapped__, name)

    def __repr__(self) -> str:
        return repr(self.__wrapped__)
