"""``Session()`` then ``remove()`` in a thread, counted in CPU instructions: issue 14's 1.2x bar.

    python benchmarks/session_instructions.py            # 3 hash seeds (~4 min)
    python benchmarks/session_instructions.py --seeds 1
    python benchmarks/session_instructions.py --smoke    # no valgrind: only checks the code works
    python benchmarks/session_instructions.py --json out.json

The contenders are SQLAlchemy's thread-local ``scoped_session(maker)`` and sessionscope's
``scoped_session(maker)`` with ``guard="raise"`` (the default) and ``guard="off"``, each making its
session and removing it, over and over, in one thread on an unconnected SQLite engine (the
session never reaches the database: what is counted is the registry, the session's making and
closing, and the guard). ``guard_overhead.py`` times the same operation; on this machine its
ratio moves by more than the bar from run to run, and instructions do not move with the load.

Each contender runs in a process of its own under ``valgrind --tool=callgrind``; two runs that
differ only in how many operations follow the warm-up give, by their difference, the
instructions of those operations alone. Every process imports sessionscope, SQLAlchemy's
contender too, so that their memory layouts differ as little as their code does; what is left of
layout (CPython's type attribute cache) moves with the hash seed, so each contender is counted
under several seeds and the ratio is the median of the per-seed ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

from _callgrind import count, counting_parser, per_seed

WARMUP = 2000
COUNTED = 2000
"""Operations counted: a run of ``WARMUP + COUNTED`` against one of ``WARMUP``."""
SQLALCHEMY = "SQLAlchemy scoped_session"
RAISE = "sessionscope"
OFF = "sessionscope, guard=off"
CONTENDERS = (SQLALCHEMY, RAISE, OFF)


def operation(contender: str) -> Callable[[], None]:
    """``Session()`` then ``Session.remove()`` on a registry of ``contender``'s, checked once."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session, scoped_session, sessionmaker

    import sessionscope
    from sessionscope._guard import guard_of

    maker = sessionmaker(create_engine("sqlite://"))
    if contender == SQLALCHEMY:
        registry: Any = scoped_session(maker)
    else:
        registry = sessionscope.scoped_session(maker, guard="off" if contender == OFF else "raise")
    guarded = guard_of(registry()) is not None
    registry.remove()
    if guarded != (contender == RAISE):
        raise RuntimeError(f"{contender}: its sessions are {'' if guarded else 'not '}guarded")

    def make_and_remove() -> None:
        session = registry()
        if not isinstance(session, Session):
            raise RuntimeError(f"{contender} made {session!r}")
        registry.remove()

    return make_and_remove


def child(contender: str, operations: int) -> int:
    """Run in the counted process: ``WARMUP`` operations, then ``operations`` more."""
    run = operation(contender)
    for _ in range(WARMUP + operations):
        run()
    return 0


def _count(contender: str, operations: int, seed: int) -> int:
    return count([__file__, "--child", contender, "--n", str(operations)], seed, contender)


def per_operation(contender: str, seed: int, counted: int = COUNTED) -> float:
    """Instructions of one ``Session()`` + ``remove()`` of ``contender`` under hash ``seed``."""
    return (_count(contender, counted, seed) - _count(contender, 0, seed)) / counted


def main(argv: Sequence[str] | None = None) -> int:
    parser = counting_parser(__doc__, 3, "run each child once")
    parser.add_argument("--n", type=int, default=COUNTED, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.n)
    if args.smoke:
        for contender in CONTENDERS:
            operation(contender)()
        print("every contender made and removed its session (smoke: nothing counted)")
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing to count with (see --smoke)")
        return 1
    figures = per_seed(per_operation, CONTENDERS, range(args.seeds), args.jobs)
    anchor = figures[SQLALCHEMY]
    print(
        f"Session() then remove() in a thread ({COUNTED} after {WARMUP} of warm-up, callgrind), "
        f"{args.seeds} hash seed(s); ratio = median over seeds of per-seed ratios to SQLAlchemy's\n"
    )
    report = {}
    for contender in CONTENDERS:
        per = [figures[contender][seed] / anchor[seed] for seed in anchor]
        line = statistics.median(figures[contender].values())
        print(
            f"{contender:<26} {line:>9,.0f} instructions  ratio {statistics.median(per):.3f}"
            f"  (seeds: {', '.join(f'{r:.3f}' for r in per)})"
        )
        report[contender] = {"instructions": figures[contender], "ratios": per}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
