"""Sessions yielded by pytest and pytest-asyncio fixtures are usable by the test.

Each case writes a small test module and runs pytest on it in a subprocess (the plugin is loaded
through its entry point, as in a user's project), once with sessionscope's plugin and once with
``-p no:sessionscope`` to show what the plugin fixes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("pytest_asyncio")

FIXTURES_MODULE = """
import asyncio

import pytest
import pytest_asyncio
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

import sessionscope

URL = {url!r}
ASYNC_URL = {async_url!r}
CONNECT_ARGS = {connect_args!r}

engine = create_engine(URL)
Scoped = sessionscope.scoped_session(sessionmaker(engine))
# a connection belongs to the loop it was made on: tests and module fixtures use different loops
async_engine = create_async_engine(ASYNC_URL, connect_args=CONNECT_ARGS, poolclass=NullPool)
AsyncScoped = sessionscope.async_scoped_session(async_sessionmaker(async_engine))
AsyncLocal = sessionscope.guard(async_sessionmaker(async_engine))


@pytest.fixture
def sync_session():
    session = Scoped()
    session.execute(text("select 1"))
    yield session
    Scoped.remove()


@pytest.fixture(scope="module")
def module_session():
    session = Scoped()
    yield session
    Scoped.remove()


@pytest_asyncio.fixture
async def async_session():
    session = AsyncScoped()
    await session.execute(text("select 1"))  # in a transaction, as the test starts
    yield session
    await AsyncScoped.remove()


@pytest_asyncio.fixture
async def made_session():
    async with AsyncLocal() as session:
        await session.execute(text("select 1"))
        yield session


@pytest_asyncio.fixture
async def scope_session():
    async with AsyncScoped.scope(commit=False) as session:
        yield session


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_async_session():
    session = AsyncLocal()
    yield session
    await session.close()


def test_sync(sync_session, module_session):
    assert Scoped() is sync_session is module_session
    assert sync_session.execute(text("select 2")).scalar() == 2


@pytest.mark.asyncio
async def test_async_registry_session(async_session):
    assert AsyncScoped() is async_session
    assert (await async_session.execute(text("select 3"))).scalar() == 3


@pytest.mark.asyncio
async def test_async_made_session(made_session):
    assert (await made_session.execute(text("select 4"))).scalar() == 4


@pytest.mark.asyncio
async def test_async_scope_session(scope_session):
    assert (await scope_session.execute(text("select 5"))).scalar() == 5


@pytest.mark.asyncio(loop_scope="module")
async def test_module_async_session(module_async_session):
    assert (await module_async_session.execute(text("select 6"))).scalar() == 6


@pytest.mark.asyncio(loop_scope="module")
async def test_module_async_session_again(module_async_session):
    assert (await module_async_session.execute(text("select 7"))).scalar() == 7


def test_zz_every_connection_came_back():
    assert engine.pool.checkedout() == 0
"""


def run_pytest(tmp_path: Path, *args: str, **urls: object) -> subprocess.CompletedProcess[str]:
    module = tmp_path / "test_user_fixtures.py"
    module.write_text(textwrap.dedent(FIXTURES_MODULE.format(**urls)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(module)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def urls(db_url: str, async_url: tuple[str, dict[str, object]]) -> dict[str, object]:
    async_url_str, connect_args = async_url
    if db_url.startswith("sqlite") != async_url_str.startswith("sqlite"):
        pytest.skip("one database per run")
    return {"url": db_url, "async_url": async_url_str, "connect_args": connect_args}


def test_fixture_sessions_are_usable_by_their_tests(
    tmp_path: Path, urls: dict[str, object]
) -> None:
    result = run_pytest(tmp_path, "-W", "error::sqlalchemy.exc.SAWarning", **urls)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed" in result.stdout


def test_without_the_plugin_async_fixture_sessions_are_refused(
    tmp_path: Path, urls: dict[str, object]
) -> None:
    result = run_pytest(tmp_path, "-p", "no:sessionscope", **urls)
    assert result.returncode != 0
    assert "CrossUnitError" in result.stdout
