"""sessionscope vs SQLAlchemy's scoped_session, side by side in one process.

    python benchmarks/run.py            # full run (about 40 s)
    python benchmarks/run.py --quick    # a few seconds, noisier
    python benchmarks/run.py --json results.json

Prints ns/op of each contender and the ratio sessionscope / SQLAlchemy (flagged above the issue's
target: 1.5x for Session, 1.25x for AsyncSession), then bytes per live unit of registry
bookkeeping, then the same as a markdown table for the README. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import greenlet
import sqlalchemy
from _timing import FULL, QUICK, SMOKE, Comparison, Settings
from registry_lookup import LIVE_UNIT_COUNTS, Case, build_cases, run_case
from unit_memory import ROWS, MemoryResult, measure_memory

import sessionscope

MEMORY_UNITS = 10_000
QUICK_MEMORY_UNITS = 2_000


def lookup_line(case: Case, result: Comparison) -> str:
    target = case.contest.registries.target
    flag = f"  > {target:.2f} target" if result.ratio > target else ""
    return (
        f"{case.op:<20} {case.where:<26} {case.contest.anchor:<46}"
        f" sqlalchemy {result.anchor_median:6.0f} ns"
        f"  sessionscope {result.candidate_median:6.0f} ns"
        f"  ratio {result.ratio:.2f} (min/min {result.ratio_min:.2f}){flag}"
    )


def memory_line(result: MemoryResult) -> str:
    return (
        f"{result.unit:<26} {result.units:>7,} live units  sessionscope"
        f" {result.sessionscope_peak:+6.0f} B/unit  sqlalchemy scopefunc"
        f" {result.sqlalchemy_peak:+6.0f} B/unit  (baseline unit + session:"
        f" {result.plain.peak:.0f} B/unit)"
    )


def markdown(lookups: Sequence[tuple[Case, Comparison]], memory: Sequence[MemoryResult]) -> str:
    rows = [
        "| Operation | Unit | SQLAlchemy anchor | SQLAlchemy ns/op | sessionscope ns/op | Ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    rows += [
        f"| `{case.op}` | {case.where} | `{case.contest.anchor}` | {r.anchor_median:.0f}"
        f" | {r.candidate_median:.0f} | {r.ratio:.2f} |"
        for case, r in lookups
    ]
    if not memory:
        return "\n".join(rows)
    rows += [
        "",
        "| Unit | Live units | sessionscope bytes/unit | SQLAlchemy `scopefunc` bytes/unit |",
        "|---|---:|---:|---:|",
    ]
    rows += [
        f"| {m.unit} | {m.units:,} | {m.sessionscope_peak:.0f} | {m.sqlalchemy_peak:.0f} |"
        for m in memory
    ]
    return "\n".join(rows)


def environment() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlalchemy": sqlalchemy.__version__,
        "greenlet": greenlet.__version__,
        "sessionscope": sessionscope.__version__,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, shorter samples (noisier)")
    size.add_argument("--smoke", action="store_true", help="tiny run: only checks the code works")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument(
        "-k", metavar="TEXT", default="", help="only lookup cases whose operation or unit has TEXT"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    return parser.parse_args(argv)


def run_lookups(cases: Sequence[Case], settings: Settings) -> list[tuple[Case, Comparison]]:
    """Measure each case, printing its line as it comes."""
    print(
        f"{settings.rounds} interleaved rounds of samples >= {settings.sample_ns / 1e6:g} ms,"
        f" loop unrolled x{settings.unroll}; ns/op = median of rounds;"
        " ratio = median of per-round ratios\n"
    )
    done: list[tuple[Case, Comparison]] = []
    for case in cases:
        done.append((case, run_case(case, settings)))
        print(lookup_line(*done[-1]), flush=True)
    return done


def run_memory(units: int) -> list[MemoryResult]:
    print("\nPeak registry bookkeeping per live unit (tracemalloc, minus sessions in a list)")
    results = []
    for row in ROWS:
        results.append(measure_memory(row, units))
        print(memory_line(results[-1]), flush=True)
    return results


def lookup_record(case: Case, result: Comparison) -> dict[str, Any]:
    return {
        "op": case.op,
        "unit": case.unit,
        "live_units": case.peers,
        "anchor": case.contest.anchor,
        "target_ratio": case.contest.registries.target,
        **result.as_dict(),
        "anchor_ns_rounds": result.anchor,
        "candidate_ns_rounds": result.candidate,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    memory_units = 20 if args.smoke else QUICK_MEMORY_UNITS if args.quick else MEMORY_UNITS
    cases = build_cases((3,) if args.smoke else LIVE_UNIT_COUNTS)
    started = time.perf_counter()

    env = environment()
    print(" ".join(f"{k} {v}" for k, v in env.items()))
    lookups = run_lookups([c for c in cases if args.k in f"{c.op} {c.where}"], settings)
    memory = [] if args.no_memory else run_memory(memory_units)
    table = markdown(lookups, memory)
    elapsed = time.perf_counter() - started
    print(f"\n{table}\n\n({elapsed:.0f} s)")

    if args.json:
        report = {
            "environment": env,
            "settings": asdict(settings),
            "lookups": [lookup_record(case, result) for case, result in lookups],
            "memory": [m.as_dict() for m in memory],
            "markdown": table,
            "seconds": elapsed,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
