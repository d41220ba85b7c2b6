"""The benchmarks still run. Timings are never checked here: only that every case yields numbers."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import statistics
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from sqlalchemy import event

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import guard_overhead  # noqa: E402
import registry_lookup  # noqa: E402
import unit_memory  # noqa: E402
import web_requests  # noqa: E402
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


def test_guard_cases_yield_timings_after_checking_the_work() -> None:
    results = list(guard_overhead.run_cases(guard_overhead.CASES, SMOKE))
    assert [r.case for r in results] == list(guard_overhead.CASES)
    for result in results:
        if result.case.listener:
            contenders: tuple[str, ...] = (guard_overhead.NEVER, guard_overhead.USED)
            # the "never" worker really ran without the guard's write checks, the other with them
            assert {name: c.write_checks > 0 for name, c in result.checks.items()} == {
                guard_overhead.NEVER: False,
                guard_overhead.USED: True,
            }
        else:
            contenders = (guard_overhead.RAISE, guard_overhead.OFF, guard_overhead.SQLALCHEMY)
        assert tuple(result.rounds) == tuple(result.checks) == contenders
        assert all(len(ns) == SMOKE.rounds for ns in result.rounds.values())
        assert all(ns > 0 for rounds in result.rounds.values() for ns in rounds)
        assert result.headline.ratio > 0 and result.headline.ratio_min > 0
        # only guard="raise" sessions refuse another thread
        assert [c.guarded for c in result.checks.values()] == [
            name == guard_overhead.RAISE for name in contenders
        ]
        works = [c.work for c in result.checks.values()]
        if not result.case.is_workload:
            assert works == [None] * len(contenders)
            continue
        for work in works:  # counted by events on the engine and each contender's sessionmaker
            assert work is not None
            assert work.relationship_loads == 2 and work.commits == 1
            assert work.rows_added == {"bench_authors": 1, "bench_books": 4}
            assert work.statements["SELECT"] >= 4 and work.statements["UPDATE"] == 2
            assert work.statements["INSERT"] >= 3


@pytest.mark.parametrize("contender", guard_overhead.REGISTRIES)
def test_unit_of_work_writes_rows_and_lazy_loads(contender: str) -> None:
    """Independently of the benchmark's own check: what three units of work leave behind."""
    database = guard_overhead.Database()
    maker = database.new_maker()
    registry = guard_overhead.REGISTRIES[contender](maker)
    lazy_loads: list[bool] = []
    event.listen(maker, "do_orm_execute", lambda s: lazy_loads.append(s.is_relationship_load))
    before = database.rows()
    work = guard_overhead.UnitOfWork(registry)
    sessions = []
    for _ in range(3):
        sessions.append(registry())
        work()
    assert database.rows() == {
        "bench_authors": before["bench_authors"] + 3,
        "bench_books": before["bench_books"] + 12,
    }
    assert sum(lazy_loads) == 6
    assert len({id(s) for s in sessions}) == 3  # each unit of work in a session of its own


def test_guard_benchmark_refuses_a_contender_that_did_not_work() -> None:
    case = guard_overhead.CASES[0]
    assert case.is_workload
    done = guard_overhead.WorkDone({"SELECT": 4}, 2, 1, {"bench_authors": 1, "bench_books": 4})
    checks = {
        guard_overhead.RAISE: guard_overhead.Check(True, 1, done),
        guard_overhead.OFF: guard_overhead.Check(False, 1, done),
        guard_overhead.SQLALCHEMY: guard_overhead.Check(False, 1, done),
    }
    guard_overhead.verify(case, checks)
    idle = guard_overhead.WorkDone({}, 0, 1, {"bench_authors": 0, "bench_books": 0})
    for broken in (
        {guard_overhead.OFF: guard_overhead.Check(False, 1, idle)},
        {guard_overhead.RAISE: guard_overhead.Check(False, 1, done)},
        {guard_overhead.OFF: guard_overhead.Check(True, 1, done)},
    ):
        with pytest.raises(RuntimeError, match=re.escape(case.label)):
            guard_overhead.verify(case, {**checks, **broken})


def test_guard_benchmark_raise_contender_is_guarded() -> None:
    """The "raise" registry's session is really guarded: another thread is refused."""
    database = guard_overhead.Database()
    raising = guard_overhead.REGISTRIES[guard_overhead.RAISE](database.new_maker())
    off = guard_overhead.REGISTRIES[guard_overhead.OFF](database.new_maker())
    assert guard_overhead.refuses_other_threads(raising)
    assert not guard_overhead.refuses_other_threads(off)


