"""``pytest --sessionscope=raise|warn`` and the rolled-back session fixtures, on a user's suite.

Each case writes a small test suite (a conftest overriding the engine fixtures, and a module whose
tests named ``test_planted_*`` break the share-nothing rule while the others keep it) and runs
pytest on it in a subprocess, as in a user's project (the plugin loads through its entry point).
``raise`` must fail exactly the planted tests, naming the violation, even where the guard's error
was raised in a thread that swallowed it; ``warn`` must pass them all and list exactly the planted
ones in the terminal summary; without the option nothing is guarded or reported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("pytest_asyncio")

CONFTEST = """
import pytest
from sqlalchemy import create_engine, event
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

URL = {url!r}
ASYNC_URL = {async_url!r}


def sqlite_savepoints(engine):
    # SQLAlchemy's recipe: pysqlite's own transaction handling breaks SAVEPOINT

    @event.listens_for(engine, "connect")
    def connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn):
        conn.exec_driver_sql("BEGIN")

    return engine


@pytest.fixture(scope="session")
def sessionscope_engine():
    engine = sqlite_savepoints(create_engine(URL))
    with engine.begin() as conn:
        conn.exec_driver_sql("create table if not exists notes (id integer primary key, body text)")
    yield engine
    engine.dispose()


@pytest.fixture
def sessionscope_async_engine(sessionscope_engine):
    engine = create_async_engine(ASYNC_URL, poolclass=NullPool)
    sqlite_savepoints(engine.sync_engine)
    return engine
"""

TESTS = """
import asyncio
import threading

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session


def in_thread(target):
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


def count(session):
    return session.execute(text("select count(*) from notes")).scalar()


def test_planted_session_used_by_a_thread(sessionscope_engine):
    session = Session(sessionscope_engine)
    session.execute(text("select 1"))
    in_thread(lambda: session.execute(text("select 2")))  # the thread swallows the error
    session.close()


def test_planted_tasks_share_a_session(sessionscope_engine):
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def main():
        engine = create_async_engine({async_url!r})
        session = AsyncSession(engine)
        queue = asyncio.Queue()

        async def producer():
            mine = AsyncSession(engine)
            await mine.execute(text("select 1"))
            await queue.put(mine)
            await asyncio.sleep(0.05)
            await mine.close()

        async def consumer():
            theirs = await queue.get()
            await theirs.execute(text("select 2"))

        try:
            await asyncio.gather(consumer(), producer())
        finally:
            await session.close()
            await engine.dispose()

    asyncio.run(main())


def test_clean_threads_with_their_own_sessions(sessionscope_engine):
    def work():
        with Session(sessionscope_engine) as own:
            own.execute(text("select 1"))

    in_thread(work)
    in_thread(work)


def test_clean_fixture_session_writes_and_commits(sessionscope_session):
    sessionscope_session.execute(text("insert into notes (body) values ('rolled back')"))
    sessionscope_session.commit()  # a savepoint: the fixture rolls the whole test back
    assert count(sessionscope_session) == 1


def test_clean_fixture_session_saw_nothing_of_the_previous_test(sessionscope_session):
    assert count(sessionscope_session) == 0


def test_planted_fixture_session_in_a_thread(sessionscope_session):
    in_thread(lambda: count(sessionscope_session))


@pytest.mark.asyncio
async def test_clean_async_fixture_session(sessionscope_async_session):
    await sessionscope_async_session.execute(text("insert into notes (body) values ('async')"))
    await sessionscope_async_session.commit()
    result = await sessionscope_async_session.execute(text("select count(*) from notes"))
    assert result.scalar() == 1


def test_clean_nothing_left_after_the_async_test(sessionscope_session):
    assert count(sessionscope_session) == 0
"""

PLANTED = {
    "test_planted_session_used_by_a_thread",
    "test_planted_tasks_share_a_session",
    "test_planted_fixture_session_in_a_thread",
}
ALL = 8


def run_pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    urls = {
        "url": f"sqlite:///{tmp_path / 'suite.db'}",
        "async_url": f"sqlite+aiosqlite:///{tmp_path / 'suite.db'}",
    }
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST.format(**urls)))
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    module = tmp_path / "test_suite.py"
    module.write_text(textwrap.dedent(TESTS.format(**urls)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args, str(module)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def outcomes(output: str) -> dict[str, str]:
    """test name -> PASSED / FAILED / ERROR, from the ``-rA`` short summary."""
    return {
        name: outcome
        for outcome, name in re.findall(
            r"^(PASSED|FAILED|ERROR) test_suite\.py::(\w+)", output, re.M
        )
    }


def test_raise_fails_exactly_the_planted_tests_naming_the_violation(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "--sessionscope=raise")
    output = result.stdout + result.stderr
    seen = outcomes(result.stdout)
    assert len(seen) == ALL, output
    assert {name for name, outcome in seen.items() if outcome != "PASSED"} == PLANTED, output
    assert result.returncode == 1
    assert "sessionscope: share-nothing violation(s) in test_suite.py::" in output
    assert "session used by a unit that does not own it [cross-unit]" in output
    # the sites are the test module's lines (a fixture's session: the test that asked for it)
    assert "Session created at test_suite.py:" in output
    assert (
        "_pytest" not in output.split("short test summary info")[0].split("Session created at")[-1]
    )


def test_warn_passes_them_and_lists_exactly_the_planted_tests(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "--sessionscope=warn")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert set(outcomes(result.stdout).values()) == {"PASSED"}, output
    summary = result.stdout.split("sessionscope: share-nothing violations", 1)[1]
    listed = set(re.findall(r"^test_suite\.py::(\w+): \d+ violation", summary, re.M))
    assert listed == PLANTED, output


def test_without_the_option_nothing_is_guarded_but_the_fixtures(tmp_path: Path) -> None:
    result = run_pytest(tmp_path)
    output = result.stdout + result.stderr
    seen = outcomes(result.stdout)
    # only the fixture's session is guarded (always): its use from a thread fails that test
    assert {name for name, outcome in seen.items() if outcome != "PASSED"} <= {
        "test_planted_fixture_session_in_a_thread"
    }, output
    assert "sessionscope: share-nothing violations" not in output


def test_the_engine_fixture_must_be_provided(tmp_path: Path) -> None:
    (tmp_path / "test_no_engine.py").write_text(
        "def test_needs_engine(sessionscope_session):\n    pass\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_no_engine.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "define a `sessionscope_engine` fixture" in result.stdout
