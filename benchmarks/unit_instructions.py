"""A unit that takes a session, start to end, counted in CPU instructions, one unit at a time.

    python benchmarks/unit_instructions.py             # thread, asyncio task, gevent; 2 seeds
    python benchmarks/unit_instructions.py -k thread --seeds 1
    python benchmarks/unit_instructions.py --smoke     # no valgrind: only checks the code works
    python benchmarks/unit_instructions.py --json out.json

``unit_cost.py`` times 100,000 units alive at once, which is what issue 14's bar (1.3x) asks,
and on this machine its ratios move by several percent from run to run; most of the asyncio
and gevent cost there is the garbage collector's, which follows how many objects each live unit
keeps. This benchmark counts the other part, the unit's own work: units started and ended one
after another (a thread started and joined, an asyncio task awaited, a gevent greenlet joined),
each taking its session, on an unconnected SQLite engine. The contenders are those of
``unit_cost.py``: SQLAlchemy's ``scoped_session`` with the kind's ``scopefunc`` (thread-local
for threads) and an explicit ``remove()``, sessionscope's registry without it (the unit's end
closes the session) and with it.

Each contender runs in a process of its own under ``valgrind --tool=callgrind``; a run of
``WARMUP + COUNTED`` units against one of ``WARMUP`` gives the instructions of the counted units
alone. Layout (CPython's type attribute cache) moves with the hash seed, so each is counted
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

WARMUP = 200
COUNTED = 400
"""Units counted: a run of ``WARMUP + COUNTED`` units against one of ``WARMUP``."""
SQLALCHEMY, SESSIONSCOPE = "sqlalchemy + remove()", "sessionscope"
SESSIONSCOPE_REMOVE = "sessionscope + remove()"
CONTENDERS = (SQLALCHEMY, SESSIONSCOPE, SESSIONSCOPE_REMOVE)
KINDS = ("thread", "asyncio task", "gevent greenlet")


def _registry(kind: str, contender: str) -> tuple[Any, bool]:
    """The contender's registry for units of ``kind``, and whether its units call ``remove()``."""
    import asyncio

    import greenlet
    from sqlalchemy import create_engine
    from sqlalchemy.orm import scoped_session, sessionmaker

    import sessionscope  # (imported by every contender: layouts differ as little as the code)

    maker = sessionmaker(create_engine("sqlite://"))
    if contender == SQLALCHEMY:
        scopefunc = {"asyncio task": asyncio.current_task, "gevent greenlet": greenlet.getcurrent}
        return scoped_session(maker, scopefunc=scopefunc.get(kind)), True
    return sessionscope.scoped_session(maker), contender == SESSIONSCOPE_REMOVE


def runner(kind: str, contender: str) -> Callable[[int], None]:
    """Run ``n`` units of ``kind``, one after another, each taking ``contender``'s session; every
    unit checks it got a session of its own and, ended, left none in the registry."""
    from sqlalchemy.orm import Session

    registry, remove = _registry(kind, contender)
    seen: list[Any] = []

    def unit() -> None:
        session = registry()
        if not isinstance(session, Session) or (seen and session is seen[-1]):
            raise RuntimeError(f"{kind}, {contender}: {session!r} is no session of its own")
        seen[:] = [session]
        if remove:
            registry.remove()

    def check_ended() -> None:
        if contender != SQLALCHEMY and len(registry.registry) != 0:
            raise RuntimeError(f"{kind}, {contender}: an ended unit's session is still held")

    if kind == "thread":
        import threading

        def run(n: int) -> None:
            for _ in range(n):
                thread = threading.Thread(target=unit)
                thread.start()
                thread.join()
            check_ended()

    elif kind == "asyncio task":
        import asyncio

        async def task_unit() -> None:
            unit()

        async def units(n: int) -> None:
            for _ in range(n):
                await asyncio.create_task(task_unit())
            await asyncio.sleep(0)  # the last unit's end callback

        def run(n: int) -> None:
            asyncio.run(units(n))
            check_ended()

    else:
        import gevent

        def run(n: int) -> None:
            for _ in range(n):
                gevent.spawn(unit).join()
            gevent.sleep(0)  # the last unit's link
            check_ended()

    return run


def child(kind: str, contender: str, units: int) -> int:
    """Run in the counted process: ``WARMUP`` units, then ``units`` more."""
    run = runner(kind, contender)
    run(WARMUP)
    run(units)
    return 0


def _count(kind: str, contender: str, units: int, seed: int) -> int:
    arguments = [__file__, "--child", contender, "--kind", kind, "--n", str(units)]
    return count(arguments, seed, f"{kind}, {contender}")


def per_unit(kind: str, contender: str, seed: int, counted: int = COUNTED) -> float:
    """Instructions of one unit of ``kind`` with ``contender``'s registry under hash ``seed``."""
    return (_count(kind, contender, counted, seed) - _count(kind, contender, 0, seed)) / counted


def main(argv: Sequence[str] | None = None) -> int:
    parser = counting_parser(__doc__, 2, "a few units each")
    parser.add_argument("-k", metavar="TEXT", default="", help="only kinds containing TEXT")
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=COUNTED, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.kind, args.child, args.n)
    kinds = [kind for kind in KINDS if args.k.lower() in kind]
    if args.smoke:
        for kind in kinds:
            for contender in CONTENDERS:
                runner(kind, contender)(3)
        print(f"every contender ran its units ({', '.join(kinds)}; smoke: nothing counted)")
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing to count with (see --smoke)")
        return 1
    print(
        f"Instructions per unit that takes a session and ends, one unit at a time ({COUNTED} "
        f"after {WARMUP} of warm-up, callgrind), {args.seeds} hash seed(s); ratio = median over "
        "seeds of per-seed ratios to SQLAlchemy's\n"
    )
    report: dict[str, Any] = {}
    for kind in kinds:
        figures = per_seed(
            lambda contender, seed, kind=kind: per_unit(kind, contender, seed),
            CONTENDERS,
            range(args.seeds),
            args.jobs,
        )
        anchor = figures[SQLALCHEMY]
        row = {}
        for contender in CONTENDERS:
            ratios = [figures[contender][seed] / anchor[seed] for seed in anchor]
            row[contender] = {"instructions": figures[contender], "ratios": ratios}
            seeds = ", ".join(f"{r:.3f}" for r in ratios)
            print(
                f"{kind:<16} {contender:<24} "
                f"{statistics.median(figures[contender].values()):>9,.0f} instructions  ratio "
                f"{statistics.median(ratios):.3f}  (seeds: {seeds})",
                flush=True,
            )
        report[kind] = row
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
