"""``UnitLocal``: like ``threading.local``, but one value per concurrent unit, released at its end.

Where a unit's value lives is chosen for the speed of the lookup that every proxied call makes:

- greenlets, and threads through their main greenlet: in the greenlet's own ``__dict__``. The value
  dies with the greenlet; a lookup is ``getcurrent().__dict__.get(key)``.
- asyncio and trio tasks (which take no attributes): in a dict keyed by the task itself. The task
  is held strongly only until its done-callback (asyncio) or trio's ``task_exited`` removes it.

Nothing is keyed by ``id()``. When a unit ends, ``on_end(value)`` runs once (a registry closes its
session there), even if the application never says so; see :func:`watch_unit_end` for how each
kind of unit announces its end.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from greenlet import getcurrent, greenlet

from . import _fork
from ._units import ThreadUnit, current_unit, describe_unit, is_finished, watch_unit_end
from ._units import _trio
from ._units._asyncio import _get_running_loop, current_task_of_loop
from ._units._greenlet import main_greenlet_of_thread

T = TypeVar("T")

log = logging.getLogger("sessionscope")
_ids = itertools.count(1)
_all_locals: weakref.WeakSet[UnitLocal[Any]] = weakref.WeakSet()
_SWEEP_MIN = 64


class _Entry:
    """One unit's value, and how to forget it."""

    __slots__ = ("value", "holder_ref", "description", "cancel_watch", "__weakref__")

    def __init__(self, value: Any, holder: Any, description: str) -> None:
        self.value = value
        # The holder is the greenlet whose __dict__ keeps the value (a thread's main greenlet for a
        # thread), or the task. Tasks are held strongly until their end-callback fires; greenlets
        # weakly, since they die on their own.
        self.holder_ref: Callable[[], Any] = (
            weakref.ref(holder) if isinstance(holder, greenlet) else (lambda: holder)
        )
        self.description = description
        self.cancel_watch: Callable[[], None] = _noop


def _noop() -> None:
    pass


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
        """The current unit's value, or None. The hot path of every registry lookup."""
        loop = _get_running_loop()
        if loop is not None:
            task = current_task_of_loop(loop)
            if task is not None:
                return self._task_values.get(task)
        if _trio._run_context is not None or _trio._bind() is not None:
            if _trio.running_task() is not None:
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
        if entry is not None:
            entry.value = value
            self._store(holder, value, entry)
            return
        if len(self._live) >= self._sweep_at:
            self._sweep()
        entry = _Entry(value, holder, describe_unit(unit))
        self._store(holder, value, entry)
        self._live[entry] = None
        entry_ref = weakref.ref(entry)

        def on_unit_end() -> None:
            ended = entry_ref()
            if ended is not None:
                self._end(ended)

        entry.cancel_watch = watch_unit_end(unit, on_unit_end)

    def pop(self) -> T | None:
        """Forget the current unit's value without ending it; return it (or None)."""
        entry = self._entry_of(_holder_of(current_unit()))
        if entry is None:
            return None
        self._live.pop(entry, None)
        self._forget_storage(entry)
        entry.cancel_watch()
        value: T = entry.value
        return value

    def _entry_of(self, holder: Any) -> _Entry | None:
        if isinstance(holder, greenlet):
            return holder.__dict__.get(self._entry_key)
        return self._task_entries.get(holder)

    def _store(self, holder: Any, value: T, entry: _Entry) -> None:
        if isinstance(holder, greenlet):
            holder.__dict__[self._key] = value
            holder.__dict__[self._entry_key] = entry
        else:
            self._task_values[holder] = value
            self._task_entries[holder] = entry

    def __len__(self) -> int:
        """How many units hold a value right now."""
        return len(self._live)

    def values(self) -> list[T]:
        return [entry.value for entry in list(self._live)]

    def _forget_storage(self, entry: _Entry) -> None:
        holder = entry.holder_ref()
        if holder is None:
            return  # a freed greenlet took its __dict__ with it
        if isinstance(holder, greenlet):
            holder.__dict__.pop(self._key, None)
            holder.__dict__.pop(self._entry_key, None)
        else:
            self._task_values.pop(holder, None)
            self._task_entries.pop(holder, None)
        entry.holder_ref = _gone  # release a task held strongly

    def _end(self, entry: _Entry) -> None:
        """The unit of ``entry`` ended: forget it and hand its value to ``on_end``, once."""
        if self._live.pop(entry, _MISSING) is _MISSING:
            return
        self._forget_storage(entry)
        entry.cancel_watch()
        try:
            self._on_end(entry.value)
        except Exception:  # an end-of-unit hook must never break a loop, a hub or a thread exit
            log.exception("sessionscope: cleaning up after %s failed", entry.description)

    def _sweep(self) -> None:
        """End entries whose greenlet finished but is still referenced by the application."""
        for entry in list(self._live):
            holder = entry.holder_ref()
            if holder is not None and is_finished(holder):
                self._end(entry)
        self._sweep_at = max(_SWEEP_MIN, 2 * len(self._live))

    def _forget_parent_units(self) -> list[Any]:
        abandoned: list[Any] = []
        for entry in list(self._live):
            self._forget_storage(entry)
            abandoned.append(entry)
        self._live.clear()
        self._task_values.clear()
        self._task_entries.clear()
        return abandoned


_MISSING: Any = object()


def _gone() -> None:
    return None


def _holder_of(unit: Any) -> Any:
    """The object that keeps ``unit``'s values: a thread's main greenlet, else the unit itself."""
    if isinstance(unit, ThreadUnit):
        main = main_greenlet_of_thread(unit)
        assert main is not None, "a thread's storage is reached from that thread only"
        return main
    return unit


def _forget_all_after_fork() -> list[Any]:
    abandoned: list[Any] = []
    for local in list(_all_locals):
        abandoned.extend(local._forget_parent_units())
    return abandoned


_fork.on_fork_in_child(_forget_all_after_fork)
