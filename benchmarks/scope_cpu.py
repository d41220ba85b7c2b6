"""CPU time of one session's life, by hand and through sessionscope, in short alternated batches.

    python benchmarks/scope_cpu.py            # about 30 s
    python benchmarks/scope_cpu.py --quick    # noisier
    python benchmarks/scope_cpu.py --smoke    # only checks the code works
    python benchmarks/scope_cpu.py --json out.json

Why: the counted benchmarks (``request_instructions.py``, ``session_instructions.py``) meet their
bars while the timed ones (``request_cpu.py``, ``web_requests.py``) do not; this one shows the
difference on the smallest case, a session made, committed and closed (an unconnected SQLite
engine in memory: the commit of an empty transaction touches no database). Contenders, each a
function called in a loop:

- ``by hand``: ``s = maker(); s.commit(); s.close()``;
- ``by hand again``: the same, from a second maker and function (the control: the method's
  noise floor);
- ``scope, guard=off`` and ``scope, guard=raise``: ``with Session.scope(commit=False):
  Session().commit()`` on a ``sessionscope.scoped_session`` of that mode;
- ``registry + remove()``: ``Session().commit()`` then ``Session.remove()`` (guard on).

Method: a batch of 100 calls of each contender, back to back, the order reversed every other
round; CPU time of the process per call; the ratio is the median of the per-round ratios to
``by hand`` (this machine's speed drifts by 10-30% over seconds, which long rounds would let into
the ratio). Compare the ratios with ``session_instructions.py``'s counted ones: what is above
those is time that instructions do not show (docs/design.md, "What a request costs, and where").
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from _pg_bench import parser, write_report
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import sessionscope

SIZES = {"full": (100, 300), "quick": (100, 80), "smoke": (3, 2)}
"""Calls per batch, rounds (each round one batch of every contender)."""
BASE = "by hand"
Contender = Callable[[], None]
Guard = Literal["raise", "warn", "off"]


def contenders() -> dict[str, Contender]:
    """Every contender, on one unconnected in-memory SQLite engine."""
    engine = create_engine("sqlite://")

    def by_hand_with(maker: sessionmaker[Any]) -> Contender:
        def by_hand() -> None:
            session = maker()
            try:
                session.commit()
            finally:
                session.close()

        return by_hand

    def in_scope(mode: Guard) -> Contender:
        scoped = sessionscope.scoped_session(sessionmaker(engine), guard=mode)

        def scope() -> None:
            with scoped.scope(commit=False):
                scoped().commit()

        return scope

    registry = sessionscope.scoped_session(sessionmaker(engine))

    def registry_remove() -> None:
        try:
            registry().commit()
        finally:
            registry.remove()

    return {
        BASE: by_hand_with(sessionmaker(engine)),
        "by hand again": by_hand_with(sessionmaker(engine)),
        "scope, guard=off": in_scope("off"),
        "scope, guard=raise": in_scope("raise"),
        "registry + remove()": registry_remove,
    }


def measure(calls: int, rounds: int) -> dict[str, list[float]]:
    """µs of CPU per call of each contender, one batch per round each."""
    runs = contenders()
    for run in runs.values():  # warm up: specialisation, caches, first-use set-ups
        for _ in range(max(calls * 10, 2)):
            run()
    samples: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for i in range(rounds):
        for label in labels if i % 2 == 0 else labels[::-1]:
            run = runs[label]
            start = time.process_time()
            for _ in range(calls):
                run()
            samples[label].append((time.process_time() - start) / calls * 1e6)
    return samples


def report(samples: dict[str, list[float]]) -> dict[str, Any]:
    base = samples[BASE]
    return {
        "us_per_call": {label: statistics.median(values) for label, values in samples.items()},
        "ratio": {
            label: statistics.median(v / b for v, b in zip(values, base, strict=True))
            for label, values in samples.items()
        },
        "rounds": samples,
    }


def markdown(result: dict[str, Any]) -> str:
    rows = ["| Contender | CPU µs/call | ratio to by hand |", "|---|---:|---:|"]
    for label, us in result["us_per_call"].items():
        rows.append(f"| {label} | {us:.1f} | {result['ratio'][label]:.3f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    calls, rounds = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    result = report(measure(calls, rounds))
    print(f"A session's life, CPU per call ({calls} calls a batch, {rounds} rounds):")
    for label, us in result["us_per_call"].items():
        print(f"  {label:<20} {us:7.1f} µs  ratio {result['ratio'][label]:.3f}")
    table = markdown(result)
    print(f"\n{table}")
    write_report(args.json, {**result, "markdown": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
