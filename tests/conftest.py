"""Shared fixtures: real databases only.

``db_url`` runs a test on an SQLite file and on the PostgreSQL server at 127.0.0.1:5432 (psycopg).
Outside CI an unreachable server skips with its reason; with CI=true it fails the test, because CI
promises PostgreSQL. Each PostgreSQL test works in a schema of its own, so parallel or repeated runs
don't see each other's rows.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool

from tests.models import Base

PG_URL = os.environ.get("SESSIONSCOPE_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ASYNC_PG_URL = PG_URL.replace("+psycopg", "+asyncpg")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require_server(reason: str) -> None:
    """Skip (locally) or fail (in CI) when a database server the test needs is unreachable."""
    if IN_CI:
        pytest.fail(f"CI requires this server: {reason}")
    pytest.skip(reason)


def require_built(extension: str, built: bool, instead: str) -> None:
    """Skip (locally) or fail (in CI) a test of C extension ``extension`` that was not built:
    every CI stack builds it (gcc is on the machine), so there it means the install found no
    compiler. ``instead``: what runs without it."""
    if built:
        return
    if IN_CI:
        pytest.fail(f"sessionscope.{extension} was not built (the install found no compiler?)")
    pytest.skip(f"sessionscope.{extension} is not built here: {instead}")


def in_new_thread(fn: Callable[[], Any], name: str = "other") -> Any:
    """Run ``fn`` in a thread started by hand (an empty context: another unit, as a server's
    or a worker's thread is) and wait for it: what it returned, or the exception it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            outcome.append(error)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join(30)
    assert outcome, f"the thread {name!r} did not finish"
    return outcome[0]


def postgres_available() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        engine = create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return f"PostgreSQL at {PG_URL} unreachable: {type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[str]:
    reason = postgres_available()
    if reason:
        require_server(reason)
    schema = f"ss_{uuid.uuid4().hex[:10]}"
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    yield schema
    with engine.begin() as conn:
        conn.execute(text(f'drop schema "{schema}" cascade'))
    engine.dispose()


def sqlite_file_url(tmp_path: os.PathLike[str]) -> str:
    return f"sqlite:///{os.path.join(os.fspath(tmp_path), 'sessionscope-test.db')}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> str:
    """A database URL (SQLite file, PostgreSQL via psycopg) with the test tables created empty."""
    if request.param == "sqlite":
        url = sqlite_file_url(tmp_path)
        engine = create_engine(url)
    else:
        schema = request.getfixturevalue("pg_schema")
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    engine.dispose()
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url`` with a real pool; asserts every connection came back."""
    kw = {"poolclass": QueuePool, "pool_size": 5, "max_overflow": 60, "pool_timeout": 10}
    if db_url.startswith("sqlite"):
        kw["connect_args"] = {"timeout": 30, "check_same_thread": False}
    eng = create_engine(db_url, **kw)
    yield eng
    eng.dispose()


@pytest.fixture(params=["aiosqlite", "asyncpg"])
def async_url(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """(url, connect_args) for an AsyncEngine (aiosqlite file, asyncpg), test tables empty."""
    if request.param == "aiosqlite":
        url, connect_args = f"sqlite+aiosqlite:///{tmp_path}/sessionscope-async.db", {"timeout": 30}
    else:
        schema = request.getfixturevalue("pg_schema")
        url, connect_args = ASYNC_PG_URL, {"server_settings": {"search_path": schema}}

    async def create() -> None:
        engine = create_async_engine(url, connect_args=connect_args)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
        await engine.dispose()

    asyncio.run(create())
    return url, connect_args


@pytest.fixture(autouse=True)
def _no_unit_left_inside_a_session() -> Iterator[None]:
    """After every test no guarded session has a unit inside a call: every entry's slot in the
    guard's table (``_guard._state.INSIDE``) was freed by its leave, whatever the test raised,
    cancelled or killed. A thread or greenlet a test leaves blocked inside a call would show
    here too: it gets a moment to leave first."""
    yield
    from sessionscope._guard._state import INSIDE

    for _ in range(50):
        if not INSIDE:
            return
        time.sleep(0.1)
    assert not INSIDE, f"units left inside sessions' calls: {list(INSIDE.values())}"
