"""``UnitLocal``: like ``threading.local``, but one value per concurrent unit, released at its end.

Where a unit's value lives is chosen for the speed of the lookup that every proxied call makes:

- greenlets, and threads through their main greenlet: in the greenlet's own ``__dict__``. A lookup
  is ``getcurrent().__dict__[key]``.
- asyncio and trio tasks (which take no attributes): in a dict keyed by the task itself, held
  strongly only until the task's end is reported.

Nothing is keyed by ``id()``. When a unit ends, ``on_end(value)`` runs exactly once (a registry
closes its session there), even if the application never says so. The signals: an asyncio
task's done-callback, trio's ``task_exited``, a thread's own teardown, gevent/eventlet links, and
for every greenlet a weak reference that fires when it is freed. Raw greenlets that finished
but are still referenced are swept whenever the number of live entries doubles.

Each live unit costs one small ``_Entry`` (which is also its end listener) and, for greenlets, one
weak reference: no closures per unit.
"""

from __future__ import annotations

import itertools
import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from greenlet import getcurrent, greenlet

from . import _fork
from ._units import (
    ThreadUnit,
    _thread,
    _trio,
    current_unit,
    describe_unit,
    is_finished,
    unwatch_unit_end,
    watch_unit_end,
)
from ._units._asyncio import _get_running_loop, current_task_of_loop
from ._units._greenlet import main_greenlet, run_outside_hub

T = TypeVar("T")

log = logging.getLogger("sessionscope")
_ids = itertools.count(1)
_modules = sys.modules
_all_locals: weakref.WeakSet[UnitLocal[Any]] = weakref.WeakSet()
_SWEEP_MIN = 64
_MISSING: Any = object()


class _Entry:
    """One unit's value in one ``UnitLocal``; also the listener told when the unit ends."""

    __slots__ = ("value", "local", "holder", "thread", "__weakref__")

    def __init__(self, value: Any, local: UnitLocal[Any], unit: Any, holder: Any) -> None:
        self.value = value
        self.local = local
        self.thread = unit if isinstance(unit, ThreadUnit) else None  # for error messages
        if isinstance(holder, greenlet):
            # Weak: a greenlet dies on its own. Being freed is an end signal too (raw greenlets
            # have no other), but a thread's main greenlet is freed late, on the main thread, so
            # a thread's end comes from its own teardown instead (see _units._thread).
            is_thread = holder.parent is None
            self.holder: Any = weakref.ref(holder, None if is_thread else self.unit_ended)
        else:
            self.holder = holder  # a task, strongly, until its end is reported

    def holder_object(self) -> Any:
        holder = self.holder
        return holder() if isinstance(holder, weakref.ref) else holder

    def unit_ended(self, *_: Any) -> None:
        """The end signal of any kind of unit; safe to receive more than once, anywhere."""
        run_outside_hub(self._end)

    def _end(self) -> None:
        self.local._end(self)

    def describe(self, holder: Any) -> str:
        if self.thread is not None:
            return describe_unit(self.thread)
        return "a greenlet that has been freed" if holder is None else describe_unit(holder)


