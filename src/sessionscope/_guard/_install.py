"""Guarding sessions and sessionmakers: ``sessionscope.guard()`` and what the registries call.

A guarded session is switched to its class's guarded variant and carries a
:class:`SessionGuard`; an AsyncSession is guarded through its ``sync_session``, where SQLAlchemy
runs all of its work (its own proxies and ``greenlet_spawn`` calls end there). A guarded
sessionmaker makes sessions that are guarded from birth, owned by the unit that called it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from .. import _fork, _fork_pools
from .._arguments import refuse, what_it_is
from .._extensions import load_extension
from .._work import WorkUnit
from . import _lineage, _site, _writes
from ._guarded_class import (
    _CACHE_ATTRIBUTE,
    GUARD_ATTRIBUTE,
    guarded_class,
    is_guarded_class,
    unguarded_class,
)
from ._handles import guard_session_state, move_shadowed, watch_flagging
from ._lineage import BorrowToken
from ._ownership import MODES, Mode, SessionGuard
from ._site import Site, application_site
from ._state import OWNED

T = TypeVar("T")
HandOffHook = Callable[[Any], None]


def check_mode(mode: object, call: str = "sessionscope.guard()", name: str = "mode") -> Mode:
    if not isinstance(mode, str) or mode not in MODES:
        refuse(sa_exc.ArgumentError, call, name, mode, "one of 'raise', 'warn' or 'off'")
    return mode  # type: ignore[return-value,unused-ignore]  # checked against MODES


def _sync_session_or_none(session: Any) -> Session | None:
    if isinstance(session, Session):
        return session
    if isinstance(session, AsyncSession):
        return session.sync_session
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
    guard: SessionGuard | None = getattr(sync, GUARD_ATTRIBUTE, None)
    return guard


GuardNewSession = Callable[[Any, Mode, "Site | None", "HandOffHook | None", WorkUnit, int], Any]


def _load_guard_setup() -> GuardNewSession | None:
    """``sessionscope._guard_setup.guard_new_session``, configured, or None (not built, or
    ``SESSIONSCOPE_NO_EXTENSIONS`` set): :func:`install`'s usual case in one C call."""
    _guard_setup: Any = load_extension("_guard_setup")
    if _guard_setup is None:  # not built, or turned off: the Python code below does it all
        return None
    _guard_setup.configure(
        SessionGuard,
        BorrowToken,
        _lineage,
        _writes,
        _fork,
        _fork_pools,
        _site,  # (its C frame walk is called directly, else its application_site())
        watch_flagging,
        OWNED,
        AsyncSession,
        WorkUnit,
    )
    guard_new_session: GuardNewSession = _guard_setup.guard_new_session
    return guard_new_session


guard_new_session = _load_guard_setup()
"""The C set-up of a new session's guard (None: not built). It takes the usual case (a session of
a guarded class, or an AsyncSession whose sync_session is, with no guard and no transaction yet,
made for a unit of work that is not a pool job's, in ``"raise"`` or ``"warn"`` mode) and returns
None, having done nothing, for any other: then :func:`install`'s Python code runs. The Python code
is the reference; ``tests/test_guard_setup.py`` compares the guards both make."""


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
    if guard_new_session is not None and work is not None:
        guarded = guard_new_session(session, mode, site, on_hand_off, work, depth)
        if guarded is not None:
            return guarded  # type: ignore[no-any-return]
    return install_in_python(session, mode, site, on_hand_off, work, depth + 1)


def install_in_python(
    session: T,
    mode: Mode,
    site: Site | None,
    on_hand_off: HandOffHook | None,
    work: WorkUnit | None,
    depth: int,
) -> T:
    """:func:`install` in Python: every case (``depth`` counted from this function's caller)."""
    if isinstance(session, Session):  # (_sync_session_or_none(), inlined: once per session)
        sync: Session = session
    elif isinstance(session, AsyncSession):
        sync = session.sync_session
    else:
        return session
    _fork_pools.remember_session(sync)  # whatever the mode: a forked child drops their pools
    if mode == "off":
        return session
    existing: SessionGuard | None = getattr(sync, GUARD_ATTRIBUTE, None)
    if existing is not None:  # made by a guarded sessionmaker: keep its mode, learn the registry
        if existing.on_hand_off is None:
            existing.on_hand_off = on_hand_off
        return session
    key = sync.hash_key  # (how the guard finds its session: see SessionGuard.session_ref)
    guard = SessionGuard(
        mode,
        type(session).__name__,
        site or application_site(depth + 1),
        work,
        on_hand_off,
        key,
        sync is not session,
    )
    cls = type(sync)
    if not is_guarded_class(cls):  # made by its own class (not born guarded): switched
        move_shadowed(sync, cls.__dict__.get(_CACHE_ATTRIBUTE) or guarded_class(cls))
    # an attribute like any other (never through __dict__: see _checks.checked_assignment)
    sync._sessionscope_guard = guard  # type: ignore[attr-defined]
    if sync._transaction is None:  # a new session: guard_session_state(), the short way
        watch_flagging(sync.identity_map, guard)
    else:
        guard_session_state(sync, guard)
    _writes.register()
    return session


