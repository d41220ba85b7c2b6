"""asyncio: the running task is the unit.

A task's "current task" stays set while SQLAlchemy's internal greenlets run inside the task's step
(the AsyncSession runs the ORM inside ``greenlet_spawn``), so ORM event hooks of an AsyncSession
resolve to the task that drives them without any special case here.
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from collections.abc import Callable
from contextvars import Context
from typing import Any

_get_running_loop = asyncio.events._get_running_loop

if sys.version_info < (3, 14):
    # CPython 3.10-3.13 keep the loop -> task mapping in a dict that the C tasks write; reading it
    # skips a call. From 3.14 the current task lives in the thread state, and a module-level
    # `_current_tasks` may remain only for the pure-Python tasks, so it is not trusted there.
    from asyncio.tasks import _current_tasks as _current_tasks_by_loop  # type: ignore[attr-defined]

    current_task_of_loop: Callable[[Any], asyncio.Task[Any] | None] = _current_tasks_by_loop.get
else:  # pragma: no cover - newer interpreters

    def current_task_of_loop(loop: Any) -> asyncio.Task[Any] | None:
        return asyncio.current_task(loop)


def running_task() -> asyncio.Task[Any] | None:
    """The asyncio task running in this thread, or None outside a task."""
    loop = _get_running_loop()
    if loop is None:
        return None
    return current_task_of_loop(loop)


_end_contexts: weakref.WeakKeyDictionary[Any, Context] = weakref.WeakKeyDictionary()
"""Each loop's empty context its tasks' end callbacks run in (see :func:`watch_end`)."""
_last_end_context: tuple[Callable[[], Any], Context | None] = (lambda: None, None)
"""(a weak reference to the loop that last asked, its end context): most processes run one
loop, which then finds its context without a call."""


def watch_end(task: asyncio.Task[Any], listener: Any) -> None:
    """Call ``listener.unit_ended(task)`` on the task's loop once it is done (any outcome).

    The listener is called as it is (a callable: the work unit) and in an empty context that
    the loop's tasks share: ``add_done_callback()`` would otherwise copy the task's context, one
    more object per live task for the collector to walk (and it would keep the context's mapping
    as it was then alive until the task ends). Nothing sessionscope runs at the end reads the
    task's variables (its unit of work has ended: no context may use it any more), and the
    listener runs the end in a fresh context of its own (``WorkUnit.unit_ended``), so nothing
    set there reaches the next task's end. One context per loop, not per process: a context
    cannot be entered twice at once, and a loop runs one callback at a time, where two loops
    (threads, or greenlets of one thread) may not.

    The contexts are kept here, by loop, not on the loop: on CPython 3.11-3.13 a loop whose
    ``__dict__`` was asked for keeps its attributes in a dict, after which every attribute read
    of asyncio's own loop code (``self._ready``, ``self._debug``) takes the generic path (a loop
    running callbacks was 8-25% slower), and a loop class's instances keep their attributes
    inline only up to 30 attribute names in all, which attributes added by libraries use up.
    """
    loop = task.get_loop()
    last = _last_end_context
    if last[0]() is not loop:
        last = _end_context_of(loop)
    task.add_done_callback(listener, context=last[1])


def _end_context_of(loop: Any) -> tuple[Callable[[], Any], Context]:
    global _last_end_context
    try:
        context = _end_contexts.get(loop)
        if context is None:
            context = _end_contexts[loop] = Context()
        last = _last_end_context = (weakref.ref(loop), context)
    except TypeError:  # a loop that takes no weak reference: a context per task, as asyncio makes
        return (lambda: None, Context())
    return last


def describe(task: asyncio.Task[Any]) -> str:
    return f"asyncio task {task.get_name()!r}"
