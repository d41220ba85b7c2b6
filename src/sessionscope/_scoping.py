"""``sessionscope.scoped_session``: SQLAlchemy's ``scoped_session``, one Session per unit.

It *is* a ``sqlalchemy.orm.scoped_session`` subclass, so every proxy SQLAlchemy generates for the
installed version (2.0 or 2.1), ``query_property``, ``configure``, the errors and the warnings are
SQLAlchemy's own, forwarding arguments exactly as they do. Only the registry differs: without a
``scopefunc`` the scope is :func:`sessionscope.current_unit`, and the session of a unit that ends is
closed even if nobody calls ``remove()``. On top, ``scope()`` / ``scoped`` open explicit scopes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session as _sa_scoped_session
from sqlalchemy.util import warn_deprecated

from ._arguments import expect_factory, expect_flags, expect_scopefunc
from ._guard import Mode
from ._guard._state import speedups
from ._registry import UnitRegistry, unit_session
from ._scope import SessionScope
from ._session_end import close_at_unit_end
from ._unit_scoping import UnitScoping

_S = TypeVar("_S", bound=Session)


def _warn_asyncio() -> None:
    """SQLAlchemy's deprecation warning for an AsyncSession returned by a sync scoped_session."""
    warn_deprecated(
        "Using `scoped_session` with asyncio is deprecated and "
        "will raise an error in a future version. "
        "Please use `async_scoped_session` instead.",
        "1.4.23",
    )


class scoped_session(UnitScoping[_S], _sa_scoped_session[_S]):  # type: ignore[misc]
    """A drop-in ``sqlalchemy.orm.scoped_session`` whose default scope is the concurrent unit.

    :param session_factory: any callable making a session, usually a ``sessionmaker``.
    :param scopefunc: optional; as in SQLAlchemy, a function returning a hashable token that keys
     the session. Without it, each thread, greenlet, asyncio task and trio task gets its own
     session, closed when that unit ends.
    :param guard: the share-nothing guard on this registry's sessions (implicit and scopes'):
     ``"raise"`` (default) turns use from another unit into :class:`~sessionscope.CrossUnitError`
     and overlapping use into :class:`~sessionscope.ConcurrentUseError`; ``"warn"`` warns
     instead; ``"off"`` leaves sessions as SQLAlchemy makes them.
    """

    def __new__(cls, session_factory: Any = None, scopefunc: Any = None, **kw: Any) -> Any:
        if scopefunc is not None and cls is scoped_session:
            cls = _scopefunc_scoped_session
        return super().__new__(cls)

    def __init__(
        self,
        session_factory: Callable[..., _S],
        scopefunc: Callable[[], Any] | None = None,
        *,
        guard: Mode = "raise",
    ) -> None:
        expect_factory("scoped_session()", session_factory)
        expect_scopefunc("scoped_session()", scopefunc)
        self._set_up_registry(
            session_factory, scopefunc, guard=guard, on_unit_end=close_at_unit_end
        )

    def __call__(self, **kw: Any) -> _S:
        """Return the current unit's session, creating it if needed (as SQLAlchemy's).

        With keyword arguments and no session yet, a session is made with them; if one exists,
        SQLAlchemy's "Scoped session is already present" error is raised. A session that is an
        AsyncSession gets SQLAlchemy's deprecation warning here, on every call, as SQLAlchemy's
        ``__call__`` gives it (and its proxies do not): one attribute read more than
        ``UnitScoping.__call__``, the same frames as SQLAlchemy's ``__call__`` and registry.
        """
        if kw:
            return _sa_scoped_session.__call__(self, **kw)  # makes, sets and warns as SQLAlchemy
        session = unit_session(self)
        try:
            is_asyncio = session._is_asyncio
        except AttributeError:  # not a session: left alone (SQLAlchemy's __call__ would fail)
            return session
        if is_asyncio and not self._support_async:
            _warn_asyncio()
        return session

    _call_in_python = __call__
    """``__call__`` in Python: the reference, and what the C ``__call__`` (below the class) calls
    with arguments."""

    def remove(self) -> None:
        """Close and discard the current unit's implicit session, if any.

        Inside ``Session.scope()`` the scope's session is left alone: the block owns it and closes
        it when it ends.
        """
        registry = self.registry
        if type(registry) is UnitRegistry:
            registry.close_implicit(_close)  # (the same, with one lookup of the unit of work)
            return
        session = registry.implicit()
        if session is not None:
            session.close()
        registry.clear()

    _remove_in_python = remove
    """``remove()`` in Python: the reference, and what the C ``remove()`` (below the class)
    calls for a registry with an explicit ``scopefunc``."""

    def scope(self, *, new: bool = False, commit: bool = True, **kw: Any) -> SessionScope[_S]:
        """A block with its own session: commit on success, roll back on error, always close.

        :param new: start an independent session even inside another scope (which it otherwise
         joins).
        :param commit: ``False`` ends the block with a rollback instead (tests, read-only work).
        :param kw: passed to ``session_factory`` for this scope's session.
        """
        if new.__class__ is not bool or commit.__class__ is not bool:
            expect_flags("Session.scope()", new=new, commit=commit)
        return SessionScope(  # (_open_scope(), inlined, positionally: once per request)
            self._scope_var,
            self._make_session if self.session_factory is self._made_by else self.session_maker(),
            new,
            commit,
            kw,  # session_kw
            self.guard_mode,
            self.registry,  # lookup
        )


_close: Callable[[Any], object] = operator.methodcaller("close")
"""``session.close()`` (a C callable: no Python frame per ``remove()``)."""


if speedups is not None:  # every Session() and remove() in C, with no frame of their own
    speedups.configure_call(
        scoped_session._call_in_python,  # type: ignore[misc]
        _warn_asyncio,
        scoped_session._remove_in_python,  # type: ignore[misc]
        UnitRegistry,
        _close,
    )
    scoped_session.__call__ = speedups.call_method(scoped_session)  # type: ignore[method-assign]
    scoped_session.remove = speedups.remove_method(scoped_session)  # type: ignore[method-assign]


class _scopefunc_scoped_session(scoped_session[_S]):
    """``scoped_session(factory, scopefunc)``: SQLAlchemy's registry, SQLAlchemy's lookups."""

    _proxied = _sa_scoped_session._proxied
    __call__ = _sa_scoped_session.__call__
