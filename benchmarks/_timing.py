"""Side-by-side timing of two objects under one expression: calibrated, unrolled, interleaved.

A contender is an object bound to the name ``S`` (a ``scoped_session``), and the operation is an
expression over it (``S()``, ``S.info``). The expression is compiled into an unrolled loop, timeit
style, so nothing but the operation itself runs per iteration: wrapping it in a lambda would add a
Python call (tens of ns) to *both* sides and pull every ratio towards 1.

Samples alternate between the contenders (A B, B A, A B, ...) in the same unit of the same
process, so frequency scaling, cache state and other machine noise hit both alike.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Loop = Callable[[int, Any], int]
"""``loop(n, S)``: run the unrolled expression ``n`` times over ``S``; return elapsed ns."""

_LOOP_TEMPLATE = """\
def loop(n, S, _clock=_clock, _repeat=_repeat):
    it = _repeat(None, n)
    t0 = _clock()
    for _ in it:
{body}
    return _clock() - t0
"""


@dataclass(frozen=True)
class Settings:
    """How hard to measure: each sample lasts ``sample_ns`` or more; ``rounds`` pairs of samples."""

    sample_ns: int = 20_000_000
    rounds: int = 15
    unroll: int = 20
    warmup_ns: int = 5_000_000


FULL = Settings()
QUICK = Settings(sample_ns=4_000_000, rounds=5, warmup_ns=1_000_000)
SMOKE = Settings(sample_ns=10_000, rounds=2, unroll=2, warmup_ns=0)


def compile_loop(expr: str, unroll: int) -> Loop:
    """An unrolled loop evaluating ``expr`` (which names its contender ``S``) ``unroll`` times."""
    body = "\n".join(f"        {expr}" for _ in range(unroll))
    namespace: dict[str, Any] = {"_clock": time.perf_counter_ns, "_repeat": itertools.repeat}
    exec(compile(_LOOP_TEMPLATE.format(body=body), f"<loop {expr}>", "exec"), namespace)
    loop: Loop = namespace["loop"]
    return loop


@dataclass(frozen=True)
class Comparison:
    """Per-round ns/op of the anchor and the candidate, paired by round."""

    anchor: list[float]
    candidate: list[float]

    @property
    def anchor_median(self) -> float:
        return statistics.median(self.anchor)

    @property
    def candidate_median(self) -> float:
        return statistics.median(self.candidate)

    @property
    def anchor_min(self) -> float:
        return min(self.anchor)

    @property
    def candidate_min(self) -> float:
        return min(self.candidate)

    @property
    def round_ratios(self) -> list[float]:
        """Candidate / anchor, round by round."""
        return [c / a for a, c in zip(self.anchor, self.candidate, strict=True)]

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios: each round's two samples ran back to back."""
        return statistics.median(self.round_ratios)

    @property
    def ratio_min(self) -> float:
        """Best against best: the least noisy estimate when the noise only ever adds time."""
        return self.candidate_min / self.anchor_min

    def as_dict(self) -> dict[str, float]:
        return {
            "anchor_ns_median": self.anchor_median,
            "anchor_ns_min": self.anchor_min,
            "candidate_ns_median": self.candidate_median,
            "candidate_ns_min": self.candidate_min,
            "ratio_median": self.ratio,
            "ratio_min": self.ratio_min,
        }


def _timed(loop: Loop, subject: Any, n: int) -> int:
    """One sample of ``n`` iterations with the garbage collector off (as ``timeit`` does)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return loop(n, subject)
    finally:
        if enabled:
            gc.enable()


def calibrate(loop: Loop, subject: Any, target_ns: int) -> int:
    """The smallest iteration count (roughly) whose sample takes ``target_ns`` or longer."""
    n = 1
    while True:
        elapsed = max(_timed(loop, subject, n), 1)
        if elapsed >= target_ns:
            return n
        n = min(n * 100, max(n * 2, int(n * target_ns * 1.1 / elapsed)))


def compare(anchor: Any, candidate: Any, expr: str, settings: Settings) -> Comparison:
    """Time ``expr`` over ``anchor`` and over ``candidate``, interleaved; ns per operation."""
    loop = compile_loop(expr, settings.unroll)
    for subject in (anchor, candidate):  # first calls create the sessions; warm caches up
        _timed(loop, subject, 1)
        calibrate(loop, subject, settings.warmup_ns)
    n = max(calibrate(loop, s, settings.sample_ns) for s in (anchor, candidate))
    ops = n * settings.unroll
    anchor_ns: list[float] = []
    candidate_ns: list[float] = []
    for i in range(settings.rounds):
        order = ((anchor, anchor_ns), (candidate, candidate_ns))
        for subject, samples in order if i % 2 == 0 else reversed(order):
            samples.append(_timed(loop, subject, n) / ops)
    return Comparison(anchor_ns, candidate_ns)
