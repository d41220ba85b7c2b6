"""The web benchmark's WSGI application called in process, counted in instructions: no server.

    python benchmarks/app_instructions.py             # PostgreSQL (SQLite if unreachable), 3 seeds
    python benchmarks/app_instructions.py --seeds 1
    python benchmarks/app_instructions.py --smoke     # no valgrind: only checks the code works
    python benchmarks/app_instructions.py --json out.json

Why: ``web_instructions.py`` counts the servers themselves, and a server's count also holds what
the load's timing decides (how many polls and thread switches a request takes) and where each
process's objects happen to lie. The latter is large: CPython's type attribute cache (4,096
entries, indexed by type version and name address) loses about 170 lookups a request in a
gunicorn worker, variant or not, and which ones (a shallow class or one with a deep MRO) differs
from one memory layout to the next; under valgrind's allocator the layout is not the native one.
Here both variants of ``web_wsgi_app.py`` (``SessionScopeMiddleware`` over ``Session()``, and
the hand-written session closed in a ``finally``) serve the same requests, called directly from
one thread as a gthread worker's thread calls them: a process of its own per variant, seed and
length under ``valgrind --tool=callgrind``; two runs that differ only in how many requests follow
the warm-up give the instructions of those requests alone. What is left is the layout of this
process, which the hash seed moves: the ratio is the median over seeds, per-seed figures too; and
since the type attribute cache's misses are most of that term, the ratio of the instructions
outside their walks is printed too (see ``_callgrind.py``).

Every answer is checked (200, its variant), and every request's row is counted in the database.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from _callgrind import MISS_WALK, VALGRIND, Split, collected, inclusive_cost, per_seed
from _web_work import BY_HAND, ITEMS, SESSIONSCOPE, VARIANTS
from sqlalchemy import delete
from web_requests import Database, Hit, database

WARMUP = 200
COUNTED = 400
"""Requests counted: the difference between a run of ``WARMUP`` and one of ``WARMUP + COUNTED``."""
POOL = 5


def child(requests: int) -> int:
    """In the counted process (configured by ``BENCH_WEB_*``): the warm-up, then ``requests``."""
    import web_wsgi_app

    app = web_wsgi_app.create_app()
    variant = os.environ["BENCH_WEB_TAG"]
    failures: list[BaseException] = []

    def serve() -> None:  # in a thread of its own, as a gthread worker's thread serves
        try:
            for n in range(WARMUP + requests):
                _call(app, n, variant)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    thread = threading.Thread(target=serve, name="requests")
    thread.start()
    thread.join()
    if failures:
        raise failures[0]
    return 0


def _call(app: Any, n: int, variant: str) -> None:
    """One ``POST /work/{item}``, as a server calls the application: body iterated, closed."""
    answered: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        answered.append(status)

    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": f"/work/{1 + n % ITEMS}"}
    body: Iterable[bytes] = app(environ, start_response)
    try:
        payload = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    if answered != ["200 OK"] or json.loads(payload)["variant"] != variant:
        raise RuntimeError(f"request {n}: {answered} {payload!r}")


def _env(db: Database, variant: str, tag: str, seed: int) -> dict[str, str]:
    return {
        **os.environ,
        "BENCH_WEB_URL": db.url,
        "BENCH_WEB_VARIANT": variant,
        "BENCH_WEB_TAG": tag,
        "BENCH_WEB_POOL": str(POOL),
        "PYTHONHASHSEED": str(seed),
    }


def run_child(
    db: Database,
    variant: str,
    seed: int,
    requests: int,
    *,
    prefix: Sequence[str] = (),
    guard: str = "raise",
    tag: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run :func:`child` (the warm-up, then ``requests``) in a process of its own under
    ``prefix`` (a counting tool's command), with sessionscope's ``guard``; its rows checked, then
    deleted. What it printed is returned, for the counting tool's figure."""
    tag = tag or f"{variant[:8]}-{seed}-{requests}"  # (each run's own rows; 20 characters)
    command = [*prefix, sys.executable, __file__, "--child", "--requests", f"{requests:06}"]
    env = {**_env(db, variant, tag, seed), "BENCH_WEB_GUARD": guard}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")])
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant}, seed {seed}: the run failed:\n{done.stderr[-2000:]}")
    written = db.hits(tag)
    with db.engine.begin() as conn:
        conn.execute(delete(Hit).where(Hit.tag == tag))
    if written != WARMUP + requests:
        raise RuntimeError(f"{variant}, seed {seed}: {WARMUP + requests} requests, {written} rows")
    return done


