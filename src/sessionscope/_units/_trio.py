"""trio: the running trio task is the unit.

trio is imported only if the application imported it. trio tasks take no attributes and have no
done-callbacks, so the end of a task is observed through a trio Instrument (``task_exited``),
added once to each run that sessionscope sees.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

_run_context: Any = None  # trio._core._run.GLOBAL_RUN_CONTEXT once trio has been imported


def _bind() -> Any:
    global _run_context
    if "trio" not in sys.modules:
        return None
    from trio._core._run import GLOBAL_RUN_CONTEXT  # private, but what current_task() reads

    _run_context = GLOBAL_RUN_CONTEXT
    return _run_context


def running_task() -> Any:
    """The trio task running in this thread, or None outside trio (or when trio isn't imported)."""
    context = _run_context if _run_context is not None else _bind()
    if context is None:
        return None
    return getattr(context, "task", None)


class _TaskEndInstrument:
    """Tells the listeners registered for a task when trio reports that it exited."""

    def __init__(self) -> None:
        self.listeners: dict[Any, list[Any]] = {}

    def task_exited(self, task: Any) -> None:
        for listener in self.listeners.pop(task, ()):
            listener.unit_ended()


_instruments: weakref.WeakKeyDictionary[Any, _TaskEndInstrument] = weakref.WeakKeyDictionary()


def watch_end(task: Any, listener: Any) -> None:
    """Call ``listener.unit_ended()`` in trio's run loop when ``task`` exits."""
    import trio

    runner = _run_context.runner
    instrument = _instruments.get(runner)
    if instrument is None:
        instrument = _instruments[runner] = _TaskEndInstrument()
        trio.lowlevel.add_instrument(instrument)  # type: ignore[arg-type]  # duck-typed, as trio allows
    instrument.listeners.setdefault(task, []).append(listener)


def describe(task: Any) -> str:
    return f"trio task {task.name!r}"