class UnitLocal(Generic[T]):
    """One value per concurrent unit, with ``on_end(value)`` called when the unit ends."""

    def __init__(self, on_end: Callable[[T], None]) -> None:
        self._key = f"_sessionscope_local_{next(_ids)}"
        self._entry_key = self._key + "_entry"
        self._task_values: dict[Any, T] = {}
        self._task_entries: dict[Any, _Entry] = {}
        self._live: dict[_Entry, None] = {}
        self._on_end = on_end
        self._sweep_at = _SWEEP_MIN
        _all_locals.add(self)

    def get(self) -> T | None:
        """The current unit's value, or None. The hot path of every registry lookup.

        ``_registry.unit_session`` inlines this body (a call costs as much as the lookup); keep
        the two in step.
        """
        loop = _get_running_loop()
        if loop is not None:
            task = current_task_of_loop(loop)
            if task is not None:
                return self._task_values.get(task)
        if "trio" in _modules and _trio.running_task() is not None:
            return self._get_slow()
        value: T | None = getcurrent().__dict__.get(self._key)
        if value is None:
            return self._get_slow()
        return value

    def _get_slow(self) -> T | None:
        """Trio tasks and SQLAlchemy's internal greenlets outside a task: resolve the unit fully."""
        holder = _holder_of(current_unit())
        if isinstance(holder, greenlet):
            value: T | None = holder.__dict__.get(self._key)
            return value
        return self._task_values.get(holder)

    def set(self, value: T) -> None:
        """Make ``value`` the current unit's value (replacing, not ending, any previous one)."""
        unit = current_unit()
        holder = _holder_of(unit)
        entry = self._entry_of(holder)
        if entry is None:
            if len(self._live) >= self._sweep_at:
                self._sweep()
            entry = _Entry(value, self, unit, holder)
            self._live[entry] = None
            watch_unit_end(unit, entry)
        entry.value = value
        if isinstance(holder, greenlet):
            holder.__dict__[self._key] = value
            holder.__dict__[self._entry_key] = entry
        else:
            self._task_values[holder] = value
            self._task_entries[holder] = entry

    def pop(self) -> T | None:
        """Forget the current unit's value without ending it; return it (or None)."""
        unit = current_unit()
        entry = self._entry_of(_holder_of(unit))
        if entry is None:
            return None
        self._live.pop(entry, None)
        self._forget_storage(entry)
        unwatch_unit_end(unit, entry)
        value: T = entry.value
        return value

    def __len__(self) -> int:
        """How many units hold a value right now."""
        return len(self._live)

    def _entry_of(self, holder: Any) -> _Entry | None:
        if isinstance(holder, greenlet):
            entry: _Entry | None = holder.__dict__.get(self._entry_key)
            return entry
        return self._task_entries.get(holder)

    def _forget_storage(self, entry: _Entry) -> None:
        holder = entry.holder_object()
        if isinstance(holder, greenlet):
            holder.__dict__.pop(self._key, None)
            holder.__dict__.pop(self._entry_key, None)
        elif holder is not None:
            self._task_values.pop(holder, None)
            self._task_entries.pop(holder, None)
        entry.holder = None  # release a task held strongly, disarm a greenlet's weak reference

    def _end(self, entry: _Entry) -> None:
        """The unit of ``entry`` ended: forget it and hand its value to ``on_end``, once."""
        if self._live.pop(entry, _MISSING) is _MISSING:
            return
        holder = entry.holder_object()  # kept for the error message only
        self._forget_storage(entry)
        try:
            self._on_end(entry.value)
        except Exception:  # an end-of-unit hook must never break a loop, a hub or a thread exit
            log.exception("sessionscope: cleaning up after %s failed", entry.describe(holder))

    def _sweep(self) -> None:
        """End entries whose greenlet finished but is still referenced by the application."""
        for entry in list(self._live):
            holder = entry.holder_object()
            if holder is not None and is_finished(holder):
                self._end(entry)
        self._sweep_at = max(_SWEEP_MIN, 2 * len(self._live))

    def _forget_parent_units(self) -> list[Any]:
        abandoned = list(self._live)
        for entry in abandoned:
            self._forget_storage(entry)
        self._live.clear()
        self._task_values.clear()
        self._task_entries.clear()
        return abandoned


def _holder_of(unit: Any) -> Any:
    """The object that keeps ``unit``'s values: a thread's main greenlet, else the unit itself."""
    if isinstance(unit, ThreadUnit):
        assert _thread.is_current(unit), "a thread's storage is reached from that thread only"
        return main_greenlet()
    return unit


def _forget_all_after_fork() -> list[Any]:
    abandoned: list[Any] = []
    for local in list(_all_locals):
        abandoned.extend(local._forget_parent_units())
    return abandoned


_fork.on_fork_in_child(_forget_all_after_fork)