def _run(db: Database, variant: str, seed: int, requests: int, *, callgrind: bool) -> Split:
    """A child process's instructions, and those in type attribute cache misses' walks (both 0
    without callgrind)."""
    if not callgrind:
        run_child(db, variant, seed, requests)
        return Split(0, 0)
    with tempfile.TemporaryDirectory(prefix="sessionscope-callgrind-") as directory:
        profile = Path(directory) / "callgrind.out"
        prefix = [*VALGRIND[:-1], f"--callgrind-out-file={profile}"]
        done = run_child(db, variant, seed, requests, prefix=prefix)
        instructions = collected(done.stderr)
        if instructions is None:
            raise RuntimeError(
                f"{variant}, seed {seed}: callgrind reported nothing:\n{done.stderr}"
            )
        return Split(instructions, inclusive_cost(profile, MISS_WALK))


def per_request(db: Database, variant: str, seed: int, counted: int = COUNTED) -> Split:
    """Instructions of one request of ``variant``: (warm-up + ``counted``) minus warm-up alone."""
    runs = [_run(db, variant, seed, n, callgrind=True) for n in (counted, 0)]
    return runs[0].per(runs[1], counted)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="hash seeds per variant (3)")
    parser.add_argument("--jobs", type=int, default=2, help="counted processes at once (2)")
    parser.add_argument("--smoke", action="store_true", help="no valgrind: each variant once")
    parser.add_argument("--sqlite", action="store_true", help="SQLite even if PostgreSQL answers")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=COUNTED, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.requests)
    if not args.smoke and shutil.which("valgrind") is None:
        print("valgrind is not installed: nothing to count with (see --smoke)")
        return 1
    with (
        tempfile.TemporaryDirectory() as directory,
        database(Path(directory), sqlite=args.sqlite) as db,
    ):
        if args.smoke:
            for variant in VARIANTS:
                _run(db, variant, 0, 3, callgrind=False)
            print(f"{db.kind}: each variant served and wrote its rows (smoke: nothing counted)")
            return 0
        print(
            f"Instructions per request of the web benchmark's WSGI app called in process"
            f" ({db.kind}; {COUNTED} requests after {WARMUP} of warm-up, callgrind),"
            f" {args.seeds} hash seed(s); ratio = median over seeds of sessionscope / by-hand\n"
        )
        count = lambda variant, seed: per_request(db, variant, seed)  # noqa: E731
        figures = per_seed(count, VARIANTS, range(args.seeds), args.jobs)
    by_hand, ours = figures[BY_HAND], figures[SESSIONSCOPE]
    seen = [ours[s].total / by_hand[s].total for s in by_hand]
    seen_rest = [ours[s].rest / by_hand[s].rest for s in by_hand]
    median = {v: statistics.median(f.total for f in figures[v].values()) for v in VARIANTS}
    walks = {v: statistics.median(f.walks for f in figures[v].values()) for v in VARIANTS}
    print(
        f"by-hand {median[BY_HAND]:,.0f}  sessionscope {median[SESSIONSCOPE]:,.0f}"
        f"  added {median[SESSIONSCOPE] - median[BY_HAND]:,.0f}"
        f"  ratio {statistics.median(seen):.3f} (seeds: {', '.join(f'{r:.3f}' for r in seen)})"
        f"\nof which in type cache misses' walks: by-hand {walks[BY_HAND]:,.0f}"
        f"  sessionscope {walks[SESSIONSCOPE]:,.0f}; outside them: ratio"
        f" {statistics.median(seen_rest):.3f} (seeds: {', '.join(f'{r:.3f}' for r in seen_rest)})"
    )
    if args.json:
        report = {
            "database": db.kind,
            "instructions": {v: {s: f.total for s, f in figures[v].items()} for v in figures},
            "miss_walks": {v: {s: f.walks for s, f in figures[v].items()} for v in figures},
            "ratios": seen,
            "ratios_outside_miss_walks": seen_rest,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
