"""The guard covers every handle a session gives out: connections, transactions, results, state.

A guarded session's ``connection()`` (and through it an ``AsyncConnection``), its transactions
(``begin()``, ``begin_nested()``, autobegun ones), the results of its ``execute()``/``scalars()``
and of its connection, ``flag_modified``/``flag_dirty``/``set_committed_value`` on its objects, its
in-flight collections and the assignment of its settings: another unit using any of them gets
``CrossUnitError`` before anything reaches the database, and the owner's transaction and
connection go on as if nothing happened; its work commits exactly once.

The misuses are listed once, in ``tests/guard_handle_cases.py``, and run here from another thread
(started by hand: it shares no context), from an asyncio task that is not a borrower (a thread
running ``asyncio.run``, or a task created before the session), and from a gevent greenlet
(``tests/scenarios/guard_handles_green.py``, monkey-patched, in a subprocess), on SQLite and
PostgreSQL. Units that are part of the owner's unit of work (``to_thread`` jobs, child tasks) may
use the handles; two of them inside at once are ``ConcurrentUseError``.

anyio's pytest plugin imports trio, and while trio is imported the guard skips its fast path for
code outside an event loop (``SessionGuard.admit``). Tests marked "fast path" hide trio from
``sys.modules`` for their duration, so the owner's calls and its pool jobs take the path they
take in an application.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import os
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
from sqlalchemy import Engine, create_engine, event, func, insert, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlalchemy.pool import NullPool, QueuePool

import sessionscope
from sessionscope._guard._ownership import SessionGuard
from tests.conftest import PG_URL, postgres_available, require_server, sqlite_file_url
from tests.guard_handle_cases import (
    FETCHED,
    HANDLES,
    INTRUDER,
    OWNER,
    SEED_ROWS,
    SEED_TABLE_ROWS,
    SEEDS,
    Action,
    EngineEvents,
    Facts,
    Handle,
    Outcome,
    attempt,
    expected_facts,
    misuse_and_carry_on,
    reset_tables,
    run_in_task_before,
    run_with,
    side_rows,
)
from tests.models import Base, Row
from tests.test_nested_scopes import savepoints_on_sqlite

WAIT = 10.0
CROSS_UNIT = "(Background on this error: sessionscope docs/errors.md#guard-cross-unit)"
CONCURRENT = "(Background on this error: sessionscope docs/errors.md#guard-concurrent)"
ScopedSession = sessionscope.scoped_session[Session]


# -- databases -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """One engine per database for the module (tables made once, emptied for each test)."""
    schema = None
    if request.param == "sqlite":
        url = sqlite_file_url(tmp_path_factory.mktemp("guard-handles"))
        kw: dict[str, Any] = {"connect_args": {"timeout": 30, "check_same_thread": False}}
    else:
        schema = f"{request.getfixturevalue('pg_schema')}_handles"
        url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        with create_engine(PG_URL, poolclass=NullPool).begin() as conn:
            conn.execute(text(f'create schema "{schema}"'))
        kw = {}
    engine = create_engine(url, poolclass=QueuePool, pool_size=5, max_overflow=20, **kw)
    savepoints_on_sqlite(engine)
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()
    if schema is not None:
        with create_engine(PG_URL, poolclass=NullPool).begin() as conn:
            conn.execute(text(f'drop schema "{schema}" cascade'))


@pytest.fixture
def db(database: Engine) -> Iterator[Engine]:
    """The module's engine, its tables holding the seed rows only; every connection comes back."""
    reset_tables(database)
    yield database
    assert database.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.fixture
def Scoped(db: Engine) -> Iterator[ScopedSession]:
    """A guarded registry; whatever session is left at the end is closed, whoever owns it."""
    maker = sessionmaker(db)
    made: list[Session] = []

    def tracked() -> Session:
        made.append(maker())
        return made[-1]

    registry: ScopedSession = sessionscope.scoped_session(tracked)
    yield registry
    for session in made:
        sessionscope.guard(session, "off")
        session.close()


# -- the guard's fast path -----------------------------------------------------------------------


@contextlib.contextmanager
def fast_path(on: bool = True) -> Iterator[None]:
    """Hide trio from ``sys.modules`` (as in an application that never imported it)."""
    saved = sys.modules.pop("trio", None) if on else None
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["trio"] = saved


