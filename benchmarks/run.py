"""sessionscope vs SQLAlchemy's scoped_session, side by side in one process.

    python benchmarks/run.py            # full run (about 40 s)
    python benchmarks/run.py --quick    # a few seconds, noisier
    python benchmarks/run.py --json results.json
    python benchmarks/run.py -k guard --no-memory   # only the guard's cost
    python benchmarks/run.py -k audit --no-memory   # only the runtime audit's cost
    python benchmarks/run.py -k web --no-memory     # only requests/s under real servers
    python benchmarks/run.py --web                  # everything, the web cases too (+3 min)

Prints ns/op of each contender and the ratio sessionscope / SQLAlchemy (flagged above the issue's
target: 1.5x for Session, 1.25x for AsyncSession), then the share-nothing guard's cost (raise
against off, flagged above 1.10x on the ORM workload), then bytes per live unit of registry
bookkeeping, then the same as markdown tables for the README. The web cases (requests/s of one app
with sessionscope's integration against a hand-written session, under uvicorn and gunicorn) take
minutes and start servers: they run only with ``--web`` or when ``-k`` selects them (``-k web``).
See benchmarks/README.md.
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
from typing import TYPE_CHECKING, Any

import audit_overhead
import greenlet
import guard_overhead
import sqlalchemy
from _timing import FULL, QUICK, SMOKE, Comparison, Settings
from guard_overhead import GuardCase, GuardResult
from per_request import guard_checks_in_c
from registry_lookup import LIVE_UNIT_COUNTS, Case, build_cases, run_case
from unit_memory import ROWS, MemoryResult, measure_memory

import sessionscope

if TYPE_CHECKING:  # web_requests imports the test suite's server launcher: only when asked
    from web_requests import WebResult

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


def guard_line(result: GuardResult) -> str:
    ns = "  ".join(f"{name} {result.median(name):10,.0f} ns" for name in result.rounds)
    ratios = "  ".join(
        f"{candidate}/{anchor} {c.ratio:.3f} (min/min {c.ratio_min:.3f})"
        for candidate, anchor in result.pairs
        for c in [result.comparison(candidate, anchor)]
    )
    flag = ""
    case, ratio = result.case, result.headline.ratio
    if case.target is not None and ratio > case.target:
        flag = f"  > {case.target:.2f} target"
    elif case.aim is not None and ratio > case.aim:
        flag = f"  (above the {case.aim:.2f} aim)"
    return f"{case.op:<34} {ns}  {ratios}{flag}"


def markdown(
    lookups: Sequence[tuple[Case, Comparison]],
    memory: Sequence[MemoryResult],
    guard: Sequence[GuardResult] = (),
    web: Sequence[WebResult] = (),
) -> str:
    tables: list[list[str]] = []
    if lookups:
        rows = [
            "| Operation | Unit | SQLAlchemy anchor | SQLAlchemy ns/op | sessionscope ns/op"
            " | Ratio |",
            "|---|---|---|---:|---:|---:|",
        ]
        rows += [
            f"| `{case.op}` | {case.where} | `{case.contest.anchor}` | {r.anchor_median:.0f}"
            f" | {r.candidate_median:.0f} | {r.ratio:.2f} |"
            for case, r in lookups
        ]
        tables.append(rows)
    in_process = [g for g in guard if not g.case.listener]
    if in_process:
        rows = [
            '| Guard case | ns per | `guard="raise"` | `guard="off"` | SQLAlchemy'
            " `scoped_session` | raise / off | raise / SQLAlchemy |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        rows += [
            f"| {g.case.op} | {g.case.per} | {g.median(guard_overhead.RAISE):,.0f}"
            f" | {g.median(guard_overhead.OFF):,.0f} | {g.median(guard_overhead.SQLALCHEMY):,.0f}"
            f" | {g.headline.ratio:.3f}"
            f" | {g.comparison(guard_overhead.RAISE, guard_overhead.SQLALCHEMY).ratio:.3f} |"
            for g in in_process
        ]
        tables.append(rows)
    listener = [g for g in guard if g.case.listener]
    if listener:
        rows = [
            "| Listener case | ns per | guard never used in the process"
            " | guard used in the process | ratio |",
            "|---|---|---:|---:|---:|",
        ]
        rows += [
            f"| {g.case.op} | {g.case.per} | {g.median(guard_overhead.NEVER):,.0f}"
            f" | {g.median(guard_overhead.USED):,.0f} | {g.headline.ratio:.3f} |"
            for g in listener
        ]
        tables.append(rows)
    if memory:
        rows = [
            "| Unit | Live units | sessionscope bytes/unit | SQLAlchemy `scopefunc` bytes/unit |",
            "|---|---:|---:|---:|",
        ]
        rows += [
            f"| {m.unit} | {m.units:,} | {m.sessionscope_peak:.0f} | {m.sqlalchemy_peak:.0f} |"
            for m in memory
        ]
        tables.append(rows)
    if web:
        import web_requests

        tables.append(web_requests.markdown(web))
    return "\n\n".join("\n".join(rows) for rows in tables)


def environment() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlalchemy": sqlalchemy.__version__,
        "greenlet": greenlet.__version__,
        "sessionscope": sessionscope.__version__,
        # the guard's checks: the C module's, or the Python ones (not built, or turned off)
        "guard_checks": "C" if guard_checks_in_c() else "Python",
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, shorter samples (noisier)")
    size.add_argument("--smoke", action="store_true", help="tiny run: only checks the code works")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument(
        "-k",
        metavar="TEXT",
        default="",
        help="only lookup cases whose operation or unit has TEXT, guard cases whose name has it"
        " ('guard' selects them all), web cases whose label has it ('web' selects them all)",
    )
    parser.add_argument(
        "--web", action="store_true", help="also run every web case (requests/s, real servers)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    return parser.parse_args(argv)


def run_lookups(cases: Sequence[Case], settings: Settings) -> list[tuple[Case, Comparison]]:
    """Measure each case, printing its line as it comes."""
    if not cases:
        return []
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


def run_guard(cases: Sequence[GuardCase], settings: Settings) -> list[GuardResult]:
    """Measure the guard cases, printing each line as it comes."""
    workload_ms = settings.sample_ns * guard_overhead.WORKLOAD_SAMPLE_SCALE / 1e6
    print(
        "\nShare-nothing guard: sessionscope guard='raise', guard='off' and SQLAlchemy's"
        " scoped_session,\none shared database, interleaved rounds in one thread (a unit of work:"
        f" samples >= {workload_ms:g} ms, not unrolled).\n'off' and SQLAlchemy pay for the guard's"
        " write checks here; the listener cases compare guard='off'\nin a process that never"
        " used the guard against one that did. raise/off above 1.10 on the unit of work is"
        " flagged.\n"
    )
    done: list[GuardResult] = []
    for result in guard_overhead.run_cases(cases, settings):
        done.append(result)
        print(guard_line(result), flush=True)
    return done


def run_web(args: argparse.Namespace) -> list[WebResult]:
    """The web cases ``--web`` or a ``-k`` with "web" selects (none by default), as they come.

    ``-k`` matches "web <label>": ``-k web`` selects them all, ``-k "web gunicorn"`` two.
    """
    if not args.web and "web" not in args.k:
        return []
    import web_requests

    settings = web_requests.SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"]
    cases = web_requests.select_cases("" if args.web else args.k, settings.clients)
    return web_requests.run(cases, settings) if cases else []


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
    guard_cases = [c for c in guard_overhead.CASES if args.k in c.label]
    guard = run_guard(guard_cases, settings) if guard_cases else []
    audit = None
    if args.k in audit_overhead.LABEL:  # the audit's cost: two worker processes (-k audit)
        print("\nRuntime audit: the same program as is and under `sessionscope audit`\n")
        audit = audit_overhead.run(settings)
        print(audit.line(), flush=True)
    web = run_web(args)
    memory = [] if args.no_memory else run_memory(memory_units)
    table = markdown(lookups, memory, guard, web)
    if audit is not None:
        table += "\n\n" + audit.markdown()
    elapsed = time.perf_counter() - started
    print(f"\n{table}\n\n({elapsed:.0f} s)")

    if args.json:
        report = {
            "environment": env,
            "settings": asdict(settings),
            "lookups": [lookup_record(case, result) for case, result in lookups],
            "guard": [result.as_dict() for result in guard],
            "audit": [] if audit is None else [audit.as_dict()],
            "web": [w.as_dict() for w in web],
            "memory": [m.as_dict() for m in memory],
            "markdown": table,
            "seconds": elapsed,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
