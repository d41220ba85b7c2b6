"""``UnitLocal``: like ``threading.local``, but one value per unit of work, released at its end.

Values live in the running code's :class:`~sessionscope._work.WorkUnit` (``work.get_value(key)``),
which a context variable carries: a thread, greenlet or task outside any boundary has an implicit
unit of work of its own; a request or job marked with ``unit_of_work()`` has its own; and jobs a
unit waits for (pool jobs running in a copy of its context) share it. When the unit of work ends,
``on_end(value)`` runs exactly once (a registry closes its session there), even if the
application never says so.

Raw greenlets announce nothing when they finish; a finished raw greenlet that the application
still references keeps its work (and context) alive, so those are swept whenever the number of
live values doubles.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from greenlet import greenlet

from . import _fork
from ._work import (
    WorkUnit,
    current_or_new_work,
    current_work,
    holding_values,
    register_end_hook,
)

T = TypeVar("T")

_ids = itertools.count(1)
_SWEEP_MIN = 64
_all_locals: weakref.WeakSet[UnitLocal[Any]] = weakref.WeakSet()


class UnitLocal(Generic[T]):
    """One value per unit of work, with ``on_end(value)`` called when the work ends.

    The values live in the works themselves; the local only counts them (``len()``), and
    counts apart those held by the works of greenlets: a raw greenlet's end goes unannounced, and
    the sweep (:meth:`_sweep`) also ends a finished gevent greenlet's work before the hub runs its
    link, which keeps fewer sessions alive at once (docs/design.md, "How the end of a unit is
    seen"). The sweep walks ``holding_values`` (every greenlet's work holding a value has its
    shared weak reference there): a ``WeakSet`` of the greenlets' works was a weak reference
    with a callback per live greenlet unit, one more object for the garbage collector, and three
    Python calls (``add``, ``len``, ``discard``) per unit.
    """

    def __init__(self, on_end: Callable[[T], None]) -> None:
        self._key = f"_sessionscope_local_{next(_ids)}"
        self._on_end = on_end
        self._count = 0
        self._greenlet_count = 0
        """How many of the works counted are greenlets' (``type(work.root) is weakref.ref``)."""
        self._sweep_at = _SWEEP_MIN
        register_end_hook(self._key, self)
        _all_locals.add(self)

    def get(self) -> T | None:
        """The current unit of work's value, or None."""
        work = current_work()
        if work is None:
            return None
        value: T | None = work.get_value(self._key)
        return value

    def set(self, value: T, work: WorkUnit | None = None) -> None:
        """Make ``value`` the current unit of work's value (replacing, not ending, any other).

        ``work``: the current unit of work, when the caller has just looked it up.
        """
        if work is None:
            work = current_or_new_work()
        if work.value_key is None and work.values is None:  # (set_value()'s usual case, inlined)
            work.value_key = self._key
            work.value = value
            new = True
        else:
            new = work.set_value(self._key, value)
        if new:
            self._count += 1
            if type(work.root) is weakref.ref:  # a greenlet's (see holding_values)
                holding_values[weakref.ref(work)] = None
                self.greenlet_holds()

    def greenlet_holds(self) -> None:
        """A greenlet's work has just been given a value (and counted): sweep when due."""
        self._greenlet_count += 1
        if self._greenlet_count >= self._sweep_at:
            self._sweep()

    def pop(self, work: WorkUnit | None = None) -> T | None:
        """Forget the current unit of work's value without ending it; return it (or None).

        ``work``: the current unit of work, when the caller has just looked it up.
        """
        if work is None:
            work = current_work()
            if work is None:
                return None
        value: T | None
        if work.value_key == self._key:  # (pop_value()'s usual case, inlined)
            value = work.value
            work.value_key = work.value = None
        else:
            value = work.pop_value(self._key)
        if value is not None:  # (self._forget(work), inlined)
            self._count -= 1
            if type(work.root) is weakref.ref:
                self._greenlet_count -= 1
        return value

    def __len__(self) -> int:
        """How many units of work hold a value right now."""
        return self._count

    def work_ended(self, work: WorkUnit, value: T) -> None:
        """Called by ``work`` as it ends, with the value it held under this local's key."""
        self._forget(work)
        self._on_end(value)

    def _forget(self, work: WorkUnit) -> None:
        self._count -= 1
        if type(work.root) is weakref.ref:
            self._greenlet_count -= 1

    def _sweep(self) -> None:
        """End the works of greenlets that finished (a raw one still referenced by the
        application, a gevent one whose link the hub has not run yet): any work holding a
        value, this local's or another's (ending a work ends all its values)."""
        for ref in list(holding_values):
            work = ref()
            if work is not None and type(work.root) is weakref.ref:
                root = work.root()
                if isinstance(root, greenlet) and root.dead:
                    work.end()
        self._sweep_at = max(_SWEEP_MIN, 2 * self._greenlet_count)


def _forget_parent_works() -> list[Any]:
    """In a forked child no local counts the parent's works (``_work`` empties them)."""
    for local in list(_all_locals):
        local._count = 0
        local._greenlet_count = 0
    return []


_fork.on_fork_in_child(_forget_parent_works)