def test_run_writes_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    assert load_run().main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["lookups"] and all(row["candidate_ns_median"] > 0 for row in report["lookups"])
    assert len(report["memory"]) == len(unit_memory.ROWS)
    assert [row["case"] for row in report["guard"]] == [c.label for c in guard_overhead.CASES]
    assert all(row["ratios"] and min(row["ns_median"].values()) > 0 for row in report["guard"])
    assert report["markdown"] in capsys.readouterr().out
    assert report["web"] == []  # the web cases start servers: only when asked for


def test_web_cases_serve_both_variants_and_stop_their_servers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-k web`` runs every web case (servers, checks, rounds); every server is stopped after."""
    out = tmp_path / "bench.json"
    assert load_run().main(["--smoke", "-k", "web", "--no-memory", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["lookups"] == [] and report["guard"] == [] and report["memory"] == []
    assert [row["case"] for row in report["web"]] == [c.label for c in web_requests.CASES]
    for row in report["web"]:
        assert row["contenders"] == [web_requests.BY_HAND, web_requests.SESSIONSCOPE]
        for rounds in (row["by_hand_rps_rounds"], row["sessionscope_rps_rounds"]):
            assert len(rounds) == web_requests.SMOKE.rounds * web_requests.SMOKE.pairs
            assert min(rounds) > 0
        # every 200 counted wrote its row (checked by the benchmark too), the checked ones at least
        assert min(row["rows_written"].values()) > web_requests.CHECK_REQUESTS
        # one pair: resampling it gives back its own ratio
        assert row["ratio_interval_95"] == [row["ratio_median"]] * 2
        for url in row["servers"]:
            with pytest.raises(httpx.TransportError):
                httpx.get(url + "/health", timeout=2)
    assert report["markdown"] in capsys.readouterr().out


def test_web_check_refuses_a_server_that_answers_for_another(tmp_path: Path) -> None:
    """A server whose answers and rows are not the contender's own stops the benchmark."""
    case = web_requests.CASES[-1]
    with web_requests.database(tmp_path) as database:
        with web_requests.serve(case, web_requests.BY_HAND, "other", database, tmp_path, 2) as s:
            contender = web_requests.Contender(web_requests.BY_HAND, web_requests.BY_HAND, s)
            with pytest.raises(RuntimeError, match="answered 200"):
                web_requests.check(contender, database)


def test_ship_receive_benchmark_yields_figures_for_each_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ship_receive.py --smoke`` on PostgreSQL: each case checked (statements, objects), timed."""
    from tests.conftest import postgres_available, require_server

    reason = postgres_available()
    if reason:
        require_server(reason)
    import ship_receive

    out = tmp_path / "ship.json"
    assert ship_receive.main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["case"] for row in report["results"]] == [c.label for c in ship_receive.CASES]
    for row in report["results"]:
        assert row["statements"][ship_receive.SHIP] == 0  # received without a SELECT
        assert row["statements"][ship_receive.SHIP_CHECKED] == 1  # the batched version check
        assert min(row["ns_per_object"].values()) > 0 and min(row["ratio_to_requery"].values()) > 0
    assert report["markdown"] in capsys.readouterr().out


def test_fan_out_benchmark_yields_figures_for_each_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``fan_out.py --smoke`` on PostgreSQL: both contenders checked (every item), timed."""
    from tests.conftest import postgres_available, require_server

    reason = postgres_available()
    if reason:
        require_server(reason)
    import fan_out

    out = tmp_path / "fan_out.json"
    assert fan_out.main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["case"] for row in report["results"]] == ["ids", "objects"]
    for row in report["results"]:
        assert min(row["ns_per_item"].values()) > 0 and row["ratio"] > 0
    assert report["markdown"] in capsys.readouterr().out


