"""A forked child never checks out its parent's pooled connections (Celery prefork, gunicorn
--preload, multiprocessing): sessionscope replaces the pools of the engines it has seen.

The parent queries first, so a connection sits in the pool, then forks children that load rows by
id while the parent keeps querying. Which connection a child got is told by its server process id
(PostgreSQL) or by the identity of the DBAPI connection object (SQLite; the parent's objects stay
alive in the child, so a new one cannot reuse the address). A plain engine that sessionscope never
saw shows what the tests would see without it: the child gets the parent's connection.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import multiprocessing
import os
import signal
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from sqlalchemy import Connection, Engine, create_engine, insert, select, text
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

import sessionscope
from sessionscope import _fork_pools
from tests.models import Base, Row

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

T = TypeVar("T")
ROWS = 200
CHILDREN = 4
PASSES = 2  # each child loads each of its ids this many times: 100 loads per child
DEADLINE = 20.0  # seconds; a child sharing the parent's socket may block for ever


def seed(engine: Engine) -> None:
    with engine.begin() as conn:
        seed_on(conn)


def seed_on(conn: Connection) -> None:
    conn.execute(insert(Row), [{"id": i, "owner": f"row-{i}", "n": i} for i in rows()])


def rows() -> range:
    return range(1, ROWS + 1)


def ids_of_child(k: int) -> list[int]:
    return [i for i in rows() if i % CHILDREN == k] * PASSES


def load(session: Session, i: int) -> bool:
    """Load row ``i``; True when it is row ``i`` (not another query's answer)."""
    n, owner = session.execute(select(Row.n, Row.owner).where(Row.id == i)).one()
    return bool(n == i and owner == f"row-{i}")


def identity(session: Session) -> int:
    """Which connection the session holds: its server process, or its DBAPI object."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        return int(conn.execute(text("select pg_backend_pid()")).scalar_one())
    return id(conn.connection.dbapi_connection)


def report_of(work: Callable[[], dict[str, Any]]) -> bytes:
    """What a child sends back: ``work()``'s report, or the exception it raised."""
    try:
        report = work()
    except BaseException as exc:  # noqa: BLE001 - reported; the child must not run pytest's code
        report = {"raised": f"{type(exc).__name__}: {exc}"}
    return json.dumps(report).encode()


class ForkedChild:
    """``work()`` run in a child made by ``os.fork()``, reporting through a pipe."""

    def __init__(self, work: Callable[[], dict[str, Any]]) -> None:
        self._read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(self._read)
            os.write(write, report_of(work))  # a few hundred bytes: fits the pipe
            os._exit(0)
        os.close(write)
        self._done = False

    def running(self) -> bool:
        if not self._done:
            self._done = os.waitpid(self.pid, os.WNOHANG)[0] != 0
        return not self._done

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self._done = True

    def report(self) -> dict[str, Any]:
        chunks = []
        while chunk := os.read(self._read, 65536):
            chunks.append(chunk)
        os.close(self._read)
        answer: dict[str, Any] = json.loads(b"".join(chunks) or b'{"raised": "no report"}')
        return answer


class MultiprocessingChild:
    """``work()`` run in a ``multiprocessing`` process of the 'fork' start method."""

    def __init__(self, work: Callable[[], dict[str, Any]]) -> None:
        context = multiprocessing.get_context("fork")
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=lambda: send.send_bytes(report_of(work)))
        self._process.start()
        send.close()

    def running(self) -> bool:
        return self._process.is_alive()

    def stop(self) -> None:
        self._process.kill()
        self._process.join()

    def report(self) -> dict[str, Any]:
        if not self._receive.poll():
            return {"raised": f"no report (exit code {self._process.exitcode})"}
        answer: dict[str, Any] = json.loads(self._receive.recv_bytes())
        return answer


Child = ForkedChild | MultiprocessingChild
START = {"os.fork": ForkedChild, "multiprocessing": MultiprocessingChild}


def start(method: str, work_of_child: Callable[[int], dict[str, Any]]) -> list[Child]:
    kind = START[method]
    return [kind(lambda k=k: work_of_child(k)) for k in range(CHILDREN)]


def any_running(children: list[Child], started: float) -> bool:
    """Whether a child still runs; past the deadline the stragglers are killed (and report so)."""
    running = [child for child in children if child.running()]
    if running and time.monotonic() - started > DEADLINE:
        for child in running:
            child.stop()
        return False
    return bool(running)


