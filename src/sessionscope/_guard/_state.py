"""The fields of a :class:`~sessionscope._guard._ownership.SessionGuard` that every check reads.

``SessionGuard`` derives from :data:`GuardState`: the C type of ``sessionscope._speedups`` when
that module is built (its checks then read these as C fields, which is most of what makes them
cheap), else the Python class below with the same slots. Python code reads and writes them as
plain attributes either way. ``SESSIONSCOPE_NO_EXTENSIONS`` set in the environment (any value
but empty) keeps the C module out, as SQLAlchemy's ``DISABLE_SQLALCHEMY_CEXT_RUNTIME`` does; the
test suite runs both.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from greenlet import getcurrent

from .. import _fork
from .._extensions import NO_EXTENSIONS_VARIABLE as NO_EXTENSIONS_VARIABLE
from .._extensions import load_extension
from .._units._asyncio import _get_running_loop, current_task_of_loop
from .._work import WorkUnit, work_var

OWNED, HANDED_OFF, SHARED, ENDED = "owned", "handed off", "shared", "ended"
"""The values of a guard's ``state``."""


INSIDE: dict[Any, Any] = {}
"""The slot of every guarded session a unit is inside a call of: its guard -> that unit (the
running greenlet or task), taken with ``INSIDE.setdefault(guard, unit)`` (one atomic operation)
and freed with ``INSIDE.pop(guard, None)`` as the last call leaves.

One table for all guards rather than a dict per guard: a session is inside a call for a few
microseconds at a time, so the table holds a handful of entries, where a dict per guard was 64
bytes and an object for the collector for every session alive (issue 14's memory per unit)."""


def _load_speedups() -> Any:
    """The C module, told what its checks read (the objects the Python checks use), or None.

    Configured here, where it is loaded, so that no user of :data:`speedups` finds it unready.
    """
    _speedups: Any = load_extension("_speedups")
    if _speedups is None:  # not built, or turned off: the Python checks
        return None
    _speedups.configure(
        getcurrent, work_var, _get_running_loop, current_task_of_loop, sys.modules, ENDED, INSIDE
    )
    _speedups.configure_work(WorkUnit, _fork)
    return _speedups


speedups: Any = _load_speedups()
"""The C module, configured, or None."""


class PythonGuardState:
    """What the C ``GuardState`` holds, as slots (and the fields' types, for both)."""

    __slots__ = (
        "depth",
        "entered",
        "fast_key",
        "state",
        "after_leave",
        "generation",
        "length",
        "rebuild_at",
        "of_async",
        "owned_by_job",
    )

    depth: int
    entered: Any  # greenlet | None
    fast_key: Callable[[], Any]
    state: str
    after_leave: list[Callable[[], object]] | None
    # (read rarely, but C numbers and bytes in the C type: 8 bytes each as Python slots)
    generation: int
    length: int
    rebuild_at: int
    of_async: bool
    owned_by_job: bool

    def __new__(cls, *args: Any, **kw: Any) -> Any:
        """Starts as the C type's ``tp_new`` does (subclasses' ``__init__`` need not set these)."""
        self = super().__new__(cls)
        self.depth = 0
        self.entered = None  # the greenlet whose call took the slot
        self.after_leave = None  # a close deferred until the unit inside leaves
        self.generation = self.length = self.rebuild_at = 0
        self.of_async = self.owned_by_job = False
        return self


if TYPE_CHECKING:
    GuardState = PythonGuardState
else:
    GuardState = PythonGuardState if speedups is None else speedups.GuardState