def test_per_request_benchmark_yields_figures_for_each_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``per_request.py --smoke``: every contender checked (same statements, guard on), timed;
    PostgreSQL only when a server answers."""
    import per_request

    out = tmp_path / "per_request.json"
    assert per_request.main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    cases = [row["case"] for row in report["results"]]
    assert cases[0] == "SQLite file"
    assert set(cases) <= set(per_request.DATABASES)
    for row in report["results"]:
        assert set(row["ns_per_request"]) == {
            per_request.BY_HAND,
            per_request.SCOPE,
            per_request.SCOPE_OFF,
        }
        assert min(row["ns_per_request"].values()) > 0
        assert all(ratio["ratio_median"] > 0 for ratio in row["ratios"].values())
    assert report["markdown"] in capsys.readouterr().out


def test_unit_cost_benchmark_yields_figures_for_each_kind_of_unit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``unit_cost.py --smoke``: every kind of unit, every contender, timed."""
    import unit_cost

    out = tmp_path / "unit_cost.json"
    assert unit_cost.main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["kind"] for row in report["results"]] == list(unit_cost.KINDS)
    for row in report["results"]:
        assert set(row["us_per_unit"]) == {
            unit_cost.SQLALCHEMY,
            unit_cost.SESSIONSCOPE,
            unit_cost.SESSIONSCOPE_REMOVE,
        }
        assert min(row["us_per_unit"].values()) > 0
        assert row["ratio"] > 0 and row["ratio_with_remove"] > 0
    assert report["markdown"] in capsys.readouterr().out


def test_guard_in_tasks_benchmark_times_each_call_in_both_modes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``guard_in_tasks.py --smoke``: each call timed with the guard on and off (its check that
    the guarded session refuses an earlier task passed, or it would have raised)."""
    import guard_in_tasks

    out = tmp_path / "guard_in_tasks.json"
    assert guard_in_tasks.main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["case"] for row in report["results"]] == [
        "session.get(), identity-map hit",
        "attribute write",
        "await AsyncSession.get(), identity-map hit",
    ]
    for row in report["results"]:
        assert set(row["ns_per_call"]) == {"raise", "off"}
        assert min(row["ns_per_call"].values()) > 0 and row["ratio"] > 0
    assert report["markdown"] in capsys.readouterr().out


@pytest.mark.parametrize("sqlite", [True, False], ids=["sqlite", "postgresql"])
def test_request_cpu_benchmark_yields_figures_for_every_variant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sqlite: bool
) -> None:
    """``request_cpu.py --smoke``: each variant served its requests (answers and rows checked by
    the benchmark itself), timed."""
    if not sqlite:
        from tests.conftest import postgres_available, require_server

        reason = postgres_available()
        if reason:
            require_server(reason)
    import request_cpu

    out = tmp_path / "request_cpu.json"
    args = ["--smoke", "--json", str(out)] + (["--sqlite"] if sqlite else [])
    assert request_cpu.main(args) == 0
    report = json.loads(out.read_text())
    assert report["database"].startswith("SQLite" if sqlite else "PostgreSQL")
    assert list(report["us_per_request"]) == list(request_cpu.VARIANTS)
    assert min(report["us_per_request"].values()) > 0
    assert report["ratio"]["by hand"] == 1.0
    assert report["markdown"] in capsys.readouterr().out


def test_request_instructions_benchmark_runs_every_contender(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``request_instructions.py --smoke``: each contender's counted process body runs (checked
    as ``per_request.verify`` checks it), without valgrind."""
    import request_instructions

    assert request_instructions.main(["--smoke", "-k", "sqlite"]) == 0
    assert "SQLite file: every contender ran" in capsys.readouterr().out


@pytest.mark.slow
def test_request_instructions_counts_a_request_under_callgrind() -> None:
    """A counted run under valgrind gives instructions per request, and the share of them in the
    type attribute cache's misses, read from its profile (skipped without valgrind)."""
    import request_instructions

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    counted = request_instructions.per_request_instructions("SQLite file", "by hand", 0, 20)
    assert 100_000 < counted.total < 100_000_000  # a light ORM request: about 1.5 million
    assert 0 < counted.walks < counted.total / 4  # a few hundred misses' walks at most


