"""What the benchmarks that count instructions under callgrind share.

``request_instructions.py``, ``session_instructions.py`` and ``app_instructions.py`` run each
contender in a process of its own under ``valgrind --tool=callgrind``, once per hash seed, and
read the total it prints (:func:`count`; ``app_instructions.py`` also checks each run's rows).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VALGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
"""The command prefix: callgrind, writing no profile (only its summary on stderr)."""
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def collected(stderr: str) -> int | None:
    """The instructions a callgrind run reports on its standard error, or None if it did not."""
    found = _COLLECTED.search(stderr)
    return None if found is None else int(found.group(1))


def count(arguments: Sequence[str], seed: int, what: str) -> int:
    """Instructions of ``python arguments...`` run under callgrind with hash seed ``seed``;
    RuntimeError (naming ``what``) if it fails or callgrind reports nothing."""
    command = [*VALGRIND, sys.executable, *arguments]
    env = {**os.environ, "PYTHONHASHSEED": str(seed)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    instructions = collected(done.stderr)
    if done.returncode != 0 or instructions is None:
        raise RuntimeError(f"{what}: the counted run failed:\n{done.stderr[-2000:]}")
    return instructions


def per_seed(
    count: Callable[[str, int], float], contenders: Sequence[str], seeds: Sequence[int], jobs: int
) -> dict[str, dict[int, float]]:
    """``count(contender, seed)`` for each contender and seed, ``jobs`` at a time: by contender,
    then seed."""
    pairs = [(contender, seed) for seed in seeds for contender in contenders]
    with ThreadPoolExecutor(jobs) as pool:
        counted = list(pool.map(lambda pair: count(*pair), pairs))
    figures: dict[str, dict[int, float]] = {contender: {} for contender in contenders}
    for (contender, seed), instructions in zip(pairs, counted, strict=True):
        figures[contender][seed] = instructions
    return figures


def counting_parser(doc: str, seeds: int, smoke: str) -> argparse.ArgumentParser:
    """The options every counting benchmark takes: ``--seeds``, ``--jobs``, ``--smoke`` (``smoke``
    says what it does), ``--json``, and the hidden ``--child`` its counted processes are run with.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--seeds", type=int, default=seeds, help=f"hash seeds per contender ({seeds})"
    )
    parser.add_argument("--jobs", type=int, default=2, help="counted processes at once (2)")
    parser.add_argument("--smoke", action="store_true", help=f"no valgrind: {smoke}")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser
