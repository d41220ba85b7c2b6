"""What the runtime audit costs a program: the guard benchmark's ORM workload, plain SQLAlchemy
sessions, run as is against run under ``python -m sessionscope audit``, side by side.

The audit changes a whole process (every ``Session`` is guarded from its ``__init__``, and the
guard's write checks are on SQLAlchemy's attribute implementations), so the two contenders are
two worker processes answering the same requests, interleaved round by round as
``guard_overhead``'s listener cases are:

- ``plain``: ``python audit_overhead.py --worker`` (SQLAlchemy's own thread-local
  ``scoped_session`` over a ``sessionmaker``: the program as its authors wrote it), started with
  the audit's modules imported first and the audit not started (see :data:`SAME_IMPORTS`);
- ``audited``: ``python -m sessionscope audit --mode raise -- python audit_overhead.py --worker``,
  the same program booted by the audit's real ``sitecustomize``.

The workload is ``guard_overhead.UnitOfWork`` (new session, add, flush, identity-map hit and miss,
lazy loads both ways, attribute writes, a select, commit, ``remove()``). Before timing, each worker
counts one unit of work by engine and session events (the two must do the same work), says
whether its session refuses another thread (only the audited one may: the audit is on) and
whether writes to ``Book.title`` are checked (not in the plain worker). The issue's target: the
audited worker at most 1.10x the plain one.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import guard_overhead
from _timing import Comparison, Settings
from guard_overhead import (
    CASES,
    REGISTRIES,
    SQLALCHEMY,
    WORKLOAD_SAMPLE_SCALE,
    Check,
    Database,
    LocalSampler,
    Worker,
    WorkerSampler,
    interleave,
)

PLAIN, AUDITED = "plain", "audited"
LABEL = "audit: unit of work (ORM, SQLite), plain SQLAlchemy sessions"
TARGET = 1.10
WORKLOAD = next(case for case in CASES if case.is_workload and not case.listener)
"""The guard benchmark's ORM workload case; here its registry is SQLAlchemy's in both workers."""


SAME_IMPORTS = (
    "import runpy, sys, os; import sessionscope._audit._boot; script = sys.argv[1]; "
    "sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(script)); "
    "runpy.run_path(script, run_name='__main__')"
)
"""How the plain worker starts: it imports what the audit's ``sitecustomize`` imports, first, as
the audited worker does, and does not start the audit. Two processes that import differently differ
in memory layout, which alone moves this workload by a few percent (benchmarks/README.md); this
way the two workers differ by the audit being on, not by what was imported when."""


class AuditWorker(Worker):
    """A worker process, started as is or under ``python -m sessionscope audit``."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        script = str(Path(__file__).resolve())
        if variant == AUDITED:
            command = [sys.executable, "-m", "sessionscope", "audit", "--mode", "raise", "--"]
            command += [sys.executable, script, "--worker"]
        else:  # the same modules imported first, in the same order, the audit not started
            command = [sys.executable, "-c", SAME_IMPORTS, script, "--worker"]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # the audit's report: one violation, the check's own
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )


@dataclass(frozen=True)
class AuditResult:
    rounds: dict[str, list[float]]  # worker -> ns per unit of work, each round
    checks: dict[str, Check]
    label: str = LABEL
    target: float = TARGET

    @property
    def headline(self) -> Comparison:
        return Comparison(anchor=self.rounds[PLAIN], candidate=self.rounds[AUDITED])

    def median(self, name: str) -> float:
        return statistics.median(self.rounds[name])

    def line(self) -> str:
        c = self.headline
        flag = f"  > {self.target:.2f} target" if c.ratio > self.target else ""
        return (
            f"{self.label}  plain {self.median(PLAIN):10,.0f} ns  audited"
            f" {self.median(AUDITED):10,.0f} ns  audited/plain {c.ratio:.3f}"
            f" (min/min {c.ratio_min:.3f}){flag}"
        )

    def markdown(self) -> str:
        return "\n".join(
            [
                "| Audit case | ns per | plain | under `sessionscope audit` | ratio |",
                "|---|---|---:|---:|---:|",
                f"| {WORKLOAD.op}, plain SQLAlchemy sessions | unit of work"
                f" | {self.median(PLAIN):,.0f} | {self.median(AUDITED):,.0f}"
                f" | {self.headline.ratio:.3f} |",
            ]
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.label,
            "per": "unit of work",
            "target_ratio": self.target,
            "ns_median": {name: self.median(name) for name in self.rounds},
            "ratios": {f"{AUDITED}/{PLAIN}": self.headline.as_dict()},
            "checks": {name: asdict(check) for name, check in self.checks.items()},
            "ns_rounds": self.rounds,
        }


def verify(checks: dict[str, Check]) -> None:
    """Stop unless both did the same work, and only the audited worker is guarded."""
    problems = []
    if checks[PLAIN].work != checks[AUDITED].work or checks[PLAIN].work is None:
        problems.append(f"the workers did different work: {checks}")
    if (checks[PLAIN].guarded, checks[AUDITED].guarded) != (False, True):
        problems.append(f"only the audited worker's sessions should refuse a thread: {checks}")
    if (checks[PLAIN].write_checks > 0, checks[AUDITED].write_checks > 0) != (False, True):
        problems.append(f"the guard's write checks in the audited worker only: {checks}")
    if problems:
        raise RuntimeError(f"{LABEL}: " + "; ".join(problems))


def run(settings: Settings) -> AuditResult:
    settings = replace(settings, unroll=1, sample_ns=settings.sample_ns * WORKLOAD_SAMPLE_SCALE)
    workers = {name: AuditWorker(name) for name in (PLAIN, AUDITED)}
    try:
        samplers = {name: WorkerSampler(w, WORKLOAD, 1) for name, w in workers.items()}
        checks = {name: sampler.check for name, sampler in samplers.items()}
        verify(checks)
        return AuditResult(interleave(samplers, settings), checks)
    finally:
        for worker in workers.values():
            worker.close()


def serve() -> None:
    """The worker: the workload over SQLAlchemy's own registry, as a program would run it."""
    import json

    samplers: dict[tuple[str, int], LocalSampler] = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = (request["case"], request["unroll"])
        if "prepare" in request:
            samplers[key] = LocalSampler(WORKLOAD, REGISTRIES[SQLALCHEMY], Database(), key[1])
            answer: Any = asdict(samplers[key].check)
        elif "calibrate" in request:
            answer = samplers[key].calibrate(request["calibrate"])
        else:
            answer = samplers[key].sample(request["sample"])
        print(json.dumps({"answer": answer}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        serve()
    else:
        from _timing import FULL, QUICK

        result = run(QUICK if "--quick" in sys.argv else FULL)
        print(result.line())
        print(result.markdown())

__all__ = ["AuditResult", "guard_overhead", "run"]
