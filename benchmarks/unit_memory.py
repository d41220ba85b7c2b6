"""Memory per live unit that a registry adds on top of the Session itself (tracemalloc).

N units are started and each keeps one session (a Session, or an AsyncSession), three ways:
appended to a plain list (the baseline: the unit and its session, nothing else), through
SQLAlchemy's ``scoped_session`` / ``async_scoped_session`` with the usual ``scopefunc``, and through
sessionscope's drop-in for it. Subtracting the baseline cancels out the session and the unit,
leaving the registry's bookkeeping per unit.

Each variant is measured in a process of its own, started the same way. Measured one after
another in one process, the later variants found tables the earlier ones had grown (asyncio's
set of tasks, SQLAlchemy's registry of live sessions: a dict or set keeps its size when emptied)
and did not pay for growing them: SQLAlchemy's registry came out at -31 bytes a unit, below the
baseline, and sessionscope's at 460 where a process of its own gives 512.

``blocks`` counts what pymalloc really hands out: it serves requests of up to 512 bytes in
blocks of multiples of 16, so an object made 8 bytes smaller often takes the same block.
tracemalloc's figure (``peak``, ``held``) is the bytes asked for.

    python benchmarks/unit_memory.py            # every row, 10,000 units
    python benchmarks/unit_memory.py -k gevent  # rows whose label has "gevent"
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
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
    blocks: float  # held, each allocation rounded up to its pymalloc block (see the module doc)


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

    @property
    def sessionscope_blocks(self) -> float:
        """sessionscope's bookkeeping per unit in pymalloc's blocks, as held once all hold."""
        return self.sessionscope.blocks - self.plain.blocks

    def as_dict(self) -> dict[str, object]:
        return {
            **asdict(self),
            "sessionscope_bytes_per_unit_peak": self.sessionscope_peak,
            "sessionscope_bytes_per_unit_held": self.sessionscope_held,
            "sqlalchemy_bytes_per_unit_peak": self.sqlalchemy_peak,
            "sqlalchemy_bytes_per_unit_held": self.sqlalchemy_held,
            "sessionscope_bytes_per_unit_blocks": self.sessionscope_blocks,
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


_SMALL_REQUEST = 512  # pymalloc's limit: larger requests go to the system's malloc
_ALIGNMENT = 16  # pymalloc's size classes on 64-bit builds


def _block(size: int) -> int:
    return size if size > _SMALL_REQUEST else -(-size // _ALIGNMENT) * _ALIGNMENT


def _traced(unit: str, hold: Hold, units: int) -> Traced:
    gc.collect()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        start_blocks = sum(_block(t.size) for t in tracemalloc.take_snapshot().traces)

        def when_all_hold() -> tuple[int, int, int]:
            current, peak = tracemalloc.get_traced_memory()
            blocks = sum(_block(t.size) for t in tracemalloc.take_snapshot().traces)
            return current, peak, blocks

        current, peak, blocks = ENVS[unit](when_all_hold, hold, units)
    finally:
        tracemalloc.stop()
    return Traced(
        held=(current - start) / units,
        peak=(peak - start) / units,
        blocks=(blocks - start_blocks) / units,
    )


def measure_variant(row: str, variant: str, units: int) -> Traced:
    """One variant of ``row``, in this process (:func:`measure_memory` gives each its own)."""
    unit, contest = ROWS[row]
    make_hold = _holders(contest)[variant]
    ENVS[unit](lambda: None, make_hold(), min(units, 200))  # first-use caches are not per unit
    return _traced(unit, make_hold(), units)


def measure_memory(row: str, units: int) -> MemoryResult:
    """Bytes per unit of each variant of ``row`` with ``units`` units alive, each holding one,
    each variant measured in a fresh process (see the module's docstring)."""
    unit, contest = ROWS[row]
    traced = {}
    for variant in _holders(contest):
        command = [sys.executable, __file__, "--variant", row, variant, str(units)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"measuring {variant!r} of {row!r} failed:\n{done.stderr}")
        traced[variant] = Traced(**json.loads(done.stdout.splitlines()[-1]))
    return MemoryResult(row, units, **traced)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", metavar="TEXT", default="", help="only rows whose label has TEXT")
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--variant", nargs=3, metavar=("ROW", "VARIANT", "UNITS"), help="internal")
    args = parser.parse_args()
    if args.variant:
        row, variant, units = args.variant
        print(json.dumps(asdict(measure_variant(row, variant, int(units)))))
        return
    print(f"Bookkeeping per live unit beyond the session ({args.units:,} units, tracemalloc)")
    for row in ROWS:
        if args.k in row:
            result = measure_memory(row, args.units)
            print(
                f"{row:<28} sessionscope {result.sessionscope_peak:5.0f} B"
                f" ({result.sessionscope_blocks:.0f} B in pymalloc blocks)"
                f"  SQLAlchemy {result.sqlalchemy_peak:5.0f} B",
                flush=True,
            )


if __name__ == "__main__":
    main()
