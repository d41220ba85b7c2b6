"""Memory per live unit that a registry adds on top of the Session itself (tracemalloc).

N units are started and each keeps one session (a Session, or an AsyncSession), three ways:
appended to a plain list (the baseline: the unit and its session, nothing else), through
SQLAlchemy's ``scoped_session`` / ``async_scoped_session`` with the usual ``scopefunc``, and through
sessionscope's drop-in for it. Subtracting the baseline cancels out the session and the unit,
leaving the registry's bookkeeping per unit.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass

from _envs import ENVS
from registry_lookup import ASYNC_TASK, GREENLET, TASK, Contest

Hold = Callable[[], object]

# Each row: the kind of unit started, and the two registries compared in it.
ROWS: dict[str, tuple[str, Contest]] = {
    "asyncio task": ("asyncio task", TASK),
    "asyncio task, AsyncSession": ("asyncio task", ASYNC_TASK),
    "greenlet": ("greenlet", GREENLET),
    "gevent": ("gevent", GREENLET),
}


@dataclass(frozen=True)
class Traced:
    """Bytes per unit allocated while N units were started and held their session."""

    held: float  # still allocated once all N hold (current - start)
    peak: float  # peak on the way there (peak - start)


@dataclass(frozen=True)
class MemoryResult:
    unit: str  # the row: a kind of unit, and the kind of session if not Session
    units: int
    plain: Traced
    sqlalchemy: Traced
    sessionscope: Traced

    @property
    def sessionscope_peak(self) -> float:
        """sessionscope's bookkeeping per unit, at peak, beyond the Session held in a list."""
        return self.sessionscope.peak - self.plain.peak

    @property
    def sqlalchemy_peak(self) -> float:
        return self.sqlalchemy.peak - self.plain.peak

    @property
    def sessionscope_held(self) -> float:
        return self.sessionscope.held - self.plain.held

    @property
    def sqlalchemy_held(self) -> float:
        return self.sqlalchemy.held - self.plain.held

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "sessionscope_bytes_per_unit_peak": self.sessionscope_peak,
            "sessionscope_bytes_per_unit_held": self.sessionscope_held,
            "sqlalchemy_bytes_per_unit_peak": self.sqlalchemy_peak,
            "sqlalchemy_bytes_per_unit_held": self.sqlalchemy_held,
        }


def _holders(contest: Contest) -> dict[str, Callable[[], Hold]]:
    """Per variant, a maker of a fresh ``hold()``: each unit calls it once to keep a session."""
    factory = contest.registries.factory

    def plain() -> Hold:
        sessions: list[object] = []
        return lambda: sessions.append(factory())

    return {
        "plain": plain,
        "sqlalchemy": contest.make_anchor,
        "sessionscope": contest.make_candidate,
    }


def _traced(unit: str, hold: Hold, units: int) -> Traced:
    gc.collect()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        current, peak = ENVS[unit](tracemalloc.get_traced_memory, hold, units)
    finally:
        tracemalloc.stop()
    return Traced(held=(current - start) / units, peak=(peak - start) / units)


def measure_memory(row: str, units: int) -> MemoryResult:
    """Bytes per unit of each variant of ``row`` with ``units`` units alive, each holding one."""
    unit, contest = ROWS[row]
    holders = _holders(contest)
    for make_hold in holders.values():  # warm up: first-use caches must not count as per-unit
        ENVS[unit](lambda: None, make_hold(), min(units, 200))
    traced = {name: _traced(unit, make_hold(), units) for name, make_hold in holders.items()}
    return MemoryResult(row, units, **traced)