def _set_mode(session: Any, mode: Mode) -> None:
    sync = sync_session_of(session)
    guard: SessionGuard | None = getattr(sync, GUARD_ATTRIBUTE, None)
    if guard is None:
        install(session, mode, site=application_site())
    elif mode == "off":
        guard.mode = "off"  # its handles (connection, transactions, results) keep a reference
        del sync._sessionscope_guard  # type: ignore[attr-defined]
        move_shadowed(sync, unguarded_class(type(sync)))
    else:
        guard.mode = mode


class _MakerView:
    """A sessionmaker's ``kw`` with another ``class_``: what its own ``__call__`` reads."""

    __slots__ = ("kw", "class_")

    def __init__(self, kw: dict[str, Any], class_: type[Any]) -> None:
        self.kw = kw
        self.class_ = class_


def born_guarded(factory: Callable[..., T], mode: Mode) -> Callable[..., T]:
    """What a registry or scope calls to make a session of ``factory`` (guarded in ``mode``).

    For a ``sessionmaker`` or ``async_sessionmaker`` (whose ``__call__`` is SQLAlchemy's), a
    callable making the same session, but as the guarded class from the start: the maker's own
    ``__call__`` runs on its ``kw`` (read at each call, so ``configure()`` applies) with the
    guarded class as ``class_`` (for an AsyncSession, as its ``sync_session_class``). A session
    switched to its guarded class after it was made works the same, but on CPython 3.11 its
    attribute values are laid out for the class it was made by, and reads of it in SQLAlchemy's
    own code cannot be specialized any more. With ``mode="off"`` the session is SQLAlchemy's,
    with its dispatch made up front as a plain attribute (:func:`inline_dispatch`). Any other
    factory is returned as it is; ``install()`` switches what it makes.
    """
    maker_call: Any = type(factory).__call__
    if maker_call is not sessionmaker.__call__ and maker_call is not async_sessionmaker.__call__:
        return factory
    maker: Any = factory
    call: Any = maker_call  # (SQLAlchemy's own __call__, run on a view of the maker)

    if mode == "off":

        def make_unguarded(**kw: Any) -> T:
            session = maker(**kw)
            sync = _sync_session_or_none(session)
            if sync is not None:
                inline_dispatch(sync)
            return session  # type: ignore[no-any-return]

        return make_unguarded

    last: tuple[Any, _MakerView | None] = (None, None)  # (class_, its view), replaced as one
    last_async: tuple[Any, dict[str, Any] | None, _MakerView | None] = (None, None, None)
    """(class_, a copy of the maker's kw, the view) of the last AsyncSession made."""

    def make(**kw: Any) -> T:
        nonlocal last, last_async
        made = maker.class_
        made_before, view = last
        if made is made_before and view is not None and view.kw is maker.kw:
            pass  # (the usual call: the same class and options as the last, no check needed)
        elif isinstance(made, type) and issubclass(made, Session):
            # (the view holds the maker's own kw: configure() updates it in place)
            view = _MakerView(maker.kw, guarded_class(made))
            last = (made, view)
        elif isinstance(made, type) and issubclass(made, AsyncSession):
            # its view holds a copy of the kw with another sync_session_class: reused while
            # the maker's kw still equal what it was copied from (configure() changes them)
            made_before, kw_before, view = last_async
            if made is not made_before or view is None or kw_before != maker.kw:
                sync_class = maker.kw.get("sync_session_class") or made.sync_session_class
                kw_guarded = {**maker.kw, "sync_session_class": guarded_class(sync_class)}
                view = _MakerView(kw_guarded, made)
                last_async = (made, dict(maker.kw), view)
        else:
            return maker(**kw)  # type: ignore[no-any-return]
        return call(view, **kw)  # type: ignore[no-any-return]

    return make


def inline_dispatch(session: Session) -> None:
    """Give a new session its own event dispatch now, as a plain attribute.

    SQLAlchemy makes it on first use and stores it with ``session.__dict__["dispatch"] = ...``;
    on CPython 3.11 asking for an instance's ``__dict__`` turns its inline attribute values into
    a dict that the specialized attribute reads of SQLAlchemy's own code cannot use (the guarded
    classes do the same through ``_handles._InlineDispatch``). Only for a session whose class's
    ``__init__`` is SQLAlchemy's: nothing can have made its dispatch yet.
    """
    cls: Any = type(session)
    if cls.__init__ is Session.__init__:
        session.dispatch = cls.dispatch._for_instance(session)


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
