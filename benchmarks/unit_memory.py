"""Memory per live unit that a registry adds on top of the Session itself (tracemalloc).

N units are started and each keeps one session, three ways: appended to a plain list (the
baseline: the unit and its Session, nothing else), through SQLAlchemy's ``scoped_session`` with
the usual ``scopefunc``, and through ``sessionscope.scoped_session``. Subtracting the baseline
cancels out the Session and the unit, leaving the registry's bookkeeping per unit.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass

import greenlet
from _envs import ENVS
from registry_lookup import SESSION_FACTORY
from sqlalchemy.orm import Session, scoped_session

import sessionscope

UNITS = ("asyncio task", "greenlet", "gevent")
Hold = Callable[[], object]


@dataclass(frozen=True)
class Traced:
    """Bytes per unit allocated while N units were started and held their session."""

    held: float  # still allocated once all N hold (current - start)
    peak: float  # peak on the way there (peak - start)


@dataclass(frozen=True)
class MemoryResult:
    unit: str
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


def _plain() -> Hold:
    sessions: list[Session] = []
    return lambda: sessions.append(SESSION_FACTORY())


def _holders(unit: str) -> dict[str, Callable[[], Hold]]:
    """Per variant, a maker of a fresh ``hold()``: each unit calls it once to keep a session."""
    scopefunc = asyncio.current_task if unit == "asyncio task" else greenlet.getcurrent
    return {
        "plain": _plain,
        "sqlalchemy": lambda: scoped_session(SESSION_FACTORY, scopefunc=scopefunc),
        "sessionscope": lambda: sessionscope.scoped_session(SESSION_FACTORY),
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


def measure_memory(unit: str, units: int) -> MemoryResult:
    """Bytes per unit of each variant with ``units`` units alive, each holding its session."""
    holders = _holders(unit)
    for make_hold in holders.values():  # warm up: first-use caches must not count as per-unit
        ENVS[unit](lambda: None, make_hold(), min(units, 200))
    traced = {name: _traced(unit, make_hold(), units) for name, make_hold in holders.items()}
    return MemoryResult(unit, units, **traced)