def reports_of(children: list[Child]) -> list[dict[str, Any]]:
    return [child.report() for child in children]


def report_when_done(child: Child) -> dict[str, Any]:
    """Wait for one child, the parent idle meanwhile."""
    started = time.monotonic()
    while any_running([child], started):
        time.sleep(0.005)
    return child.report()


def child_loads(in_session: Callable[[Callable[[Session], T]], T], k: int) -> dict[str, Any]:
    """A child's work: its first connection's identity, then many loads by id, one per session
    use (so each checks a connection out of the pool again)."""
    first = in_session(identity)
    wrong, errors = 0, []
    for i in ids_of_child(k):
        try:
            wrong += not in_session(lambda session, i=i: load(session, i))
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(exc).__name__}: {exc}")
    return load_report(first, wrong, errors)


def load_report(first: int, wrong: int, errors: list[str]) -> dict[str, Any]:
    return {"identity": first, "wrong": wrong, "errors": errors[:3], "error_count": len(errors)}


def assert_children_had_their_own_connections(
    reports: list[dict[str, Any]], parent_identity: int
) -> None:
    for report in reports:
        assert "raised" not in report, report
        assert (report["wrong"], report["error_count"]) == (0, 0), report
        assert report["identity"] != parent_identity, "the child got the parent's connection"


def parent_loads_while(
    in_session: Callable[[Callable[[Session], T]], T], children: list[Child]
) -> int:
    """The parent keeps querying until its children are done; returns how many loads it did."""
    started, loads = time.monotonic(), 0
    while any_running(children, started) or loads < 20:
        i = loads % ROWS + 1
        assert in_session(lambda session, i=i: load(session, i))
        loads += 1
    return loads


# How each kind of sessionscope use runs one function in a session, committing (or closing)
# after it, so that the connection goes back to the pool between calls.


def registry_runner(registry: Any) -> Callable[[Callable[[Session], T]], T]:
    def in_session(fn: Callable[[Session], T]) -> T:
        try:
            result = fn(registry())
            registry.commit()
        except BaseException:
            registry.remove()
            raise
        return result

    return in_session


def maker_runner(maker: sessionmaker[Session]) -> Callable[[Callable[[Session], T]], T]:
    def in_session(fn: Callable[[Session], T]) -> T:
        with maker() as session:
            return fn(session)

    return in_session


KINDS: dict[str, Callable[[Engine], Callable[[Callable[[Session], Any]], Any]]] = {
    "registry": lambda engine: registry_runner(sessionscope.scoped_session(sessionmaker(engine))),
    "registry-guard-off": lambda engine: registry_runner(
        sessionscope.scoped_session(sessionmaker(engine), guard="off")
    ),
    "guarded-sessionmaker": lambda engine: maker_runner(sessionscope.guard(sessionmaker(engine))),
}


@pytest.mark.parametrize("method", sorted(START))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_forked_children_never_use_the_parents_pooled_connections(
    engine: Engine, kind: str, method: str
) -> None:
    seed(engine)
    in_session = KINDS[kind](engine)
    parent_identity = in_session(identity)  # its connection is back in the pool at the fork

    children = start(method, lambda k: child_loads(in_session, k))
    assert parent_loads_while(in_session, children) >= 20
    assert_children_had_their_own_connections(reports_of(children), parent_identity)

    # the parent's connection survived the children: still the same one, still answering
    assert in_session(identity) == parent_identity
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_without_sessionscope_the_child_gets_the_parents_connection(db_url: str) -> None:
    """The control: an engine sessionscope never saw keeps its pool in the child, so the child's
    first session uses the parent's connection (the same server process on PostgreSQL)."""
    plain = create_engine(db_url)
    try:
        in_session = maker_runner(sessionmaker(plain))
        parent_identity = in_session(identity)
        assert plain not in _fork_pools._engines
        # one child, while the parent waits: two processes on one socket at once could hang
        child = ForkedChild(lambda: {"identity": in_session(identity)})
        assert report_when_done(child) == {"identity": parent_identity}
        assert in_session(identity) == parent_identity
    finally:
        plain.dispose()


