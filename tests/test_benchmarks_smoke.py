"""The benchmarks still run. Timings are never checked here: only that every case yields numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import registry_lookup  # noqa: E402
import unit_memory  # noqa: E402
from _envs import ENVS  # noqa: E402
from _timing import SMOKE  # noqa: E402


def load_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "sessionscope_benchmarks_run", BENCHMARKS / "run.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = registry_lookup.build_cases(live_unit_counts=(3,))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.where}" for c in CASES])
def test_lookup_case_yields_timings(case: registry_lookup.Case) -> None:
    result = registry_lookup.run_case(case, SMOKE)
    assert len(result.anchor) == len(result.candidate) == SMOKE.rounds
    assert all(ns > 0 for ns in result.anchor + result.candidate)
    assert result.ratio > 0 and result.ratio_min > 0


UNIT_CONTESTS = list(dict.fromkeys((c.unit, c.contest) for c in CASES))


@pytest.mark.parametrize(
    "unit,contest", UNIT_CONTESTS, ids=[f"{u}-{c.anchor}" for u, c in UNIT_CONTESTS]
)
def test_contenders_give_each_unit_its_own_session(
    unit: str, contest: registry_lookup.Contest
) -> None:
    """What the cases time is a lookup of the unit's own session, in both registries."""
    anchor, candidate = contest.make_anchor(), contest.make_candidate()
    held: list[Any] = []
    session_type = type(contest.registries.factory())

    def hold() -> None:
        held.extend((anchor(), candidate()))

    def body() -> None:
        hold()
        assert anchor() is held[-2] and candidate() is held[-1]
        assert anchor.info is held[-2].info and candidate.info is held[-1].info

    ENVS[unit](body, hold, 3)
    assert len({id(s) for s in held}) == len(held) == 8
    assert all(isinstance(s, session_type) for s in held)


@pytest.mark.parametrize("row", unit_memory.ROWS)
def test_memory_case_yields_sizes(row: str) -> None:
    result = unit_memory.measure_memory(row, 20)
    assert result.plain.peak > 0 and result.sqlalchemy.peak > 0 and result.sessionscope.peak > 0


def test_run_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert load_run().main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["lookups"] and all(row["candidate_ns_median"] > 0 for row in report["lookups"])
    assert len(report["memory"]) == len(unit_memory.ROWS)
    assert report["markdown"] in capsys.readouterr().out
