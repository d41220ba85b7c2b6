"""The benchmarks still run. Timings are never checked here: only that every case yields numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import registry_lookup  # noqa: E402
import unit_memory  # noqa: E402
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
    if case.contest.missing:
        pytest.skip(case.contest.missing)
    result = registry_lookup.run_case(case, SMOKE)
    assert len(result.anchor) == len(result.candidate) == SMOKE.rounds
    assert all(ns > 0 for ns in result.anchor + result.candidate)
    assert result.ratio > 0 and result.ratio_min > 0


@pytest.mark.parametrize("unit", unit_memory.UNITS)
def test_memory_case_yields_sizes(unit: str) -> None:
    result = unit_memory.measure_memory(unit, 20)
    assert result.plain.peak > 0 and result.sqlalchemy.peak > 0 and result.sessionscope.peak > 0


def test_run_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert load_run().main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["lookups"] and all(row["candidate_ns_median"] > 0 for row in report["lookups"])
    assert len(report["memory"]) == len(unit_memory.UNITS)
    assert report["markdown"] in capsys.readouterr().out