@pytest.mark.parametrize("method", sorted(START))
def test_async_registry_children_have_their_own_connections(
    async_url: tuple[str, dict[str, Any]], method: str
) -> None:
    url, connect_args = async_url

    async def in_session_async(scoped: Any, fn: Callable[[Session], T]) -> T:
        session: AsyncSession = scoped()
        try:
            result = await session.run_sync(fn)
            await scoped.commit()
        except BaseException:
            await scoped.remove()
            raise
        return result

    async def child_work(scoped: Any, k: int) -> dict[str, Any]:
        first = await in_session_async(scoped, identity)
        wrong, errors = 0, []
        for i in ids_of_child(k):
            try:
                n, owner = (
                    await scoped().execute(select(Row.n, Row.owner).where(Row.id == i))
                ).one()
                wrong += (n, owner) != (i, f"row-{i}")
                await scoped.commit()
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")
                await scoped.remove()
        await scoped.remove()
        return load_report(first, wrong, errors)

    async def parent() -> None:
        engine = create_async_engine(url, connect_args=connect_args)
        try:
            scoped = sessionscope.async_scoped_session(async_sessionmaker(engine))
            async with engine.begin() as conn:
                await conn.run_sync(seed_on)
            parent_identity = await in_session_async(scoped, identity)

            # forked inside the running loop: each child runs a loop of its own
            children = start(method, lambda k: run_in_new_loop(child_work(scoped, k)))
            started, loads = time.monotonic(), 0
            while any_running(children, started) or loads < 20:
                i = loads % ROWS + 1
                assert await in_session_async(scoped, lambda s, i=i: load(s, i))
                loads += 1
            assert_children_had_their_own_connections(reports_of(children), parent_identity)

            assert await in_session_async(scoped, identity) == parent_identity
            await scoped.remove()
            assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        finally:
            await engine.dispose()

    asyncio.run(parent())


def run_in_new_loop(coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        return await coro

    return asyncio.run(main())


def test_an_in_memory_sqlite_database_stays_in_the_child() -> None:
    """Its connection is no socket and no file: the child's copy is its own, and a new pool
    would give the child an empty database."""
    memory = create_engine("sqlite://", poolclass=StaticPool)
    Base.metadata.create_all(memory)
    seed(memory)
    registry = sessionscope.scoped_session(sessionmaker(memory))
    in_session = registry_runner(registry)
    assert in_session(lambda session: load(session, 7))
    child = ForkedChild(lambda: {"loaded": in_session(lambda session: load(session, 7))})
    assert report_when_done(child) == {"loaded": True}
    memory.dispose()


def test_engines_are_found_in_binds_connections_and_async_sessions(tmp_path: Any) -> None:
    by_table = create_engine(f"sqlite:///{tmp_path}/a.db")
    by_connection = create_engine(f"sqlite:///{tmp_path}/b.db")
    async_engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/c.db")
    by_maker = create_engine(f"sqlite:///{tmp_path}/d.db")
    with by_connection.connect() as conn:
        sessionscope.guard(Session(bind=conn, binds={Row: by_table}))
    sessionscope.guard(AsyncSession(async_engine))
    sessionscope.scoped_session(sessionmaker(binds={Row: by_maker}), guard="off")
    for engine in (by_table, by_connection, async_engine.sync_engine, by_maker):
        assert engine in _fork_pools._engines
        engine.dispose()


def test_engines_are_held_weakly() -> None:
    engine = create_engine("sqlite://")
    sessionscope.guard(sessionmaker(engine))
    assert engine in _fork_pools._engines
    gone = weakref.ref(engine)
    del engine
    gc.collect()
    assert gone() is None


def test_a_failing_dispose_is_logged_and_the_other_engines_still_get_new_pools(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    broken = create_engine(f"sqlite:///{tmp_path}/broken.db")
    healthy = create_engine(f"sqlite:///{tmp_path}/healthy.db")
    sessionscope.guard(sessionmaker(broken))
    sessionscope.guard(sessionmaker(healthy))

    def refuse(close: bool = True) -> None:
        raise RuntimeError("no")

    broken.dispose = refuse  # type: ignore[method-assign]
    pool_before = healthy.pool
    caplog.set_level(logging.WARNING, logger="sessionscope")

    def child() -> dict[str, Any]:
        logged = [r.getMessage() for r in caplog.records if r.name == "sessionscope"]
        return {"new_pool": healthy.pool is not pool_before, "logged": len(logged)}

    forked = ForkedChild(child)
    assert report_when_done(forked) == {"new_pool": True, "logged": 1}
    assert healthy.pool is pool_before  # the parent's pools are untouched
    del broken.dispose
    broken.dispose()
    healthy.dispose()
