"""``python -m sessionscope demo``, run as users run it: in a subprocess, on real databases.

The demo is the project's showcase, so these tests hold it to its claims: sessionscope's column is
zero everywhere, and SQLAlchemy's column really shows the damage under gevent and asyncio (a demo
whose "before" column were quietly all zeros would prove nothing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import PG_URL, postgres_available, require_server

UNITS = 10
ROWS = 3


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessionscope", "demo", "--units", str(UNITS), *args],
        capture_output=True,
        text=True,
        timeout=120,
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
    assert_demo_claims(run_demo_json())


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


@pytest.fixture
def isolated_pg_url(request: pytest.FixtureRequest) -> str:
    """PG_URL with a search_path into a schema of its own, so parallel runs can't collide."""
    reason = postgres_available()
    if reason:
        require_server(reason)
    schema = request.getfixturevalue("pg_schema")
    return f"{PG_URL}?options=-csearch_path%3D{schema}"


def test_demo_on_postgresql(isolated_pg_url: str) -> None:
    assert_demo_claims(run_demo_json("--url", isolated_pg_url))
