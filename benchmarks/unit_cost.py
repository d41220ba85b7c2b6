"""What a unit that takes a session costs, start to end: sessionscope against SQLAlchemy.

    python benchmarks/unit_cost.py                 # 100,000 units of each kind (about 1 min)
    python benchmarks/unit_cost.py --units 20000   # fewer
    python benchmarks/unit_cost.py --smoke         # only checks the code works
    python benchmarks/unit_cost.py --json out.json

A unit is started, takes the registry's session (``Session()``) and ends. With SQLAlchemy's
``scoped_session(maker, scopefunc=...)`` (``asyncio.current_task``, ``greenlet.getcurrent``; the
thread-local default for threads) the unit calls ``Session.remove()`` itself, as it must (the
registry never frees an entry otherwise); with ``sessionscope.scoped_session(maker)`` it does
not: the session is closed as the unit ends, which is what is being paid for. A third contender,
``sessionscope + remove()``, is sessionscope's registry used as SQLAlchemy's must be (the unit
calls ``remove()``): what a unit pays that gives its session back itself. The figure is CPU time
of the process per unit (the units' start and end included, the same on every side), the median
of rounds whose order rotates; a ratio is the median of per-round ratios to SQLAlchemy's (the
issue's bar, for ``sessionscope``: at most 1.3x). The sessions never reach the database (an
unconnected SQLite engine).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import greenlet
from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

import sessionscope

FACTORY = sessionmaker(create_engine("sqlite://"))
SQLALCHEMY, SESSIONSCOPE = "sqlalchemy + remove()", "sessionscope"
SESSIONSCOPE_REMOVE = "sessionscope + remove()"
TARGET = 1.3
THREAD_SHARE = 10
"""Threads are started ``units // THREAD_SHARE`` times only (a thread costs ~50 µs to start)."""


def _asyncio_units(registry: Any, remove: bool, units: int) -> None:
    async def unit() -> None:
        registry()
        if remove:
            registry.remove()

    async def main() -> None:
        await asyncio.gather(*(unit() for _ in range(units)))
        await asyncio.sleep(0)  # the units' done-callbacks

    asyncio.run(main())


def _gevent_units(registry: Any, remove: bool, units: int) -> None:
    import gevent

    def unit() -> None:
        registry()
        if remove:
            registry.remove()

    gevent.joinall([gevent.spawn(unit) for _ in range(units)])
    gevent.sleep(0)  # the units' links


def _thread_units(registry: Any, remove: bool, units: int) -> None:
    def unit() -> None:
        registry()
        if remove:
            registry.remove()

    for _ in range(units):
        thread = threading.Thread(target=unit)
        thread.start()
        thread.join()


KINDS: dict[str, tuple[Callable[[Any, bool, int], None], Callable[[], Any] | None, int]] = {
    "asyncio task": (_asyncio_units, asyncio.current_task, 1),
    "gevent greenlet": (_gevent_units, greenlet.getcurrent, 1),
    "thread": (_thread_units, None, THREAD_SHARE),
}


def run_kind(kind: str, units: int, rounds: int) -> dict[str, Any]:
    """CPU µs per unit of each contender over ``rounds`` rounds (the order rotates)."""
    run, scopefunc, share = KINDS[kind]
    units = max(1, units // share)
    contenders = {
        SQLALCHEMY: (scoped_session(FACTORY, scopefunc=scopefunc), True),
        SESSIONSCOPE: (sessionscope.scoped_session(FACTORY), False),
        SESSIONSCOPE_REMOVE: (sessionscope.scoped_session(FACTORY), True),
    }
    for registry, remove in contenders.values():  # warm up
        run(registry, remove, min(units, 200))
    per_unit: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            registry, remove = contenders[name]
            gc.collect()
            start = time.process_time()
            run(registry, remove, units)
            per_unit[name].append((time.process_time() - start) / units * 1e6)

    def ratio_of(name: str) -> float:
        return statistics.median(
            s / a for a, s in zip(per_unit[SQLALCHEMY], per_unit[name], strict=True)
        )

    return {
        "kind": kind,
        "units": units,
        "us_per_unit": {name: statistics.median(v) for name, v in per_unit.items()},
        "ratio": ratio_of(SESSIONSCOPE),
        "ratio_with_remove": ratio_of(SESSIONSCOPE_REMOVE),
        "us_rounds": per_unit,
    }


def line(row: dict[str, Any]) -> str:
    us = "  ".join(f"{name} {v:7.1f} µs" for name, v in row["us_per_unit"].items())
    flag = f"  > {TARGET:.2f} target" if row["ratio"] > TARGET else ""
    return (
        f"{row['kind']:<16} {row['units']:>8,} units  {us}  ratio {row['ratio']:.2f}{flag}"
        f"  (with remove() {row['ratio_with_remove']:.2f})"
    )


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    out = [
        f"| Unit | units | {SQLALCHEMY} µs/unit | {SESSIONSCOPE} µs/unit | ratio "
        f"| {SESSIONSCOPE_REMOVE} µs/unit | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        us = row["us_per_unit"]
        out.append(
            f"| {row['kind']} | {row['units']:,} | {us[SQLALCHEMY]:.1f} | {us[SESSIONSCOPE]:.1f} "
            f"| {row['ratio']:.2f} | {us[SESSIONSCOPE_REMOVE]:.1f} "
            f"| {row['ratio_with_remove']:.2f} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, default=100_000, help="units per round and kind")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--smoke", action="store_true", help="tiny run: only checks the code works")
    parser.add_argument("-k", metavar="TEXT", help="only kinds of unit whose name contains TEXT")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    units, rounds = (50, 2) if args.smoke else (args.units, args.rounds)
    print(
        f"CPU time per unit that takes a session and ends; {rounds} rotating rounds; threads:"
        f" {max(1, units // THREAD_SHARE):,} per round\n"
    )
    rows = []
    for kind in KINDS:
        if args.k and args.k.lower() not in kind.lower():
            continue
        rows.append(run_kind(kind, units, rounds))
        print(line(rows[-1]), flush=True)
    table = markdown(rows)
    print(f"\n{table}")
    if args.json:
        args.json.write_text(json.dumps({"results": rows, "markdown": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
