"""``sessionscope.scoped_session``: SQLAlchemy's ``scoped_session``, one Session per unit.

It *is* a ``sqlalchemy.orm.scoped_session`` subclass, so every proxy SQLAlchemy generates for the
installed version (2.0 or 2.1), ``query_property``, ``configure``, the errors and the warnings are
SQLAlchemy's own, forwarding arguments exactly as they do. Only the registry differs: without a
``scopefunc`` the scope is :func:`sessionscope.current_unit`, and the session of a unit that ends is
closed even if nobody calls ``remove()``. On top, ``scope()`` / ``scoped`` open explicit scopes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, TypeVar, overload

from sqlalchemy.orm import Session
from sqlalchemy.orm import scoped_session as _sa_scoped_session

from ._registry import ScopefuncRegistry, UnitRegistry
from ._scope import ScopeState, SessionScope, scoped_decorator

_S = TypeVar("_S", bound=Session)
F = TypeVar("F", bound=Callable[..., Any])


class scoped_session(_sa_scoped_session[_S]):
    """A drop-in ``sqlalchemy.orm.scoped_session`` whose default scope is the concurrent unit.

    :param session_factory: any callable making a session, usually a ``sessionmaker``.
    :param scopefunc: optional; as in SQLAlchemy, a function returning a hashable token that keys
     the session. Without it, each thread, greenlet, asyncio task and trio task gets its own
     session, closed when that unit ends.
    """

    registry: UnitRegistry[_S] | ScopefuncRegistry[_S]  # type: ignore[assignment]

    def __init__(
        self,
        session_factory: Callable[..., _S],
        scopefunc: Callable[[], Any] | None = None,
    ) -> None:
        self.session_factory = session_factory  # type: ignore[assignment]
        self._scope_var: ContextVar[ScopeState[_S] | None] = ContextVar(
            "sessionscope.scope", default=None
        )
        if scopefunc:
            self.registry = ScopefuncRegistry(session_factory, scopefunc, self._scope_var)
        else:
            self.registry = UnitRegistry(session_factory, self._scope_var)

    def remove(self) -> None:
        """Close and discard the current unit's implicit session, if any.

        Inside ``Session.scope()`` the scope's session is left alone: the block owns it and closes
        it when it ends.
        """
        session = self.registry.implicit()
        if session is not None:
            session.close()
        self.registry.clear()

    def scope(self, *, new: bool = False, commit: bool = True, **kw: Any) -> SessionScope[_S]:
        """A block with its own session: commit on success, roll back on error, always close.

        :param new: start an independent session even inside another scope (which it otherwise
         joins).
        :param commit: ``False`` ends the block with a rollback instead (tests, read-only work).
        :param kw: passed to ``session_factory`` for this scope's session.
        """
        return SessionScope(
            self._scope_var, self.session_factory, new=new, commit=commit, session_kw=kw
        )

    @overload
    def scoped(self, fn: F, /) -> F: ...

    @overload
    def scoped(
        self, fn: None = None, /, *, new: bool = False, commit: bool = True, **kw: Any
    ) -> Callable[[F], F]: ...

    def scoped(
        self, fn: F | None = None, /, *, new: bool = False, commit: bool = True, **kw: Any
    ) -> Any:
        """Decorator form of :meth:`scope`: ``@Session.scoped`` or ``@Session.scoped(new=True)``."""
        return scoped_decorator(self.scope, fn, new=new, commit=commit, session_kw=kw)
