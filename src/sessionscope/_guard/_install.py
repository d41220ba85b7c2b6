"""Guarding sessions and sessionmakers: ``sessionscope.guard()`` and what the registries call.

A guarded session is switched to its class's guarded variant and carries a
:class:`SessionGuard`; an AsyncSession is guarded through its ``sync_session``, where SQLAlchemy
runs all of its work (its own proxies and ``greenlet_spawn`` calls end there). A guarded
sessionmaker makes sessions that are guarded from birth, owned by the unit that called it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .. import _fork_pools
from .._arguments import refuse, what_it_is
from .._work import WorkUnit
from . import _writes
from ._guarded_class import _CACHE_ATTRIBUTE, GUARD_ATTRIBUTE, guarded_class, unguarded_class
from ._handles import guard_session_state, watch_flagging
from ._ownership import MODES, Mode, SessionGuard
from ._site import Site, application_site

T = TypeVar("T")
HandOffHook = Callable[[Any], None]


def check_mode(mode: object, call: str = "sessionscope.guard()", name: str = "mode") -> Mode:
    if not isinstance(mode, str) or mode not in MODES:
        refuse(sa_exc.ArgumentError, call, name, mode, "one of 'raise', 'warn' or 'off'")
    return mode  # type: ignore[return-value,unused-ignore]  # checked against MODES


def _sync_session_or_none(session: Any) -> Session | None:
    if isinstance(session, AsyncSession):
        return session.sync_session
    if isinstance(session, Session):
        return session
    return None


def sync_session_of(session: Any) -> Session:
    sync = _sync_session_or_none(session)
    if sync is None:
        refuse(
            sa_exc.ArgumentError,
            "sessionscope.guard()",
            "target",
            session,
            "a Session, an AsyncSession, a sessionmaker or an async_sessionmaker",
            what_it_is(session),
        )
    return sync


def guard_of(session: Any) -> SessionGuard | None:
    """The guard of a Session or AsyncSession; None when it is not guarded (or not a session)."""
    sync = _sync_session_or_none(session)
    if sync is None:
        return None
    guard: SessionGuard | None = sync.__dict__.get(GUARD_ATTRIBUTE)
    return guard


def install(
    session: T,
    mode: Mode,
    *,
    site: Site | None = None,
    on_hand_off: HandOffHook | None = None,
    work: WorkUnit | None = None,
    depth: int = 1,
) -> T:
    """Guard a new session, owned by the running unit (a no-op for ``"off"`` or if guarded).

    What a registry's factory makes that is not a Session or AsyncSession is left alone, as
    SQLAlchemy's registries accept any factory. ``work`` is the running code's unit of work if
    the caller has it at hand; ``depth`` is where the search for the application's frame (the
    "created at" site) may start, counted from this function's caller (``1``): callers whose own
    frames up to there are all sessionscope's say so, and the walk is shorter.
    """
    sync = _sync_session_or_none(session)
    if sync is None:
        return session
    _fork_pools.remember_session(sync)  # whatever the mode: a forked child drops their pools
    if mode == "off":
        return session
    existing: SessionGuard | None = sync.__dict__.get(GUARD_ATTRIBUTE)
    if existing is not None:  # made by a guarded sessionmaker: keep its mode, learn the registry
        if existing.on_hand_off is None:
            existing.on_hand_off = on_hand_off
        return session
    guard = SessionGuard(mode, type(session).__name__, site or application_site(depth + 1), work)
    guard.on_hand_off = on_hand_off
    guard.session_ref = weakref.ref(session)
    sync.info  # noqa: B018 - memoized now: the guarded class only checks its assignment
    sync.__dict__[GUARD_ATTRIBUTE] = guard
    cls = type(sync)
    guarded = cls.__dict__.get(_CACHE_ATTRIBUTE) or guarded_class(cls)
    if cls is not guarded:
        sync.__class__ = guarded
    if sync._transaction is None:  # a new session: guard_session_state(), the short way
        watch_flagging(sync.identity_map, guard)
    else:
        guard_session_state(sync, guard)
    token = guard.token
    assert token is not None  # (just owned)
    _writes.register(sync.hash_key, token)
    return session


def _set_mode(session: Any, mode: Mode) -> None:
    sync = sync_session_of(session)
    guard: SessionGuard | None = sync.__dict__.get(GUARD_ATTRIBUTE)
    if guard is None:
        install(session, mode, site=application_site())
    elif mode == "off":
        guard.mode = "off"  # its handles (connection, transactions, results) keep a reference
        sync.__class__ = unguarded_class(type(sync))
        del sync.__dict__[GUARD_ATTRIBUTE]
        _writes.unregister(sync.hash_key)
    else:
        guard.mode = mode


_MAKER_MODE = "_sessionscope_guard_mode"
_MAKER_BASE = "_sessionscope_unguarded_maker_class"


def _guarding_class(cls: type[Any], mode: Mode) -> type[Any]:
    """A subclass of a sessionmaker's ``class_`` whose sessions are guarded at birth."""
    base = cls.__dict__.get(_MAKER_BASE, cls)

    def __init__(self: Any, *args: Any, **kw: Any) -> None:
        base.__init__(self, *args, **kw)
        install(self, mode, site=application_site())

    return type(
        base.__name__,
        (base,),
        {
            "__init__": __init__,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
            _MAKER_MODE: mode,
            _MAKER_BASE: base,
        },
    )


def guard(target: T, mode: Mode = "raise") -> T:
    """Enforce share-nothing on a session, an AsyncSession, or the sessions of a sessionmaker.

    - A ``Session`` or ``AsyncSession`` not yet guarded becomes owned by the unit calling this;
      for one already guarded (every session of sessionscope's registries and scopes) only the
      mode changes.
    - A ``sessionmaker`` or ``async_sessionmaker``: every session it makes from now on is guarded
      and owned by the unit that makes it.

    :param mode: ``"raise"`` (misuse raises :class:`~sessionscope.CrossUnitError` or
     :class:`~sessionscope.ConcurrentUseError`), ``"warn"`` (a
     :class:`~sessionscope.exc.ShareNothingWarning`, and the call proceeds) or ``"off"``.
    :return: ``target``, for chaining: ``session = guard(Session(engine))``.
    """
    mode = check_mode(mode)
    if isinstance(target, (sessionmaker, async_sessionmaker)):
        _fork_pools.remember_factory(target)
        base = target.class_.__dict__.get(_MAKER_BASE, target.class_)
        target.class_ = base if mode == "off" else _guarding_class(base, mode)
        return target
    _set_mode(target, mode)
    return target
