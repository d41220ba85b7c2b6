"""Registries that follow SQLAlchemy's protocol (``__call__``, ``has``, ``set``, ``clear``).

``UnitRegistry`` is the default: one session per concurrent unit, ended with the unit.
``ScopefuncRegistry`` is SQLAlchemy's own ``ScopedRegistry`` for an explicit ``scopefunc``. Both
answer with the active ``Session.scope()`` session first, so scopes work whatever the registry.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy.util import ScopedRegistry

from . import _fork
from ._guard._state import speedups
from ._scope import ScopeState
from ._session_state import REMOVED_ATTRIBUTE
from ._unit_local import UnitLocal
from ._units import unit_outside_tasks
from ._units._asyncio import _get_running_loop, current_task_of_loop
from ._work import (
    WorkUnit,
    current_or_new_work,
    current_work,
    holding_values,
    open_implicit_work,
    open_task_work,
    running_task,
    work_of_task,
    work_var,
)

S = TypeVar("S")
_modules = sys.modules


class _FastLookup(Protocol[S]):
    """What :func:`unit_session` reads: a ``UnitRegistry``, or a scoped_session mirroring one."""

    _scope_var: ContextVar[ScopeState[S] | None]
    _key: str

    def _miss(self) -> S: ...


def _unit_session_in_python(holder: _FastLookup[S]) -> S:
    """The current unit's session: the hot path under every proxied call.

    It is ``UnitRegistry.__call__`` and, unchanged, the ``_proxied`` getter of sessionscope's
    scoped sessions, so a proxied call costs one Python frame as in SQLAlchemy (a call costs as
    much as this whole lookup); the C module's ``unit_session`` takes the same steps in none.
    It mirrors ``UnitLocal.get`` (the running code's unit of work, see ``_work``): anything
    unusual (no session yet, trio, a child task) goes to ``holder._miss()``. An ended work holds
    no values, so it misses too, and so does a parent process's (its fork generation is older:
    a forked child empties only its greenlets' works, see ``_work.holding_values``).
    """
    scope = holder._scope_var.get()
    if scope is not None:
        return scope.session_for_use()
    work = work_var.get()
    if work is not None:
        loop = _get_running_loop()
        if loop is None:
            if "trio" not in _modules:  # a thread or greenlet: in the work of its context
                try:
                    if work.generation == _fork.generation:
                        if work.value_key == holder._key:  # (the first value: see WorkUnit)
                            return work.value  # type: ignore[no-any-return]
                        return work.values[holder._key]  # type: ignore[index,no-any-return]
                except (KeyError, TypeError, ReferenceError):  # (None, or a pool job's ended
                    pass  # work, weakly held)
        else:
            try:
                # only the task that opened it
                if current_task_of_loop(loop) is work.task and work.generation == _fork.generation:
                    if work.value_key == holder._key:
                        return work.value  # type: ignore[no-any-return]
                    return work.values[holder._key]  # type: ignore[index,no-any-return]
            except (KeyError, TypeError, ReferenceError):
                pass
    return holder._miss()


unit_session: Callable[[_FastLookup[S]], S] = _unit_session_in_python
"""The lookup: the C module's ``unit_session`` (the same steps, in C, without a Python frame)
when it is built, else ``_unit_session_in_python``."""
if speedups is not None:
    unit_session = speedups.unit_session


class UnitRegistry(Generic[S]):
    """One session per concurrent unit (see :func:`sessionscope.current_unit`)."""

    def __init__(
        self,
        createfunc: Callable[[], S],
        scope_var: ContextVar[ScopeState[S] | None],
        on_unit_end: Callable[[S], None],
        on_create: Callable[[S, WorkUnit | None, int], None] | None = None,
        adopt_set: Callable[[S], None] | None = None,
    ) -> None:
        """``on_create(session, work, depth)`` is told the current unit of work too (None if
        none), and how many frames above it are sessionscope's own (for the guard's site)."""
        self.createfunc = createfunc
        self._scope_var = scope_var
        self._local: UnitLocal[S] = UnitLocal(on_unit_end)
        self._key = self._local._key
        self._on_create = on_create
        self._adopt_set = adopt_set

    __call__ = _unit_session_in_python  # (the C one, as a method, below the class)

    def _miss(self, _depth: int = 3) -> S:
        """The lookup's slow path. ``_depth``: how many frames from ``on_create``'s up are
        sessionscope's (3: ``on_create``, this one and the lookup, ``registry()``)."""
        scope = self._scope_var.get()
        if scope is not None:
            return scope.session_for_use()
        # UnitLocal.get(), with the work kept for what follows (one lookup per new session)
        work: Any = work_var.get()
        if not (  # current_work()'s usual answer without its calls: a thread or greenlet in
            # the work its context holds (a session made, then removed, as a thread makes many)
            type(work) is WorkUnit
            and not work.ended
            and work.generation == _fork.generation
            and _get_running_loop() is None
            and "trio" not in _modules
        ):
            loop = _get_running_loop()
            task = None if loop is None else current_task_of_loop(loop)
            if work is None and task is not None:  # an asyncio task's first session, in no
                work = open_task_work(task)  # work: what the calls below conclude, in one
            else:
                if task is None:
                    task = running_task()  # (trio's, or none)
                work = work_of_task(task)
                if work is None:  # the unit's first session: its unit of work now, for both
                    unit = task if task is not None else unit_outside_tasks()
                    work = open_implicit_work(unit, task)
        key = self._key
        values = work.values  # (work.get_value(key), inlined)
        session: S | None = (
            work.value if work.value_key == key else None if values is None else values.get(key)
        )
        if session is not None:
            return session
        session = self.createfunc()
        if work.ended:  # (ended meanwhile)
            work = current_or_new_work()
        if self._on_create is not None:
            self._on_create(session, work, _depth)
        if work.value_key is None and work.values is None:
            # UnitLocal.set(session, work) where the work holds nothing yet: its steps, without
            # its frame
            work.value_key, work.value = key, session
            local = self._local
            local._count += 1
            if type(work.root) is weakref.ref:  # a greenlet's work (see holding_values)
                holding_values[weakref.ref(work)] = None
                local.greenlet_holds()
        else:
            self._local.set(session, work)
        return session

    def has(self) -> bool:
        """Whether the current unit has a session: its scope's, or an implicit one."""
        scope = self._scope_var.get()
        return (scope is not None and not scope.ended) or self._local.get() is not None

    def set(self, obj: S) -> None:
        if self._adopt_set is not None:
            self._adopt_set(obj)
        self._local.set(obj)

    def clear(self) -> None:
        self._local.pop()

    def close_implicit(self, close: Callable[[S], object]) -> None:
        """``close(session)`` of the current unit's implicit session, if any, then forget it:
        ``remove()``, with one lookup of the unit of work (a close that raises forgets
        nothing, as ``implicit()``, close, ``clear()`` would)."""
        work: Any = work_var.get()
        # current_work()'s usual answer without its calls, as in _miss (an ended work holds no
        # values: nothing is closed or forgotten, as when current_work() says None; a parent
        # process's may, and is not this process's to close)
        loop = _get_running_loop()
        if (
            type(work) is not WorkUnit
            or work.generation != _fork.generation
            or (loop is None and "trio" in _modules)
            or (loop is not None and (work.ended or current_task_of_loop(loop) is not work.task))
        ):
            work = current_work()
            if work is None:
                return
        key = self._key
        if work.value_key == key and type(work.root) is not weakref.ref:
            # UnitLocal.pop(work) of the work's first value, not a greenlet's: its steps,
            # without its frame (after the close: a close that raises forgets nothing)
            session = work.value
            if session is not None:
                close(session)
            work.value_key = work.value = None
            self._local._count -= 1
        else:
            session = work.get_value(key)
            if session is not None:
                close(session)
            self._local.pop(work)
        if session is not None:
            # the mark _session_state.closed_already reads: its unit's end need not close it
            # again for nothing (an object that takes no attribute is no guarded session, and
            # no unit's end closes it)
            try:  # noqa: SIM105 - contextlib.suppress() would be 3 more calls per remove()
                setattr(session, REMOVED_ATTRIBUTE, True)
            except AttributeError:
                pass

    def forget(self, session: S) -> None:
        """Stop holding ``session`` for the current unit (it was handed off), without closing it."""
        if self._local.get() is session:
            self._local.pop()

    def implicit(self) -> S | None:
        """The current unit's implicit session (not a scope's), or None."""
        return self._local.get()

    def __len__(self) -> int:
        """How many units hold an implicit session now."""
        return len(self._local)


if speedups is not None:
    UnitRegistry.__call__ = speedups.lookup_method(UnitRegistry)  # type: ignore[method-assign]


class ScopefuncRegistry(ScopedRegistry[S]):
    """SQLAlchemy's ``ScopedRegistry`` keyed by the application's ``scopefunc``, scope-aware."""

    def __init__(
        self,
        createfunc: Callable[[], S],
        scopefunc: Callable[[], Any],
        scope_var: ContextVar[ScopeState[S] | None],
        adopt_set: Callable[[S], None] | None = None,
    ) -> None:
        super().__init__(createfunc, scopefunc)
        self._scope_var = scope_var
        self._adopt_set = adopt_set

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

    def set(self, obj: S) -> None:
        if self._adopt_set is not None:
            self._adopt_set(obj)
        super().set(obj)

    def forget(self, session: S) -> None:
        """Stop holding ``session`` under the current key (it was handed off), without closing."""
        if self.implicit() is session:
            self.clear()