def test_session_instructions_benchmark_runs_every_contender(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``session_instructions.py --smoke``: each contender makes and removes its session (and
    is checked to be guarded, or not, as it says), without valgrind."""
    import session_instructions

    assert session_instructions.main(["--smoke"]) == 0
    assert "every contender made and removed its session" in capsys.readouterr().out


@pytest.mark.slow
def test_session_instructions_counts_an_operation_under_callgrind() -> None:
    """A counted run under valgrind gives instructions per ``Session()`` + ``remove()``."""
    import session_instructions

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    counted = session_instructions.per_operation(session_instructions.RAISE, 0, 50)
    assert 20_000 < counted < 1_000_000  # about 105,000 on CPython 3.11


def test_web_instructions_benchmark_serves_each_variant_and_checks_its_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``web_instructions.py --smoke``: each variant's server starts, answers, and wrote one row
    per request answered (checked by the benchmark itself), without valgrind."""
    import web_instructions

    assert web_instructions.main(["--smoke", "-k", "gthread"]) == 0
    out = capsys.readouterr().out
    for variant in web_instructions.VARIANTS:
        found = re.search(rf"gunicorn gthread WSGI, {variant}: (\d+) requests", out)
        assert found is not None and int(found.group(1)) > 0, out


def test_app_instructions_benchmark_calls_each_variant_and_checks_its_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``app_instructions.py --smoke``: each variant of the web benchmark's WSGI app answers
    every request called in process, and wrote its rows (both checked by the benchmark)."""
    import app_instructions

    assert app_instructions.main(["--smoke"]) == 0
    assert "each variant served and wrote its rows" in capsys.readouterr().out


def test_type_cache_misses_benchmark_calls_each_variant_and_checks_its_rows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``type_cache_misses.py --smoke``: the same children as ``app_instructions.py``, with the
    guard chosen, each checked for its rows; nothing counted (no uprobe is added)."""
    import type_cache_misses

    assert type_cache_misses.main(["--smoke", "--guard", "off"]) == 0
    assert "each variant served and wrote its rows" in capsys.readouterr().out
    assert Path(type_cache_misses.interpreter_binary()).exists()


@pytest.mark.slow
def test_app_instructions_counts_a_request_under_callgrind(tmp_path: Path) -> None:
    """In process under callgrind, a request of the web app costs about two million
    instructions (the zero-request run subtracted); skipped without valgrind."""
    import app_instructions

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    with web_requests.database(tmp_path) as db:
        counted = app_instructions.per_request(db, "sessionscope", 0, 20)
    assert 300_000 < counted.total < 30_000_000
    assert 0 < counted.walks < counted.total / 4


@pytest.mark.slow
@pytest.mark.parametrize("case_text", ["gevent", "uvicorn FastAPI def"])
def test_web_instructions_counts_a_servers_worker_under_callgrind(
    case_text: str, tmp_path: Path
) -> None:
    """Counted under callgrind, a request of the real server's worker (gunicorn's forked worker,
    uvicorn's process) costs millions of instructions: the zero and the dump reached the process
    that serves (skipped without valgrind)."""
    import web_instructions

    if shutil.which("callgrind_control") is None:
        pytest.skip("valgrind is not installed")
    (case,) = [c for c in web_requests.CASES if case_text in c.label]
    with web_requests.database(tmp_path) as db:
        counted = web_instructions.count(case, "by-hand", 0, db, seconds=(3.0, 4.0))
    assert counted.requests > 0
    assert 500_000 < counted.per_request < 50_000_000  # about 2-3 million


def test_unit_instructions_benchmark_runs_every_kind_and_contender(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``unit_instructions.py --smoke``: units of each kind take a session of their own with each
    contender, and sessionscope's ended units leave nothing in the registry, without valgrind."""
    import unit_instructions

    assert unit_instructions.main(["--smoke"]) == 0
    assert "every contender ran its units" in capsys.readouterr().out


@pytest.mark.slow
def test_unit_instructions_counts_a_unit_under_callgrind() -> None:
    """A counted run under valgrind gives instructions per unit (skipped without valgrind)."""
    import unit_instructions

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    counted = unit_instructions.per_unit("thread", unit_instructions.SESSIONSCOPE, 0, 20)
    assert 50_000 < counted < 5_000_000  # about 265,000 on CPython 3.11


def test_the_interval_over_pairs_resamples_whole_pairs() -> None:
    """Pairs that agree give a tight interval around their ratio; pairs that disagree a wide
    one, which holds the median of all rounds, and no pair's rounds are split up."""
    agreeing = [[0.95, 0.96, 0.95, 0.96]] * 10
    assert web_requests.interval_over_pairs(agreeing) == pytest.approx((0.955, 0.955))
    spread = [[0.80, 0.82], [0.90, 0.92], [1.00, 1.02], [0.95, 0.96], [0.85, 0.86]]
    low, high = web_requests.interval_over_pairs(spread)
    everything = sorted(r for pair in spread for r in pair)
    assert everything[0] <= low < statistics.median(everything) < high <= everything[-1]
    assert high - low > 0.05
    assert web_requests.interval_over_pairs(spread) == (low, high)  # seeded
    assert web_requests.interval_over_pairs([]) == (0.0, 0.0)


@pytest.mark.parametrize("candidate", ["registry", "imported"])
def test_a_layer_or_the_import_control_is_a_candidate_for_the_wsgi_cases(
    candidate: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--candidate registry`` (the registry alone) and ``--candidate imported`` (by-hand with
    sessionscope imported) serve the WSGI app's variant against by-hand, their rows counted like
    the integration's, and say what they are; the ASGI cases have no such variant and are
    refused."""
    assert web_requests.main(["--smoke", "-k", "gthread", "--candidate", candidate]) == 0
    out = capsys.readouterr().out
    assert web_requests.LAYER_NOTES[candidate] in out
    assert re.search(rf"gunicorn gthread WSGI\s+by-hand .* {candidate} .* ratio \d", out)
    with pytest.raises(SystemExit):
        web_requests.main(["--smoke", "-k", "uvicorn", "--candidate", candidate])
    assert f"--candidate {candidate} is for the WSGI app" in capsys.readouterr().err


def test_a_ratio_below_the_target_is_resolved_only_when_its_interval_is() -> None:
    """Below 0.97: flagged, and "not resolved" while the interval over pairs reaches 0.97."""
    from _timing import Comparison

    def result(candidate: float, interval: tuple[float, float]) -> Any:
        return web_requests.WebResult(
            web_requests.CASES[0],
            "SQLite",
            web_requests.SMOKE,
            Comparison([100.0, 100.0], [candidate, candidate]),
            {"by-hand": 1, "sessionscope": 1},
            interval=interval,
        )

    assert web_requests.verdict(result(99.0, (0.95, 1.01))) == ""
    assert "not resolved" in web_requests.verdict(result(95.0, (0.90, 0.98)))
    below = web_requests.verdict(result(90.0, (0.86, 0.92)))
    assert "0.97 target" in below and "not resolved" not in below
    assert "[95% over pairs 0.860-0.920]" in web_requests.line(result(90.0, (0.86, 0.92)))


def test_the_type_cache_misses_walks_are_read_from_callgrind_annotate() -> None:
    """``_callgrind.inclusive_in_annotation``: every entry of the function is summed (an inlined
    fragment has an entry of its own), its recursive entry and other functions are not."""
    from _callgrind import MISS_WALK, Split, inclusive_in_annotation

    annotation = """
2,044,467,076 (100.0%)  PROGRAM TOTALS
--------------------------------------------------------------------------------
Ir                       file:function
--------------------------------------------------------------------------------
   259,230,940 (12.68%)  /b/Objects/typeobject.c:find_name_in_mro [/lib/libpython3.11.so]
     2,405,961 ( 0.12%)  /b/Python-3.11.7/./Include/object.h:find_name_in_mro
       100,000 ( 0.01%)  /b/Objects/typeobject.c:find_name_in_mro'2 [/lib/libpython.so]
    50,000,000 ( 2.00%)  /b/Python-3.11.7/Objects/typeobject.c:_PyType_Lookup [/lib/libpython.so]
"""
    assert inclusive_in_annotation(annotation, MISS_WALK) == 259_230_940 + 2_405_961
    assert inclusive_in_annotation(annotation, "_PyType_Lookup") == 50_000_000
    assert inclusive_in_annotation(annotation, "nowhere") == 0
    per_request = Split(1_000_000, 100_000).per(Split(400_000, 40_000), 300)
    assert per_request == Split(2_000, 200) and per_request.rest == 1_800


def test_scope_cpu_benchmark_yields_a_ratio_for_every_contender(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``scope_cpu.py --smoke``: every contender ran its batches and has a ratio to by hand."""
    import scope_cpu

    out = tmp_path / "scope_cpu.json"
    assert scope_cpu.main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["ratio"]) == list(scope_cpu.contenders())
    assert report["ratio"][scope_cpu.BASE] == 1.0
    assert all(len(rounds) == scope_cpu.SIZES["smoke"][1] for rounds in report["rounds"].values())
    assert min(report["us_per_call"].values()) > 0
    assert report["markdown"] in capsys.readouterr().out
