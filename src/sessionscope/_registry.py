"""Registries that follow SQLAlchemy's protocol (``__call__``, ``has``, ``set``, ``clear``).

``UnitRegistry`` is the default: one session per concurrent unit, closed when the unit ends.
``ScopefuncRegistry`` is SQLAlchemy's own ``ScopedRegistry`` for an explicit ``scopefunc``. Both
answer with the active ``Session.scope()`` session first, so scopes work whatever the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Generic, TypeVar

import sys

from greenlet import getcurrent
from sqlalchemy.util import ScopedRegistry

from ._scope import ScopeState
from ._session_end import close_quietly_or_invalidate
from ._unit_local import UnitLocal
from ._units._asyncio import _get_running_loop, current_task_of_loop

_modules = sys.modules

S = TypeVar("S")


class UnitRegistry(Generic[S]):
    """One session per concurrent unit (see :func:`sessionscope.current_unit`)."""

    def __init__(
        self,
        createfunc: Callable[[], S],
        scope_var: ContextVar[ScopeState[S] | None],
        on_unit_end: Callable[[S], None] = close_quietly_or_invalidate,
    ) -> None:
        self.createfunc = createfunc
        self._scope_var = scope_var
        self._local: UnitLocal[S] = UnitLocal(on_unit_end)
        self._key = self._local._key
        self._task_values = self._local._task_values

    def __call__(self) -> S:
        # The hot path of every proxied call: UnitLocal.get() inlined, see there.
        scope = self._scope_var.get()
        if scope is not None:
            return scope.session_for_use()
        loop = _get_running_loop()
        if loop is not None:
            task = current_task_of_loop(loop)
            if task is not None:
                try:
                    return self._task_values[task]
                except KeyError:
                    return self._create()
        if "trio" not in _modules:
            try:
                return getcurrent().__dict__[self._key]  # type: ignore[no-any-return]
            except KeyError:
                pass
        session = self._local.get()
        return self._create() if session is None else session

    def _create(self) -> S:
        session = self.createfunc()
        self._local.set(session)
        return session

    def has(self) -> bool:
        """Whether the current unit has a session: its scope's, or an implicit one."""
        scope = self._scope_var.get()
        return (scope is not None and not scope.ended) or self._local.get() is not None

    def set(self, obj: S) -> None:
        self._local.set(obj)

    def clear(self) -> None:
        self._local.pop()

    def implicit(self) -> S | None:
        """The current unit's implicit session (not a scope's), or None."""
        return self._local.get()

    def __len__(self) -> int:
        """How many units hold an implicit session now."""
        return len(self._local)


class ScopefuncRegistry(ScopedRegistry[S]):
    """SQLAlchemy's ``ScopedRegistry`` keyed by the application's ``scopefunc``, scope-aware."""

    def __init__(
        self,
        createfunc: Callable[[], S],
        scopefunc: Callable[[], Any],
        scope_var: ContextVar[ScopeState[S] | None],
    ) -> None:
        super().__init__(createfunc, scopefunc)
        self._scope_var = scope_var

    def __call__(self) -> S:
        scope = self._scope_var.get()
        if scope is not None:
            return scope.session_for_use()
        return super().__call__()

    def has(self) -> bool:
        scope = self._scope_var.get()
        return (scope is not None and not scope.ended) or super().has()

    def implicit(self) -> S | None:
        return super().__call__() if super().has() else None
