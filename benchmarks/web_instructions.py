"""``web_requests.py``'s servers, counted in CPU instructions per request instead of timed.

    python benchmarks/web_instructions.py              # every case, 2 hash seeds (~8 min)
    python benchmarks/web_instructions.py --seeds 1    # one seed (~4 min)
    python benchmarks/web_instructions.py -k gevent    # cases whose label has "gevent"
    python benchmarks/web_instructions.py --smoke      # no valgrind: only checks the code works
    python benchmarks/web_instructions.py --json out.json
    python benchmarks/web_instructions.py --keep DIR   # keep the dumps, for callgrind_annotate

Why: the issues' bar for a web request is in requests/s (at least 0.97x a hand-written
session), and on this shared 2-core machine ``web_requests.py``'s ratio moves by about ±0.05
from run to run, its control (by-hand against by-hand) included: more than the gap it has to
judge. A server on its GIL is CPU-bound, so its requests/s follow the CPU it spends per request,
and the instructions a process executes do not depend on the machine's load.

Each case's server (the same application, launcher and options as ``web_requests.py``) runs
under ``valgrind --tool=callgrind`` (``--trace-children``: gunicorn's worker is a fork), once per
variant and hash seed, the two variants at once. After a warm-up the worker's counters are
zeroed (``callgrind_control -z``), ``clients`` keep-alive connections load it for a while, and
the counters are dumped (``callgrind_control -d``): every instruction of the worker's process,
its threads and event loop included, over exactly those requests. Every request is checked as
in ``web_requests.py`` (its answer, one row each).

Callgrind runs the process's threads one at a time and about 50 times slower, so the server's
schedule is not the one it has at full speed; what it counts is the work a request costs, which
is what the two variants are compared on. Instructions are not time (a cache miss costs more
than an addition): this complements ``web_requests.py``, it does not replace it. The ratio is the
median over seeds of per-seed ratios sessionscope / by-hand; below ``1 / 0.97`` the variant's
requests/s, CPU-bound, meet the issue's bar.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from _web_work import BY_HAND, SESSIONSCOPE, Hit
from sqlalchemy import delete
from web_requests import (
    BENCHMARKS,
    Contender,
    Database,
    WebCase,
    build_cases,
    check,
    database,
    load,
    server_env,
)

from sessionscope.demo.servers import Server, gunicorn_command, launched, uvicorn_command

CLIENTS = 8
WARMUP_SECONDS = 8.0
COUNTED_SECONDS = 15.0
"""Under callgrind a request takes about 50 ms: some 300 requests are counted per run."""
SMOKE_SECONDS = 0.3
VARIANTS = (BY_HAND, SESSIONSCOPE)
_TOTAL = re.compile(r"^(?:summary|totals):\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Count:
    """What one counted run saw: requests answered 200 and the worker's instructions."""

    requests: int
    instructions: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


def command_for(case: WebCase, out: Path | None) -> Callable[[int], list[str]]:
    """The case's server command (``web_requests.py``'s), under callgrind unless ``out`` is None."""
    if case.server == "uvicorn":
        server = uvicorn_command(case.app, ["--app-dir", str(BENCHMARKS)])
    else:  # a patient worker timeout: under callgrind a heartbeat can come late
        options = ["--pythonpath", str(BENCHMARKS), *case.options, "--timeout", "600"]
        server = gunicorn_command(case.app, options)
    if out is None:
        return server
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--trace-children=yes",
        f"--callgrind-out-file={out}/cg.%p",
    ]
    return lambda port: [*valgrind, *server(port)]


def worker_pid(case: WebCase, server: Server) -> int:
    """The process that serves requests: gunicorn's forked worker, or uvicorn itself."""
    pid = server.process.pid
    if case.server == "uvicorn":
        return pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"{case.label}: expected one gunicorn worker, found {children}")
    return int(children[0])


