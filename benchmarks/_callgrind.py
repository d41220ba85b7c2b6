"""What the benchmarks that count instructions under callgrind share.

``request_instructions.py``, ``session_instructions.py`` and ``app_instructions.py`` run each
contender in a process of its own under ``valgrind --tool=callgrind``, once per hash seed, and
read the total it prints (:func:`count`; ``app_instructions.py`` also checks each run's rows).

A count holds a term that neither contender's code decides: CPython's type attribute cache (4,096
entries indexed by a type's version tag and the address of the attribute's name) misses
according to where the process's objects happen to lie, and each miss walks the type's MRO
(``find_name_in_mro``) for hundreds of instructions. Between two processes that differ only in
their environment, the same request's walks went from 58,000 to 108,000 instructions (a third of
a light request's whole difference). :func:`count_split` therefore also reads, from the profile,
the instructions spent inside those walks, so that a benchmark can print the count without them
beside the total (:class:`Split`). The two runs whose difference makes a figure must differ in
nothing but the number of requests, not even in the length of their command line (which moves
the layout): the benchmarks pass that number with a fixed width (``000300``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

VALGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
"""The command prefix: callgrind, writing no profile (only its summary on stderr)."""
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")
MISS_WALK = "find_name_in_mro"
"""CPython's walk of a type's MRO when its type attribute cache misses (3.10 to 3.13)."""
_INCLUSIVE_LINE = re.compile(r"^\s*([\d,]+)\s+(?:\([^)]*\)\s+)?\S*:(\S+?)(?:\s|$)")
T = TypeVar("T")


@dataclass(frozen=True)
class Split:
    """Instructions of a run (or of its requests, as a difference of runs): all of them, and those
    spent walking MROs on type attribute cache misses (see the module's docstring)."""

    total: float
    walks: float

    @property
    def rest(self) -> float:
        """The instructions outside the walks: what the code does, whatever its layout."""
        return self.total - self.walks

    def per(self, other: Split, n: int) -> Split:
        """``(self - other) / n``: the share of each of ``n`` requests that ``self`` ran more."""
        return Split((self.total - other.total) / n, (self.walks - other.walks) / n)


def collected(stderr: str) -> int | None:
    """The instructions a callgrind run reports on its standard error, or None if it did not."""
    found = _COLLECTED.search(stderr)
    return None if found is None else int(found.group(1))


def count(arguments: Sequence[str], seed: int, what: str) -> int:
    """Instructions of ``python arguments...`` run under callgrind with hash seed ``seed``;
    RuntimeError (naming ``what``) if it fails or callgrind reports nothing."""
    return _counted_run(arguments, seed, what, dict(os.environ), "/dev/null")


def count_split(arguments: Sequence[str], seed: int, what: str, env: dict[str, str]) -> Split:
    """:func:`count` in ``env`` (the hash seed set in it), with the instructions of the type
    attribute cache's misses read from the profile."""
    with tempfile.TemporaryDirectory(prefix="sessionscope-callgrind-") as directory:
        profile = Path(directory) / "callgrind.out"
        total = _counted_run(arguments, seed, what, env, str(profile))
        return Split(total, inclusive_cost(profile, MISS_WALK))


def _counted_run(
    arguments: Sequence[str], seed: int, what: str, env: dict[str, str], profile: str
) -> int:
    command = [*VALGRIND[:-1], f"--callgrind-out-file={profile}"]
    env = {**env, "PYTHONHASHSEED": str(seed)}
    done = subprocess.run(
        [*command, sys.executable, *arguments], env=env, capture_output=True, text=True, check=False
    )
    instructions = collected(done.stderr)
    if done.returncode != 0 or instructions is None:
        raise RuntimeError(f"{what}: the counted run failed:\n{done.stderr[-2000:]}")
    return instructions


def inclusive_cost(profile: Path, function: str) -> int:
    """The instructions executed inside ``function`` (callees included) in a callgrind profile,
    summed over every entry of that name (inlined fragments have entries of their own), as
    ``callgrind_annotate --inclusive=yes`` reports them (recursive entries, ``name'2``, are
    already inside the outer one)."""
    done = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--auto=no", "--threshold=100", str(profile)],
        capture_output=True,
        text=True,
        check=True,
    )
    return inclusive_in_annotation(done.stdout, function)


def inclusive_in_annotation(annotation: str, function: str) -> int:
    """:func:`inclusive_cost` from ``callgrind_annotate``'s output: its lines ``Ir (share)
    file:function [object]`` whose function is ``function`` exactly (``name'2`` is not)."""
    total = 0
    for line in annotation.splitlines():
        found = _INCLUSIVE_LINE.match(line)
        if found is not None and found.group(2) == function:
            total += int(found.group(1).replace(",", ""))
    return total


def per_seed(
    count: Callable[[str, int], T], contenders: Sequence[str], seeds: Sequence[int], jobs: int
) -> dict[str, dict[int, T]]:
    """``count(contender, seed)`` for each contender and seed, ``jobs`` at a time: by contender,
    then seed."""
    pairs = [(contender, seed) for seed in seeds for contender in contenders]
    with ThreadPoolExecutor(jobs) as pool:
        counted = list(pool.map(lambda pair: count(*pair), pairs))
    figures: dict[str, dict[int, T]] = {contender: {} for contender in contenders}
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
