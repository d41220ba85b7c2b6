"""``per_request.py``'s light ORM request, counted in CPU instructions instead of timed.

    python benchmarks/request_instructions.py            # SQLite file, 3 hash seeds (~6 min)
    python benchmarks/request_instructions.py --seeds 1  # one seed (~2 min)
    python benchmarks/request_instructions.py -k postgres
    python benchmarks/request_instructions.py --smoke    # no valgrind: only checks the code works
    python benchmarks/request_instructions.py --json out.json

Why: issue 14's bar for a request is 3% (``scope()`` against a hand-written session), and on a
shared 2-core machine the wall-clock ratio of ``per_request.py`` moves by more than that from run
to run. Instructions executed do not depend on the machine's load. Each contender (``by hand``,
``scope``, ``scope, guard=off``: the same three, built by ``per_request.contenders()``) runs in a
process of its own under ``valgrind --tool=callgrind``, which counts every instruction the
process executes; two runs that differ only in how many requests follow the warm-up give, by
their difference, the instructions of those requests alone (start-up, imports and warm-up
cancel out).

What is left is layout: where the interpreter puts its objects decides which lookups collide in
CPython's type attribute cache, and a collision costs hundreds of instructions. That depends on
the hash seed (``PYTHONHASHSEED``), so each contender is counted under several seeds and the
ratios are the medians over seeds (per-seed figures are printed too). It also depends on what
else the process holds: the same contender and seed counted 1,518,747 and 1,548,857 a request
in two processes whose environments differed by one variable, and a contender's walks of MROs
on those misses went from 58,000 to 108,000 instructions a request between two runs. So each
ratio is printed twice: of all instructions, and of those outside the misses' walks
(``find_name_in_mro``, read from the profile: :func:`_callgrind.count_split`), which is what the
code itself does, and moves far less with the layout.

Instructions are not time (a cache miss costs more than an addition), so this complements the
timed benchmark, it does not replace it: it says what sessionscope adds to a request's work,
reproducibly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from collections.abc import Sequence

import per_request
from _callgrind import Split, count_split, counting_parser, per_seed

WARMUP = 200
COUNTED = 300
"""Requests counted: the difference between a run of ``WARMUP`` and one of ``WARMUP + COUNTED``."""
CONTENDERS = (per_request.BY_HAND, per_request.SCOPE, per_request.SCOPE_OFF)


def child(label: str, contender: str, requests: int) -> int:
    """Run in the counted process: ``WARMUP`` requests, then ``requests`` more, then exit."""
    with per_request.DATABASES[label]() as engine:
        contenders = per_request.contenders(engine)
        per_request.verify(label, engine, contenders)
        request = contenders[contender]
        for _ in range(WARMUP + requests):
            request()
    return 0


def _count(label: str, contender: str, requests: int, seed: int) -> Split:
    """Instructions executed by a child process running ``requests`` after the warm-up."""
    requested = f"{requests:06}"  # (a fixed width: see _callgrind's docstring)
    arguments = [__file__, "--child", contender, "--database", label, "--requests", requested]
    return count_split(arguments, seed, f"{label} {contender}", dict(os.environ))


def per_request_instructions(
    label: str, contender: str, seed: int, counted: int = COUNTED
) -> Split:
    runs = [_count(label, contender, n, seed) for n in (counted, 0)]
    return runs[0].per(runs[1], counted)


def measure(label: str, seeds: Sequence[int], jobs: int) -> dict[str, dict[int, Split]]:
    """Instructions per request of each contender under each seed."""
    return per_seed(
        lambda contender, seed: per_request_instructions(label, contender, seed),
        CONTENDERS,
        seeds,
        jobs,
    )


def ratios(
    figures: dict[str, dict[int, Split]], candidate: str, *, rest: bool = False
) -> list[float]:
    """Per seed, ``candidate``'s instructions over by hand's: all of them, or (``rest``) those
    outside the type attribute cache's misses."""
    anchor = figures[per_request.BY_HAND]
    if rest:
        return [figures[candidate][seed].rest / anchor[seed].rest for seed in anchor]
    return [figures[candidate][seed].total / anchor[seed].total for seed in anchor]


def _seeds(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} (seeds: {', '.join(f'{r:.3f}' for r in ratios)})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = counting_parser(__doc__, 3, "run each child once")
    parser.add_argument("-k", metavar="TEXT", default="sqlite", help="databases matching TEXT")
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=COUNTED, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.database, args.child, args.requests)
    labels = [label for label in per_request.DATABASES if args.k.lower() in label.lower()]
    if "PostgreSQL" in labels and (reason := per_request.postgres_reachable()):
        print(f"PostgreSQL skipped: {reason}")
        labels.remove("PostgreSQL")
    if args.smoke:
        for label in labels:
            for contender in CONTENDERS:
                child(label, contender, 3)
            print(f"{label}: every contender ran (smoke: nothing counted)")
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing to count with (see --smoke)")
        return 1
    print(
        f"Instructions per light ORM request ({COUNTED} requests after {WARMUP} of warm-up, "
        f"callgrind), {args.seeds} hash seed(s); ratio = median over seeds of per-seed ratios\n"
    )
    report = []
    for label in labels:
        figures = measure(label, range(args.seeds), args.jobs)
        line = {c: statistics.median(f.total for f in figures[c].values()) for c in CONTENDERS}
        walks = {c: statistics.median(f.walks for f in figures[c].values()) for c in CONTENDERS}
        on, off = ratios(figures, per_request.SCOPE), ratios(figures, per_request.SCOPE_OFF)
        on_rest = ratios(figures, per_request.SCOPE, rest=True)
        off_rest = ratios(figures, per_request.SCOPE_OFF, rest=True)
        print(
            f"{label:<12} "
            + "  ".join(f"{c} {line[c]:,.0f}" for c in CONTENDERS)
            + f"  scope/by hand {_seeds(on)}  scope, guard=off/by hand {statistics.median(off):.3f}"
        )
        print(
            f"{'':<12} of which in type cache misses' walks: "
            + "  ".join(f"{c} {walks[c]:,.0f}" for c in CONTENDERS)
            + f"\n{'':<12} outside them: scope/by hand {_seeds(on_rest)}"
            + f"  scope, guard=off/by hand {_seeds(off_rest)}"
        )
        report.append(
            {
                "case": label,
                "instructions": {c: {s: f.total for s, f in figures[c].items()} for c in figures},
                "miss_walks": {c: {s: f.walks for s, f in figures[c].items()} for c in figures},
                "scope/by hand": on,
                "off": off,
                "scope/by hand outside miss walks": on_rest,
                "off outside miss walks": off_rest,
            }
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