def callgrind_control(option: str, pid: int) -> None:
    """Zero (``-z``) or dump (``-d``) the counters of the callgrind-run process ``pid``."""
    done = subprocess.run(
        ["callgrind_control", option, str(pid)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0 or "OK" not in done.stdout:
        raise RuntimeError(f"callgrind_control {option} {pid}: {done.stdout}{done.stderr}")


def dump_of(out: Path, pid: int) -> Path:
    """The one dump ``callgrind_control -d`` wrote for ``pid``."""
    dumps = glob.glob(f"{out}/cg.{pid}.*")
    if len(dumps) != 1:
        raise RuntimeError(f"expected one callgrind dump of {pid} in {out}, found {dumps}")
    return Path(dumps[0])


def dumped_instructions(out: Path, pid: int) -> int:
    """The instructions in the one dump ``callgrind_control -d`` wrote for ``pid``."""
    dump = dump_of(out, pid)
    found = _TOTAL.search(dump.read_text())
    if found is None:
        raise RuntimeError(f"no total in {dump}")
    return int(found.group(1))


@contextlib.contextmanager
def started(
    case: WebCase, variant: str, seed: int, db: Database, out: Path, *, callgrind: bool
) -> Iterator[Contender]:
    """The case's server for ``variant``, its log (and callgrind's files) in ``out``, checked."""
    env = server_env(case, variant, variant, db, CLIENTS + 2, seed=seed)
    command = command_for(case, out if callgrind else None)
    timeout = 300 if callgrind else 30
    with launched(case.label, command, env, out / f"{variant}.log", timeout=timeout) as server:
        contender = Contender(variant, variant, server)
        check(contender, db)
        yield contender


def count(
    case: WebCase,
    variant: str,
    seed: int,
    db: Database,
    *,
    callgrind: bool = True,
    seconds: tuple[float, float] = (WARMUP_SECONDS, COUNTED_SECONDS),
    keep: Path | None = None,
) -> Count:
    """Instructions per request of ``variant``'s server: ``seconds`` of warm-up, then of load
    counted. Without ``callgrind`` the server runs as it is and counts 0 (a smoke run). With
    ``keep``, the counted dump is copied there (``{case}-{variant}-{seed}.out``) to be read
    function by function with ``callgrind_annotate``."""
    warmup_seconds, counted_seconds = seconds
    with tempfile.TemporaryDirectory(prefix="sessionscope-web-instructions-") as directory:
        out = Path(directory)
        with started(case, variant, seed, db, out, callgrind=callgrind) as contender:
            port = contender.port
            warm, _ = load(port, warmup_seconds, CLIENTS)
            pid = worker_pid(case, contender.server)
            if callgrind:
                callgrind_control("-z", pid)
            requests, _ = load(port, counted_seconds, CLIENTS, first=warm)
            answered = contender.answered + warm + requests
            instructions = 0
            if callgrind:
                callgrind_control("-d", pid)
                instructions = dumped_instructions(out, pid)
                if keep is not None:
                    name = re.sub(r"\W+", "-", case.label).strip("-").lower()
                    shutil.copy(dump_of(out, pid), keep / f"{name}-{variant}-{seed}.out")
        written = db.hits(variant)
        with db.engine.begin() as conn:  # the next run starts from the same table
            conn.execute(delete(Hit).where(Hit.tag == variant))
    if requests == 0:
        raise RuntimeError(f"{case.label}, {variant}: no request answered while counted")
    if written != answered:  # one row per request answered 200: checked, warm-up and counted
        raise RuntimeError(f"{case.label}, {variant}: {answered} answered 200, {written} rows")
    return Count(requests, instructions)


def measure(
    case: WebCase, seeds: Sequence[int], db: Database, keep: Path | None = None
) -> dict[str, dict[int, Count]]:
    """Each variant's count under each seed; the two variants of a seed run at once."""
    figures: dict[str, dict[int, Count]] = {variant: {} for variant in VARIANTS}
    with ThreadPoolExecutor(len(VARIANTS)) as pool:
        for seed in seeds:
            counts = pool.map(lambda v, s=seed: count(case, v, s, db, keep=keep), VARIANTS)
            for variant, counted in zip(VARIANTS, counts, strict=True):
                figures[variant][seed] = counted
    return figures


def ratios(figures: dict[str, dict[int, Count]]) -> list[float]:
    hand, scoped = figures[BY_HAND], figures[SESSIONSCOPE]
    return [scoped[seed].per_request / hand[seed].per_request for seed in hand]


def medians(figures: dict[str, dict[int, Count]]) -> dict[str, float]:
    """Each variant's instructions per request, the median over seeds."""
    return {v: statistics.median(c.per_request for c in figures[v].values()) for v in VARIANTS}


def line(case: WebCase, figures: dict[str, dict[int, Count]]) -> str:
    per, seen = medians(figures), ratios(figures)
    requests = sum(c.requests for counts in figures.values() for c in counts.values())
    return (
        f"{case.label:<40} by-hand {per[BY_HAND]:,.0f}  sessionscope {per[SESSIONSCOPE]:,.0f}"
        f"  ratio {statistics.median(seen):.3f} (seeds: {', '.join(f'{r:.3f}' for r in seen)};"
        f" {requests} requests counted)"
    )


def markdown(results: Sequence[tuple[WebCase, dict[str, dict[int, Count]]]]) -> str:
    rows = [
        "| Server, endpoint | by-hand instructions/request | sessionscope | ratio (per seed) |",
        "|---|---:|---:|---:|",
    ]
    for case, figures in results:
        per, seen = medians(figures), ratios(figures)
        rows.append(
            f"| {case.label} | {per[BY_HAND]:,.0f} | {per[SESSIONSCOPE]:,.0f}"
            f" | {statistics.median(seen):.3f} ({', '.join(f'{r:.3f}' for r in seen)}) |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="hash seeds per variant (2)")
    parser.add_argument("-k", metavar="TEXT", default="", help="only cases whose label has TEXT")
    parser.add_argument("--smoke", action="store_true", help="no valgrind: one short run each")
    parser.add_argument("--sqlite", action="store_true", help="SQLite even if PostgreSQL answers")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the counted dumps in DIR")
    args = parser.parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    cases = [c for c in build_cases(CLIENTS) if args.k.lower() in c.label.lower()]
    if not args.smoke and shutil.which("callgrind_control") is None:
        print("valgrind (callgrind_control) is not installed: nothing to count with (see --smoke)")
        return 1
    started_at = time.monotonic()
    with (
        tempfile.TemporaryDirectory() as directory,
        database(Path(directory), sqlite=args.sqlite) as db,
    ):
        if args.smoke:
            for case in cases:
                for variant in VARIANTS:
                    smoke = (SMOKE_SECONDS, SMOKE_SECONDS)
                    counted = count(case, variant, 0, db, callgrind=False, seconds=smoke)
                    print(f"{case.label}, {variant}: {counted.requests} requests (smoke)")
            return 0
        print(
            f"Instructions per request of the web benchmark's servers under callgrind"
            f" ({db.kind}; {CLIENTS} keep-alive clients, {COUNTED_SECONDS:g} s counted after"
            f" {WARMUP_SECONDS:g} s of warm-up), {args.seeds} hash seed(s); ratio = median over"
            f" seeds of sessionscope / by-hand (at most {1 / 0.97:.3f} meets 0.97x requests/s)\n"
        )
        results = []
        for case in cases:
            figures = measure(case, range(args.seeds), db, args.keep)
            results.append((case, figures))
            print(line(case, figures), flush=True)
    table = markdown(results)
    print(f"\n{table}\n\n({time.monotonic() - started_at:.0f} s)")
    if args.json:
        report = [
            {
                "case": case.label,
                "ratios": ratios(figures),
                "per_request": {
                    v: {str(s): c.per_request for s, c in figures[v].items()} for v in VARIANTS
                },
            }
            for case, figures in results
        ]
        args.json.write_text(json.dumps({"cases": report, "markdown": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
