"""Misses of CPython's type attribute cache per request of the web benchmark's WSGI app, natively.

    python benchmarks/type_cache_misses.py             # PostgreSQL (SQLite if unreachable), 4 seeds
    python benchmarks/type_cache_misses.py --seeds 2
    python benchmarks/type_cache_misses.py --guard off # sessionscope's registry unguarded
    python benchmarks/type_cache_misses.py --smoke     # no perf: only checks the code works

Why: timed, sessionscope's request costs more CPU next to a hand-written one than its
instructions under callgrind say (docs/design.md, "What a request costs, and where"). One term
that callgrind cannot show as it is at full speed: which attribute lookups miss CPython's type
attribute cache (4,096 entries, indexed by a type's version tag and the address of the name),
since that depends on where objects lie, and valgrind's allocator lays them out differently. A
miss walks the type's MRO (``find_name_in_mro``).

How: a uprobe on libpython's ``find_name_in_mro`` (``perf probe``; made once, kept), counted by
``perf stat`` over ``app_instructions.py``'s child (a warm-up, then N requests from one thread,
as a gthread worker's thread calls them), twice per variant and hash seed: with 0 and with N
requests after the warm-up; the difference over N is the misses of one request. Needs ``perf``
with uprobes and the right to add them (root, as on the development machine).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path

from _web_work import BY_HAND, GUARDS, SESSIONSCOPE, VARIANTS
from app_instructions import WARMUP, run_child
from web_requests import Database, database

COUNTED = 1000
FUNCTION = "find_name_in_mro"


def interpreter_binary() -> str:
    """Where ``find_name_in_mro`` is: libpython for a shared build, else the executable."""
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        library = Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("INSTSONAME")
        if library.exists():
            return str(library)
    return sys.executable


def probe_event(binary: str) -> str:
    """The perf event of the uprobe on ``find_name_in_mro`` in ``binary``, added if missing."""
    listed = subprocess.run(["perf", "probe", "-l"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        found = re.match(rf"\s*(\S+:{FUNCTION})\s.*in {re.escape(binary)}", line)
        if found:
            return found.group(1)
    added = subprocess.run(
        ["perf", "probe", "-x", binary, "-a", FUNCTION], capture_output=True, text=True
    )
    found = re.search(rf"(\S+:{FUNCTION})", added.stdout + added.stderr)
    if added.returncode != 0 or found is None:
        raise RuntimeError(f"perf probe could not add a uprobe on {FUNCTION}:\n{added.stderr}")
    return found.group(1)


def _count(db: Database, variant: str, guard: str, seed: int, requests: int, event: str) -> int:
    """Misses in one child process (the warm-up and ``requests``; 0 without ``event``)."""
    prefix = ["perf", "stat", "-x", ",", "-e", event, "--"] if event else []
    tag = f"tc-{variant[:6]}-{seed}-{requests}"
    done = run_child(db, variant, seed, requests, prefix=prefix, guard=guard, tag=tag)
    if not event:
        return 0
    counted = re.search(rf"^(\d+),[^,]*,{re.escape(event)}", done.stderr, re.MULTILINE)
    if counted is None:
        raise RuntimeError(f"perf stat printed no count for {event}:\n{done.stderr[-2000:]}")
    return int(counted.group(1))


def per_request(db: Database, variant: str, guard: str, seed: int, event: str) -> float:
    runs = [_count(db, variant, guard, seed, n, event) for n in (COUNTED, 0)]
    return (runs[0] - runs[1]) / COUNTED


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=4, help="hash seeds (4)")
    parser.add_argument("--guard", choices=GUARDS, default="raise", help="sessionscope's guard")
    parser.add_argument("--smoke", action="store_true", help="no perf: each variant once")
    parser.add_argument("--sqlite", action="store_true", help="SQLite even if PostgreSQL answers")
    args = parser.parse_args(argv)
    event = ""
    if not args.smoke:
        if shutil.which("perf") is None:
            print("perf is not installed: nothing to count with (see --smoke)")
            return 1
        event = probe_event(interpreter_binary())
    with (
        tempfile.TemporaryDirectory() as directory,
        database(Path(directory), sqlite=args.sqlite) as db,
    ):
        if args.smoke:
            for variant in VARIANTS:
                _count(db, variant, args.guard, 0, 3, event)
            print(f"{db.kind}: each variant served and wrote its rows (smoke: nothing counted)")
            return 0
        print(
            f"Type attribute cache misses ({FUNCTION} calls, uprobe {event}) per request of the"
            f" web benchmark's WSGI app in process ({db.kind}; {COUNTED} requests after {WARMUP}"
            f" of warm-up), sessionscope's guard={args.guard!r}\n"
        )
        figures = {
            v: [per_request(db, v, args.guard, s, event) for s in range(args.seeds)]
            for v in VARIANTS
        }
    for variant in (BY_HAND, SESSIONSCOPE):
        seeds = ", ".join(f"{m:.1f}" for m in figures[variant])
        print(f"{variant:<13} median {statistics.median(figures[variant]):6.1f}  (seeds: {seeds})")
    added = [s - h for h, s in zip(figures[BY_HAND], figures[SESSIONSCOPE], strict=True)]
    print(f"sessionscope - by-hand, per seed: {', '.join(f'{a:+.1f}' for a in added)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
