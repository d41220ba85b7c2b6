"""``python -m sessionscope demo``, run as users run it: in a subprocess, on real databases.

The demo is the project's showcase, so these tests hold it to its claims: sessionscope's column is
zero everywhere, and SQLAlchemy's column really shows the damage under gevent and asyncio (a demo
whose "before" column were quietly all zeros would prove nothing). The web section (real gunicorn
and uvicorn servers) runs once, small, on PostgreSQL; the model tests leave it out.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import Any

import pytest

from sessionscope.demo import web_report
from sessionscope.demo.web import WEB_METRIC_LABELS, WEB_SERVERS, WebMetrics, WebOutcome
from tests.conftest import PG_URL, postgres_available, require_server

UNITS = 10
ROWS = 3
MODELS = ("--models", "threads,gevent,asyncio")
"""The concurrency models without the web section (tested on its own, below)."""
WEB_REQUESTS = 240
WEB_CLIENTS = 12


def run_demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessionscope", "demo", "--units", str(UNITS), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_demo_json(*args: str) -> dict[str, Any]:
    finished = run_demo("--json", *args)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    document: dict[str, Any] = json.loads(finished.stdout)
    return document


def assert_demo_claims(document: dict[str, Any]) -> None:
    """sessionscope: zero everywhere. SQLAlchemy: correct with threads, broken otherwise."""
    assert document["sessionscope_all_zero"] is True
    assert document["skipped"] == {}
    assert set(document["models"]) == {"threads", "gevent", "asyncio"}
    for model, columns in document["models"].items():
        ours = columns["sessionscope"]
        assert {metric: ours[metric] for metric in document["metrics"]} == dict.fromkeys(
            document["metrics"], 0
        ), model
        assert ours["sessions_never_closed"] == 0, model
        assert ours["sessions_still_registered"] == 0, model
        assert ours["distinct_sessions"] == UNITS, model

    threads = document["models"]["threads"]["sqlalchemy"]
    assert {metric: threads[metric] for metric in document["metrics"]} == dict.fromkeys(
        document["metrics"], 0
    )
    for model in ("gevent", "asyncio"):
        theirs = document["models"][model]["sqlalchemy"]
        assert theirs["sessions_shared"] == UNITS, model
        assert theirs["distinct_sessions"] == 1, model
        # the failing request's rollback discards every other request's pending rows
        assert theirs["rows_lost"] == (UNITS - 1) * ROWS, model
        assert theirs["others_rows_discarded"] == (UNITS - 1) * ROWS, model


def test_demo_on_sqlite_file() -> None:
    document = run_demo_json(*MODELS)
    assert_demo_claims(document)
    assert document["web"] is None


def test_demo_text_report() -> None:
    finished = run_demo("--models", "gevent")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    out = finished.stdout
    assert "SQLAlchemy scoped_session" in out and "sessionscope.scoped_session" in out
    row = next(line for line in out.splitlines() if "sessions shared between units" in line)
    assert row.split()[-2:] == [str(UNITS), "0"]
    assert f"the {UNITS} greenlets shared 1 Session" in out
    assert out.rstrip().endswith("sessionscope.scoped_session: zero everywhere.")


def test_demo_refuses_an_unknown_model() -> None:
    finished = run_demo("--models", "threads,fibers")
    assert finished.returncode == 2
    assert "fibers" in finished.stderr
    assert "web" in finished.stderr  # among the choices it lists


@pytest.fixture
def isolated_pg_url(request: pytest.FixtureRequest) -> str:
    """PG_URL with a search_path into a schema of its own, so parallel runs can't collide."""
    reason = postgres_available()
    if reason:
        require_server(reason)
    schema = request.getfixturevalue("pg_schema")
    return f"{PG_URL}?options=-csearch_path%3D{schema}"


def test_demo_on_postgresql(isolated_pg_url: str) -> None:
    assert_demo_claims(run_demo_json(*MODELS, "--url", isolated_pg_url))


def test_web_section_on_postgresql(isolated_pg_url: str) -> None:
    """gunicorn (gevent, --preload) and uvicorn, the same small load with each registry: every row
    of sessionscope's column is zero and everything was answered; SQLAlchemy's shows damage."""
    document = run_demo_json(
        "--models",
        "web",
        "--web-requests",
        str(WEB_REQUESTS),
        "--web-clients",
        str(WEB_CLIENTS),
        "--url",
        isolated_pg_url,
    )
    assert document["sessionscope_all_zero"] is True
    assert document["models"] == {}
    section = document["web"]
    assert section["skipped"] == {} and section["failed_to_run"] == {}
    assert (
        section["metrics"]
        == list(WEB_METRIC_LABELS)
        == [
            "rows_lost",
            "failed_rows_committed",
            "foreign_objects",
            "errors",
            "hung",
        ]
    )
    assert set(section["servers"]) == set(WEB_SERVERS) == {"gunicorn-gevent", "uvicorn"}
    writes = WEB_REQUESTS - WEB_REQUESTS // 6  # one request in six fails on purpose
    for key, columns in section["servers"].items():
        ours = WebMetrics(**columns["sessionscope"])
        assert {m: getattr(ours, m) for m in section["metrics"]} == dict.fromkeys(
            section["metrics"], 0
        ), (key, ours)
        assert ours.failures() == {}, (key, ours)
        assert (ours.requests, ours.acknowledged, ours.rows_committed) == (
            WEB_REQUESTS,
            writes,
            writes,
        ), (key, ours)
        theirs = WebMetrics(**columns["sqlalchemy"])
        assert theirs.failures(), (key, theirs)  # the same load does damage without sessionscope

        # the table as printed: one row per metric, SQLAlchemy's column then sessionscope's
        text = web_report.section(
            WebOutcome(WEB_SERVERS[key], results={"sqlalchemy": theirs, "sessionscope": ours})
        )
        lines = text.splitlines()
        assert lines[0] == f"== {WEB_SERVERS[key].title} =="
        assert lines[1].split() == ["SQLAlchemy", "scoped_session", "sessionscope.scoped_session"]
        for line, (metric, label) in zip(lines[2:], WEB_METRIC_LABELS.items(), strict=False):
            assert line.startswith(f"  {label}"), line
            assert line.split()[-2:] == [str(getattr(theirs, metric)), "0"], line
        assert "sessionscope: NOT ALL ZERO" not in text


def test_a_web_server_whose_packages_are_missing_is_skipped_with_a_note() -> None:
    """The servers are optional extras: missing, the section says so instead of failing."""
    server = dataclasses.replace(WEB_SERVERS["uvicorn"], needs=("no_such_server_package",))
    reason = server.missing()
    assert reason is not None and "no_such_server_package not installed" in reason
    text = web_report.section(WebOutcome(server, skipped=reason))
    assert text.splitlines() == [f"== {server.title} ==", f"  skipped: {reason}"]