def test_hiding_trio_puts_the_owners_calls_on_the_guards_fast_path(
    Scoped: ScopedSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the "fast path" variants rely on: without trio imported, the owner's calls never reach
    the guard's slow path; with it (pytest with anyio's plugin), every one of them does."""
    slow: list[str] = []
    original = SessionGuard._admit_slow

    def spy(self: SessionGuard, operation: str, of_class: Any) -> bool:
        slow.append(operation)
        return original(self, operation, of_class)

    monkeypatch.setattr(SessionGuard, "_admit_slow", spy)
    session = Scoped()
    with fast_path():
        session.connection().execute(select(1)).all()
    assert slow == []
    session.connection().execute(select(1)).all()
    assert slow == ["connection", "connection().execute", "(result)"]
    session.rollback()


# -- other units ---------------------------------------------------------------------------------


def in_thread(action: Action) -> Outcome:
    """Run ``action`` in a thread started by hand (an empty context: another unit)."""
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(attempt(action)), name=INTRUDER)
    thread.start()
    thread.join(WAIT * 3)
    assert outcomes, "the intruding thread did not finish"
    return outcomes[0]


def in_thread_running_asyncio(action: Action) -> Outcome:
    """Run ``action`` in the main task of ``asyncio.run`` in a thread started by hand."""

    async def main() -> Outcome:
        asyncio.current_task().set_name("intruder-task")  # type: ignore[union-attr]
        return attempt(action)

    return in_thread(lambda: asyncio.run(main())).value  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Unit:
    """A kind of unit that misuses the handle, and how the refusal names it."""

    name: str
    named: str
    run: Callable[[Callable[[], Session], Engine, Handle], Facts]
    fast: bool = False


def _intruding(
    intrude: Callable[[Action], Outcome],
) -> Callable[[Callable[[], Session], Engine, Handle], Facts]:
    def run(make_session: Callable[[], Session], engine: Engine, handle: Handle) -> Facts:
        return run_with(intrude, misuse_and_carry_on(make_session, engine, handle))

    return run


UNITS = [
    Unit("thread", f"thread '{INTRUDER}'", _intruding(in_thread)),
    Unit("thread, fast path", f"thread '{INTRUDER}'", _intruding(in_thread), fast=True),
    Unit(
        "asyncio.run in a thread",
        "asyncio task 'intruder-task'",
        _intruding(in_thread_running_asyncio),
        fast=True,
    ),
    Unit("task made before the session", "asyncio task 'early-intruder'", run_in_task_before),
]


def assert_refused_and_carried_on(handle: Handle, facts: Facts, named: str) -> None:
    """The misuse was refused before it reached the database; the owner went on, committed once."""
    message = facts.pop("message")
    assert facts == expected_facts(handle)
    assert handle.did in message, message
    assert named in message, message
    assert message.endswith(CROSS_UNIT), message


def _param(handle: Handle) -> Any:
    marks = []
    if handle.known_failure:
        marks.append(
            pytest.mark.xfail(strict=True, raises=AssertionError, reason=handle.known_failure)
        )
    return pytest.param(handle, id=handle.name, marks=marks)


# -- every handle, from every kind of unit -------------------------------------------------------


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
@pytest.mark.parametrize("handle", [_param(h) for h in HANDLES])
def test_a_handle_used_by_another_unit_is_refused_and_the_owner_commits_once(
    handle: Handle, unit: Unit, db: Engine, Scoped: ScopedSession
) -> None:
    """The owner writes a Core row through ``session.connection()``, loads an object, prepares the
    handle; another unit misuses it: ``CrossUnitError`` naming what it did and who it is, and no
    statement, commit or rollback reached the database. The owner still sees its uncommitted row
    on its connection (nobody else sees it committed), its result still has every row and loaded
    nothing, its object is unmarked, its settings unchanged; its commit is the only one, and the
    database holds the seed rows and its row once (its savepoint's row too, where it made one)."""
    if unit.name == "task made before the session":
        facts = unit.run(Scoped, db, handle)
    else:
        with fast_path(unit.fast):
            facts = unit.run(Scoped, db, handle)
    assert_refused_and_carried_on(handle, facts, unit.named)


# -- gevent greenlets (monkey-patched), in a subprocess ------------------------------------------

GREEN_SCENARIO = Path(__file__).parent / "scenarios" / "guard_handles_green.py"


@pytest.fixture(scope="module")
def green_reports(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], dict[str, Any]]]:
    """``report(db)``: what ``tests/scenarios/guard_handles_green.py`` printed for that database.

    Both databases run at once, in fresh interpreters, the first time a report is asked for; the
    PostgreSQL run works in a schema of its own, dropped at the end of the module.
    """
    runs: dict[str, subprocess.Popen[str]] = {}
    schemas: list[str] = []
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONWARNINGS", None)

    def start(db: str) -> None:
        if db == "sqlite":
            url = sqlite_file_url(tmp_path_factory.mktemp("guard-handles-green"))
        else:
            schema = f"{request.getfixturevalue('pg_schema')}_handles_green"
            with create_engine(PG_URL, poolclass=NullPool).begin() as conn:
                conn.execute(text(f'create schema "{schema}"'))
            schemas.append(schema)
            url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        runs[db] = subprocess.Popen(
            [sys.executable, str(GREEN_SCENARIO), "--url", url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    reports: dict[str, dict[str, Any]] = {}

    def report(db: str) -> dict[str, Any]:
        if db == "postgresql" and (reason := postgres_available()):
            require_server(reason)  # skips locally, fails in CI
        if not runs:
            for name in ("sqlite", "postgresql"):
                if name == "sqlite" or postgres_available() is None:
                    start(name)
        if db not in reports:
            try:
                out, err = runs[db].communicate(timeout=120)
            except subprocess.TimeoutExpired:
                runs[db].kill()
                out, err = runs[db].communicate()
                pytest.fail(f"the gevent scenario timed out (a deadlock?)\n{err[-5000:]}")
            lines = out.strip().splitlines()
            if runs[db].returncode != 0 or not lines:
                pytest.fail(f"the gevent scenario exited {runs[db].returncode}\n{err[-5000:]}")
            reports[db] = json.loads(lines[-1])
        return reports[db]

    yield report
    for run in runs.values():
        if run.poll() is None:
            run.kill()
            run.communicate()
    if schemas:
        with create_engine(PG_URL, poolclass=NullPool).begin() as conn:
            for schema in schemas:
                conn.execute(text(f'drop schema "{schema}" cascade'))


@pytest.mark.parametrize("green_db", ["sqlite", "postgresql"])
@pytest.mark.parametrize("handle", [_param(h) for h in HANDLES])
def test_a_handle_used_by_another_gevent_greenlet_is_refused_and_the_owner_commits_once(
    handle: Handle, green_db: str, green_reports: Callable[[str], dict[str, Any]]
) -> None:
    """The same misuses with gevent monkey-patched: greenlet A owns the session, greenlet B
    (spawned by A, in a fresh context) misuses the handle while A waits. The same refusal before
    anything reaches the database, and A carries on and commits once. Afterwards nothing is
    checked out and the registry holds no session."""
    report = green_reports(green_db)
    assert report["patched"] is True
    assert (report["registry_len"], report["pool_checkedout"]) == (0, 0)
    facts = dict(report["facts"][handle.name])
    assert "crashed" not in facts, facts.get("crashed")
    named = facts.pop("intruder")
    assert named.startswith("greenlet "), named
    assert_refused_and_carried_on(handle, facts, named)


# -- what stays allowed --------------------------------------------------------------------------


def test_introspection_from_another_unit_is_allowed_and_reaches_nothing(
    db: Engine, Scoped: ScopedSession
) -> None:
    """``in_transaction()``, ``is_active``, ``info``, ``identity_map``, ``bind``, ``autoflush``,
    ``is_modified(obj)``, ``obj in session`` and ``get_transaction()`` answer another unit as they
    answer the owner, and nothing reaches the database."""
    events = EngineEvents(db)
    try:
        session = Scoped()
        session.info["request"] = 7
        session.connection().execute(insert(Row).values(owner=OWNER, n=1))
        row = session.get(Row, 1)
        row.n = 5  # type: ignore[union-attr]

        def look() -> dict[str, Any]:
            return {
                "in_transaction": session.in_transaction(),
                "is_active": session.is_active,
                "info": dict(session.info),
                "identity_map": len(session.identity_map),
                "bind": session.bind,
                "autoflush": session.autoflush,
                "is_modified": session.is_modified(row),
                "contains": row in session,
                "transaction": session.get_transaction(),
            }

        mark = len(events.log)
        outcome = in_thread(look)
        assert outcome.error is None
        assert events.since(mark) == []
        assert outcome.value == look()
        assert outcome.value["in_transaction"] is True and outcome.value["is_modified"] is True
        assert outcome.value["bind"] is db
        session.commit()
    finally:
        events.detach()
    assert side_rows(db) == {"seed": SEEDS, OWNER: 1}


def test_results_fetched_to_the_end_and_frozen_results_are_plain_data_for_any_unit(
    db: Engine, Scoped: ScopedSession
) -> None:
    """What a result gave the owner (``.all()``), a result soft-closed by ``.all()`` (nothing left
    to fetch) and a ``FrozenResult`` reach no connection: another unit reads them, and nothing
    reaches the database; the owner goes on and commits once."""
    events = EngineEvents(db)
    try:
        session = Scoped()
        conn = session.connection()
        conn.execute(insert(Row).values(owner=OWNER, n=1))
        rows = session.execute(SEED_ROWS).all()
        drained = session.execute(SEED_ROWS)
        drained.all()
        drained_core = conn.execute(SEED_TABLE_ROWS)
        drained_core.all()
        frozen = session.execute(SEED_ROWS).freeze()

        def read() -> dict[str, Any]:
            return {
                "all": [r.Row.n for r in rows],
                "drained": drained.fetchall(),
                "drained, all": drained.all(),
                "drained core": drained_core.fetchall(),
                "frozen": [r.n for r in frozen().scalars()],
                "frozen again": [r.Row.n for r in frozen()],
            }

        mark = len(events.log)
        outcome = in_thread(read)
        assert outcome.error is None
        assert events.since(mark) == []
        seeds = list(range(SEEDS))
        assert outcome.value == {
            "all": seeds,
            "drained": [],
            "drained, all": [],
            "drained core": [],
            "frozen": seeds,
            "frozen again": seeds,
        }
        mark = len(events.log)
        session.commit()
        assert events.since(mark).count("COMMIT") == 1
    finally:
        events.detach()
    assert side_rows(db) == {"seed": SEEDS, OWNER: 1}


def test_a_core_result_of_a_unit_of_work_that_ended_is_not_refused(
    db: Engine, Scoped: ScopedSession
) -> None:
    """The owner's unit of work (a thread) ends with a Core result half fetched; sessionscope
    closes its session. What is left of the result is read by another unit without a refusal."""
    box: dict[str, Any] = {}

    def owner() -> None:
        result = Scoped().connection().execute(SEED_TABLE_ROWS)
        box["first"] = result.fetchone().n  # type: ignore[union-attr]
        box["result"] = result

    in_thread(owner)
    assert db.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert box["first"] == 0
    try:
        rest = [r.n for r in box["result"]]
    except sa_exc.InterfaceError:  # the driver's own refusal (sqlite3 on Python 3.10): the
        return  # cursor was reset by the close's rollback; never the guard's
    assert rest == list(range(1, SEEDS))


# -- the units the owner waits for: borrowers ----------------------------------------------------


@pytest.mark.parametrize("fast", [False, True], ids=["slow path", "fast path"])
def test_jobs_and_child_tasks_of_the_owner_use_its_connection_and_results(
    fast: bool, db: Engine, Scoped: ScopedSession
) -> None:
    """A sync session in an asyncio task: ``asyncio.to_thread`` and ``anyio.to_thread.run_sync``
    jobs (part of its unit of work) execute on its connection and iterate its ORM and Core results;
    child tasks made after the session (``gather``, ``create_task``) use its connection too. Their
    rows commit once, with the owner's."""
    events = EngineEvents(db)

    def written(who: str) -> Callable[[], bool]:
        return lambda: (
            conn.execute(insert(Row).values(owner=who, n=1)).inserted_primary_key[0] > SEEDS
        )

    async def request() -> dict[str, Any]:
        nonlocal conn
        session = Scoped()
        conn = session.connection()
        conn.execute(insert(Row).values(owner=OWNER, n=1))
        seen: dict[str, Any] = {
            "to_thread": await asyncio.to_thread(written("to_thread")),
            "anyio": await anyio.to_thread.run_sync(written("anyio")),
        }
        result = session.execute(SEED_ROWS)
        seen["to_thread iterates"] = await asyncio.to_thread(lambda: [r.Row.n for r in result])
        core = conn.execute(SEED_TABLE_ROWS)
        seen["anyio iterates"] = await anyio.to_thread.run_sync(lambda: [r.n for r in core])

        async def child() -> bool:
            return written("child")()

        seen["gather"] = await asyncio.gather(child(), child())
        seen["create_task"] = await asyncio.create_task(child())
        mark = len(events.log)
        session.commit()
        seen["commits"] = events.since(mark).count("COMMIT")
        return seen

    conn: Any = None
    try:
        with fast_path(fast):
            seen = asyncio.run(request())
    finally:
        events.detach()
    seeds = list(range(SEEDS))
    assert seen == {
        "to_thread": True,
        "anyio": True,
        "to_thread iterates": seeds,
        "anyio iterates": seeds,
        "gather": [True, True],
        "create_task": True,
        "commits": 1,
    }
    assert side_rows(db) == {"seed": SEEDS, OWNER: 1, "to_thread": 1, "anyio": 1, "child": 3}


HOLD = "/* held by the test */"


@dataclass
class Overlap:
    """Two pool jobs of one unit: the first holds its statement in an event until the second has
    tried; a barrier in the event makes sure the second tries while the first is inside."""

    engine: Engine
    barrier: threading.Barrier = field(default_factory=lambda: threading.Barrier(2, timeout=WAIT))
    second_tried: threading.Event = field(default_factory=threading.Event)
    held: list[bool] = field(default_factory=list)

    def hold(self, conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        if HOLD in statement:
            self.barrier.wait()  # the second job goes on now: the first is inside
            self.held.append(self.second_tried.wait(WAIT))

    def second(self, attempt_it: Action) -> Callable[[], Outcome]:
        def job() -> Outcome:
            self.barrier.wait()
            try:
                return attempt(attempt_it)
            finally:
                self.second_tried.set()

        return job


SECOND_JOBS: dict[str, tuple[Callable[[Session, Any, Any], Any], str]] = {
    "connection.execute": (
        lambda s, conn, result: conn.execute(insert(Row).values(owner="second", n=1)),
        "called Session.connection().execute()",
    ),
    "session.execute": (
        lambda s, conn, result: s.execute(insert(Row).values(owner="second", n=1)),
        "called Session.execute()",
    ),
    "result fetch": (lambda s, conn, result: result.fetchall(), FETCHED),
}


@pytest.mark.parametrize("fast", [False, True], ids=["slow path", "fast path"])
@pytest.mark.parametrize("second", list(SECOND_JOBS))
def test_two_jobs_of_one_unit_inside_its_connection_at_once_are_concurrent_use(
    second: str, fast: bool, db: Engine, Scoped: ScopedSession
) -> None:
    """``gather(to_thread(first), to_thread(second))`` on the task's session: while the first job
    is inside a statement on the connection, the second's use of the connection, the session or a
    result is ``ConcurrentUseError`` and reaches nothing. The first completes; the result still
    has its rows; the owner commits the first job's row and its own once."""
    overlap = Overlap(db)
    events = EngineEvents(db)
    use, did = SECOND_JOBS[second]

    async def request() -> dict[str, Any]:
        session = Scoped()
        conn = session.connection()
        conn.execute(insert(Row).values(owner=OWNER, n=1))
        result = session.execute(SEED_ROWS)
        marks: list[int] = []

        def first() -> Outcome:
            return attempt(
                lambda: conn.execute(
                    text(f"INSERT INTO ss_rows (owner, n) VALUES ('first', 1) {HOLD}")
                )
            )

        def second_use() -> Any:
            marks.append(len(events.log))
            try:
                return use(session, conn, result)
            finally:
                marks.append(len(events.log))

        outcomes = await asyncio.gather(
            asyncio.to_thread(first), asyncio.to_thread(overlap.second(second_use))
        )
        seen = {
            "first": outcomes[0].error,
            "second": type(outcomes[1].error).__name__,
            "message": str(outcomes[1].error),
            "events while the second tried": events.log[marks[0] : marks[1]],
            "owner's result": len(result.all()),
        }
        mark = len(events.log)
        session.commit()
        seen["commits"] = events.since(mark).count("COMMIT")
        return seen

    event.listen(db, "before_cursor_execute", overlap.hold)
    try:
        with fast_path(fast):
            seen = asyncio.run(request())
    finally:
        event.remove(db, "before_cursor_execute", overlap.hold)
        events.detach()
    message = seen.pop("message")
    assert overlap.held == [True]
    assert seen == {
        "first": None,
        "second": "ConcurrentUseError",
        "events while the second tried": [],
        "owner's result": SEEDS,
        "commits": 1,
    }
    assert did in message and "was inside the same Session" in message, message
    assert message.endswith(CONCURRENT), message
    assert side_rows(db) == {"seed": SEEDS, OWNER: 1, "first": 1}


@pytest.mark.parametrize("fast", [False, True], ids=["slow path", "fast path"])
def test_concurrent_use_error_of_two_borrowing_threads_names_both_threads(
    fast: bool, db: Engine, Scoped: ScopedSession
) -> None:
    """Two threads running copies of the owner's context overlap on its connection: the refusal
    names both threads, as it does for any other unit."""
    overlap = Overlap(db)
    session = Scoped()
    conn = session.connection()
    outcomes: dict[str, Outcome] = {}

    def run(name: str, job: Callable[[], Outcome]) -> threading.Thread:
        ctx = contextvars.copy_context()
        thread = threading.Thread(
            target=ctx.run, args=(lambda: outcomes.update({name: job()}),), name=name
        )
        thread.start()
        return thread

    event.listen(db, "before_cursor_execute", overlap.hold)
    try:
        with fast_path(fast):
            threads = [
                run("first", lambda: attempt(lambda: conn.execute(text(f"SELECT 1 {HOLD}")))),
                run("second", overlap.second(lambda: conn.execute(text("SELECT 2")))),
            ]
            for thread in threads:
                thread.join(WAIT * 3)
    finally:
        event.remove(db, "before_cursor_execute", overlap.hold)
    session.rollback()
    message = str(outcomes["second"].error)
    assert overlap.held == [True] and outcomes["first"].error is None
    assert type(outcomes["second"].error) is sessionscope.ConcurrentUseError
    assert "thread 'second'" in message and "thread 'first'" in message, message


# -- AsyncSession: AsyncConnection and AsyncResult -----------------------------------------------


def sync_twin(url: str, connect_args: dict[str, Any]) -> Engine:
    """A sync engine (no pool) on the database of an async URL, for reading back."""
    if url.startswith("sqlite+aiosqlite"):
        return create_engine(url.replace("sqlite+aiosqlite", "sqlite"), poolclass=NullPool)
    schema = connect_args["server_settings"]["search_path"]
    return create_engine(f"{PG_URL}?options=-csearch_path%3D{schema}", poolclass=NullPool)


@dataclass(frozen=True)
class AsyncHandle:
    """An async misuse: ``prepare(session, connection, extras)`` in the owner returns the coroutine
    function another unit awaits. A misused result is kept in ``extras["result"]``."""

    name: str
    prepare: Callable[[AsyncSession, AsyncConnection, dict[str, Any]], Awaitable[Any]]
    did: str
    begin: bool = False
    result: bool = False


async def _iterate(result: Any) -> list[Any]:
    return [row async for row in result]


def _on_connection(
    name: str, use: Callable[[AsyncConnection], Awaitable[Any]], did: str | None = None
) -> AsyncHandle:
    async def prepare(s: AsyncSession, conn: AsyncConnection, extras: dict[str, Any]) -> Any:
        return lambda: use(conn)

    return AsyncHandle(
        f"connection.{name}", prepare, f"called AsyncSession.connection().{did or name}()"
    )


def _streamed(name: str, make: Callable[[AsyncSession], Any], use: Callable[[Any], Any]) -> Any:
    async def prepare(s: AsyncSession, conn: AsyncConnection, extras: dict[str, Any]) -> Any:
        result = extras["result"] = await make(s)
        return lambda: use(result)

    return AsyncHandle(name, prepare, "fetched rows of a result of this AsyncSession", result=True)


async def _begun(s: AsyncSession, conn: AsyncConnection, extras: dict[str, Any]) -> Any:
    return extras["transaction"].commit


ASYNC_HANDLES = [
    _on_connection("execute", lambda c: c.execute(insert(Row).values(owner=INTRUDER, n=1))),
    _on_connection("exec_driver_sql", lambda c: c.exec_driver_sql("SELECT 1")),
    _on_connection(
        "scalar", lambda c: c.scalar(select(func.count()).select_from(Row)), did="execute"
    ),
    _on_connection("stream", lambda c: c.stream(SEED_TABLE_ROWS), did="execute"),
    _on_connection("commit", lambda c: c.commit()),
    _on_connection("rollback", lambda c: c.rollback()),
    _streamed("stream(), iterated", lambda s: s.stream(SEED_ROWS), _iterate),
    _streamed("stream(), fetchone", lambda s: s.stream(SEED_ROWS), lambda r: r.fetchone()),
    _streamed("stream(), all", lambda s: s.stream(SEED_ROWS), lambda r: r.all()),
    _streamed("stream().scalars()", lambda s: s.stream(SEED_ROWS), lambda r: _iterate(r.scalars())),
    _streamed("stream_scalars()", lambda s: s.stream_scalars(SEED_ROWS), _iterate),
    AsyncHandle("begin() handle, commit", _begun, "called AsyncSession.begin().commit()", True),
]


async def _outcome_of(action: Callable[[], Awaitable[Any]]) -> Outcome:
    try:
        return Outcome(value=await action())
    except Exception as error:  # noqa: BLE001 - reported to the owner
        return Outcome(error=error)


async def _in_thread_running_asyncio(action: Callable[[], Awaitable[Any]]) -> Outcome:
    """``action`` in the main task of ``asyncio.run`` in a thread started by hand."""
    outcomes: list[Outcome] = []

    async def main() -> None:
        asyncio.current_task().set_name("intruder-task")  # type: ignore[union-attr]
        outcomes.append(await _outcome_of(action))

    thread = threading.Thread(target=asyncio.run, args=(main(),), name=INTRUDER)
    thread.start()
    await asyncio.to_thread(thread.join, WAIT * 3)  # this job only waits; it touches nothing
    assert outcomes, "the intruding thread did not finish"
    return outcomes[0]


ASYNC_UNITS = {
    "task made before the session": "asyncio task 'early-intruder'",
    "asyncio.run in a thread": "asyncio task 'intruder-task'",
}


async def misuse_async(
    handle: AsyncHandle, unit: str, url: str, connect_args: dict[str, Any], side: Engine
) -> dict[str, Any]:
    """The owner (the loop's main task) prepares the handle, another task misuses it, the owner
    carries on and commits; returns what was seen."""
    inbox: asyncio.Queue[Callable[[], Awaitable[Any]]] = asyncio.Queue()
    outbox: asyncio.Queue[Outcome] = asyncio.Queue()

    async def early() -> None:
        outbox.put_nowait(await _outcome_of(await inbox.get()))

    early_task = asyncio.create_task(early(), name="early-intruder")
    await asyncio.sleep(0)  # it waits for its action before the owner makes its session
    engine = create_async_engine(url, connect_args=connect_args)
    events = EngineEvents(engine.sync_engine)
    Scoped = sessionscope.async_scoped_session(async_sessionmaker(engine))
    try:
        session = Scoped()
        extras: dict[str, Any] = {}
        if handle.begin:
            extras["transaction"] = await session.begin()
        conn = await session.connection()
        await conn.execute(insert(Row).values(owner=OWNER, n=1))
        action = await handle.prepare(session, conn, extras)
        mark = len(events.log)
        if unit == "task made before the session":
            inbox.put_nowait(action)
            outcome = await outbox.get()
        else:
            outcome = await _in_thread_running_asyncio(action)
            inbox.put_nowait(lambda: asyncio.sleep(0))
        await early_task
        seen: dict[str, Any] = {
            "events during the misuse": events.since(mark),
            "error": type(outcome.error).__name__,
            "message": str(outcome.error),
            "owner sees its row": await conn.scalar(
                select(func.count()).select_from(Row).where(Row.owner == OWNER)
            ),
            "committed before the owner commits": side_rows(side),
        }
        if handle.result:
            seen["owner's result"] = len(await extras["result"].all())
        mark = len(events.log)
        await (extras["transaction"] if handle.begin else session).commit()
        seen["commits"] = events.since(mark).count("COMMIT")
        await Scoped.remove()
        seen["checked out"] = engine.pool.checkedout()
        return seen
    finally:
        events.detach()
        await engine.dispose()


@pytest.mark.parametrize("unit", list(ASYNC_UNITS))
@pytest.mark.parametrize("handle", ASYNC_HANDLES, ids=[h.name for h in ASYNC_HANDLES])
def test_an_async_handle_used_by_another_task_is_refused_and_the_owner_commits_once(
    handle: AsyncHandle, unit: str, async_url: tuple[str, dict[str, Any]]
) -> None:
    """``await asession.connection()`` then another task's ``await conn.execute(...)`` (or
    ``exec_driver_sql``, ``scalar``, ``stream``, ``commit``, ``rollback``); an ``AsyncResult`` or
    ``AsyncScalarResult`` of ``asession.stream()``/``stream_scalars()`` iterated or fetched by
    another task; ``await asession.begin()``'s transaction committed by another task: refused,
    nothing reaches the database, the owner still has every row of its result and commits once."""
    url, connect_args = async_url
    side = sync_twin(url, connect_args)
    try:
        with side.begin() as conn:
            conn.execute(insert(Row), [{"owner": "seed", "n": n} for n in range(SEEDS)])
        seen = asyncio.run(misuse_async(handle, unit, url, connect_args, side))
        rows = side_rows(side)
    finally:
        side.dispose()
    message = seen.pop("message")
    expected: dict[str, Any] = {
        "events during the misuse": [],
        "error": "CrossUnitError",
        "owner sees its row": 1,
        "committed before the owner commits": {"seed": SEEDS},
        "commits": 1,
        "checked out": 0,
    }
    if handle.result:
        expected["owner's result"] = SEEDS
    assert seen == expected
    assert handle.did in message and ASYNC_UNITS[unit] in message, message
    assert message.endswith(CROSS_UNIT), message
    assert rows == {"seed": SEEDS, OWNER: 1}


async def _borrowers(url: str, connect_args: dict[str, Any]) -> dict[str, Any]:
    engine = create_async_engine(url, connect_args=connect_args)
    Scoped = sessionscope.async_scoped_session(async_sessionmaker(engine))
    try:
        session = Scoped()
        conn = await session.connection()
        await conn.execute(insert(Row).values(owner=OWNER, n=1))
        result = await session.stream(SEED_ROWS)

        async def child(n: int) -> bool:
            done = await conn.execute(insert(Row).values(owner="child", n=n))
            return bool(done.inserted_primary_key)

        lock = asyncio.Lock()

        async def in_turn(n: int) -> bool:
            async with lock:  # children that overlapped would be ConcurrentUseError
                return await child(n)

        seen = {
            "gather": await asyncio.gather(in_turn(1), in_turn(2)),
            "create_task": await asyncio.create_task(child(3)),
            "child iterates": await asyncio.create_task(_iterate(result.scalars())),
        }
        seen["child iterates"] = [row.n for row in seen["child iterates"]]
        await session.commit()
        await Scoped.remove()
        seen["checked out"] = engine.pool.checkedout()
        return seen
    finally:
        await engine.dispose()


def test_child_tasks_made_after_the_async_session_use_its_connection_and_results(
    async_url: tuple[str, dict[str, Any]],
) -> None:
    """``gather`` and ``create_task`` children of the owner (made after its AsyncSession) execute on
    its AsyncConnection and iterate its AsyncResult while it waits; their rows commit with its."""
    url, connect_args = async_url
    side = sync_twin(url, connect_args)
    try:
        with side.begin() as conn:
            conn.execute(insert(Row), [{"owner": "seed", "n": n} for n in range(SEEDS)])
        seen = asyncio.run(_borrowers(url, connect_args))
        rows = side_rows(side)
    finally:
        side.dispose()
    assert seen == {
        "gather": [True, True],
        "create_task": True,
        "child iterates": list(range(SEEDS)),
        "checked out": 0,
    }
    assert rows == {"seed": SEEDS, OWNER: 1, "child": 3}


@pytest.mark.skipif(
    not hasattr(SessionTransaction, "connections"), reason="SQLAlchemy 2.1.7 added connections"
)
def test_a_connection_only_the_flush_used_is_guarded_when_a_transaction_hands_it_out(
    db: Engine, Scoped: ScopedSession
) -> None:
    """The session never handed this connection out (only its flush used it): reached through
    ``get_transaction().connections``, it is guarded as it is handed out, and another thread
    cannot commit the owner's flushed row through it."""
    session = Scoped()
    session.add(Row(owner="flushed", n=1))
    session.flush()  # the connection is begun and used by the session itself, nobody took it
    (connection,) = session.get_transaction().connections  # type: ignore[union-attr]
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(attempt(connection.commit)))
    thread.start()
    thread.join()
    assert type(outcomes[0].error) is sessionscope.CrossUnitError, outcomes
    session.rollback()
    assert side_rows(db).get("flushed", 0) == 0  # the owner's rollback won: nothing committed
