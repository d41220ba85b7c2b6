"""Which concurrent unit is running now: one function in front of one small module per model.

Order matters and is deliberate: an asyncio task, else a trio task, else a greenlet that is not a
thread's main greenlet, else the OS thread. A task runs inside some greenlet (usually the thread's
main one), so tasks must be asked about first; a greenlet runs inside a thread, so greenlets come
before threads.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Hashable
from types import ModuleType
from typing import Any

from greenlet import getcurrent, greenlet

from .. import _fork
from .._arguments import refuse
from . import _asyncio, _greenlet, _thread, _trio
from ._asyncio import _get_running_loop, current_task_of_loop
from ._thread import ThreadUnit

_modules = sys.modules

Unit = Hashable
"""An asyncio ``Task``, a trio ``Task``, a ``greenlet`` or a :class:`ThreadUnit`."""

__all__ = [
    "ThreadUnit",
    "Unit",
    "current_unit",
    "describe_unit",
    "unit_outside_tasks",
    "watch_unit_end",
]


def current_unit() -> Unit:
    """The concurrent unit running now, as a hashable object that lives exactly as long as it.

    - the running asyncio task; else
    - the running trio task; else
    - the current greenlet, when it is not a thread's main greenlet (gevent, eventlet, raw
      greenlets; monkey-patched before, after or never). SQLAlchemy's internal greenlets are looked
      through, so AsyncSession event hooks belong to the task that drives them; else
    - the real OS thread, as a :class:`ThreadUnit`.

    Identities are the objects themselves, never ``id()`` values, which are reused once an object
    dies. A forked child gets a new identity for its thread.
    """
    # (inlined: every scope asks this once as it begins)
    loop = _get_running_loop()
    if loop is not None:
        task = current_task_of_loop(loop)
        if task is not None:
            return task
    if "trio" in _modules:  # a trio task exists only once trio has been imported
        trio_task: Unit | None = _trio.running_task()
        if trio_task is not None:
            return trio_task
    return unit_outside_tasks()


def unit_outside_tasks() -> Unit:
    """:func:`current_unit` for a caller that knows no task is running: the greenlet or thread.

    (Callers that have just looked the running task up save the second lookup.)
    """
    if getcurrent().parent is None:  # a thread's main greenlet: the thread itself
        unit: Unit | None = _thread.per_thread.unit  # (current_thread_unit(), inlined)
        return _thread.current_thread_unit() if unit is None else unit
    current: Unit = _greenlet.driving_greenlet()
    if current.parent is None:  # type: ignore[attr-defined]
        return _thread.current_thread_unit()
    return current


def _model_of(unit: Unit) -> ModuleType:
    """The module that knows ``unit``'s concurrency model."""
    if asyncio.isfuture(unit):
        return _asyncio
    if isinstance(unit, ThreadUnit):
        return _thread
    if isinstance(unit, greenlet):
        return _greenlet
    return _trio


def _is_trio_task(unit: Unit) -> bool:
    trio = sys.modules.get("trio")  # a trio task exists only once trio has been imported
    return trio is not None and isinstance(unit, trio.lowlevel.Task)


def describe_unit(unit: Unit) -> str:
    """A human description of ``unit`` for error messages: kind and name.

    :param unit: what :func:`current_unit` returns; anything else is refused with ``TypeError``
     (it has no kind and name to describe).
    """
    model = _model_of(unit)
    if model is _trio and not _is_trio_task(unit):
        refuse(
            TypeError,
            "describe_unit()",
            "unit",
            unit,
            "a unit from sessionscope.current_unit() (an asyncio or trio task, a greenlet, a "
            "ThreadUnit)",
        )
    description: str = model.describe(unit)
    return description


def watch_unit_end(unit: Unit, listener: Any) -> None:
    """Arrange for ``listener.unit_ended()`` to be called once ``unit`` has ended (a task's or a
    gevent/eventlet greenlet's end signal calls ``listener(unit)``: the work unit's ``__call__``).

    Must be called from ``unit`` itself; listeners make a second signal harmless. Raw greenlets
    have no end signal: their unit of work ends when their context is freed, or in a sweep (see
    ``UnitLocal``). A thread holds its listeners weakly (see ``_thread.watch_end``).
    """
    _model_of(unit).watch_end(unit, listener)


_fork.on_fork_in_child(_thread.renew_after_fork)
