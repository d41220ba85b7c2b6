"""A reused greenlet and a reused pool thread serving many requests through the boundary API.

Servers and pools reuse their threads and greenlets for request after request, so the thread or
greenlet is not the unit a session belongs to: the request is. A loop that marks each request with
``with sessionscope.unit_of_work():`` gets, on one reused OS thread and in reused gevent or
eventlet greenlets, a fresh implicit session per request (no transaction, nothing pending, empty
``Session.info``), every acknowledged row committed exactly once and a failed request's flushed row
never. The same loop without boundaries on SQLAlchemy's ``scoped_session`` commits failed requests'
rows with the next request's: the checks can fail.

In asyncio, ``async with sessionscope.unit_of_work()`` makes a task's thread-pool jobs (anyio's
``to_thread.run_sync``, ``asyncio.to_thread``) part of the task's unit of work, on a pool of ONE
thread that runs every task's jobs in turn: a session made in one job is used in the next and
closed in a third, the implicit ``Session()`` is the task's; another unit (another task's job, a
sibling task, a thread started by hand) is refused every time, and two jobs of one task inside its
session at once are stopped with ``ConcurrentUseError``.

Every test ends with no connection checked out and, on PostgreSQL, no backend of its own left
``idle in transaction``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool, QueuePool

import sessionscope
from tests.conftest import PG_URL
from tests.models import Row
from tests.servers.worker_loop import CLEAN, Served, committed_rows, serve, verdict

SCENARIO = Path(__file__).parent / "scenarios" / "reused_green.py"


@dataclass
class Database:
    """The application's engine (a real pool; on PostgreSQL an application_name of its own)."""

    url: str
    engine: Engine
    app_name: str | None

    def idle_in_transaction(self) -> int:
        """This engine's PostgreSQL backends left in a transaction (always 0 on SQLite)."""
        if self.app_name is None:
            return 0
        reader = create_engine(self.url, poolclass=NullPool)
        with reader.connect() as conn:
            found = conn.execute(
                text(
                    "select count(*) from pg_stat_activity where application_name = :app "
                    "and state like 'idle in transaction%'"
                ),
                {"app": self.app_name},
            ).scalar_one()
        reader.dispose()
        return int(found)

    def assert_nothing_left(self) -> None:
        assert self.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert self.idle_in_transaction() == 0


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    if db_url.startswith("sqlite"):
        app_name = None
        connect_args: dict[str, Any] = {"timeout": 30, "check_same_thread": False}
    else:
        app_name = f"ss_reused_{uuid.uuid4().hex[:8]}"
        connect_args = {"application_name": app_name}
    engine = create_engine(
        db_url,
        poolclass=QueuePool,
        pool_size=5,
        max_overflow=20,
        pool_timeout=10,
        connect_args=connect_args,
    )
    yield Database(db_url, engine, app_name)
    engine.dispose()


# ------------------------------------------------------------------------------------------------
# (a) one reused OS thread


def serve_on(pool: concurrent.futures.Executor, Session: Any, *, boundary: bool) -> Served:
    """300 requests in three batches submitted to ``pool`` (of one thread), which stays alive."""
    served = Served()
    threads: set[int] = set()

    def batch(ids: range) -> None:
        threads.add(threading.get_ident())
        serve(Session, ids, served, boundary=boundary)

    for start in (0, 100, 200):
        pool.submit(batch, range(start, start + 100)).result()
    assert len(threads) == 1
    return served


def test_a_reused_pool_thread_serves_each_request_in_a_fresh_unit_of_work(
    database: Database,
) -> None:
    Session = sessionscope.scoped_session(sessionmaker(database.engine))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        served = serve_on(pool, Session, boundary=True)
        assert (len(served.ok), len(served.failed)) == (200, 100)
        assert verdict(served, committed_rows(database.engine)) == CLEAN
        # the thread is alive, and its last request failed after a flush: nothing is held for it
        assert len(Session.registry) == 0  # type: ignore[arg-type]
        database.assert_nothing_left()


def test_without_boundaries_sqlalchemy_scoped_session_carries_failed_requests_into_the_next(
    database: Database,
) -> None:
    """SQLAlchemy's thread-local session outlives each request on the reused thread: the request
    after a failed one finds its transaction, its ``info`` and its flushed row, and commits it."""
    Session = sa_scoped_session(sessionmaker(database.engine))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        served = serve_on(pool, Session, boundary=False)
        found = verdict(served, committed_rows(database.engine))
        assert found["errors"] == []
        assert len(found["failed_landed"]) >= 90  # every failed request's but the last one's
        assert any("info={'req'" in start for start in found["unclean_starts"])
        if database.app_name is not None:  # the last request failed: its transaction is open
            assert database.idle_in_transaction() == 1
        pool.submit(Session.remove).result()
    database.assert_nothing_left()


# ------------------------------------------------------------------------------------------------
# (b) reused gevent and eventlet greenlets, monkey-patched, in a subprocess


def run_green(framework: str, registry: str, boundary: str, url: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONWARNINGS", None)
    env.pop("PSYCOPG_WAIT_FUNC", None)
    command = [sys.executable, str(SCENARIO), "--framework", framework, "--registry", registry]
    proc = subprocess.run(
        [*command, "--boundary", boundary, "--url", url],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        pytest.fail(f"{framework} exited {proc.returncode}\nstderr:\n{proc.stderr[-5000:]}")
    facts: dict[str, Any] = json.loads(lines[-1])
    return facts


@pytest.mark.parametrize("framework", ["gevent", "eventlet"])
def test_reused_greenlets_serve_each_request_in_a_fresh_unit_of_work(
    framework: str, db_url: str
) -> None:
    """Four patched greenlets, 75 requests each, switching mid-request: while they are still
    alive (parked after their last request, which failed), no connection is checked out and no
    backend is in a transaction; every acknowledged row is committed once, no failed one."""
    facts = run_green(framework, "sessionscope", "yes", db_url)
    assert (facts["served"], facts["failed"], facts["greenlets"]) == (200, 100, 4)
    assert facts["verdict"] == CLEAN
    assert facts["checked_out_while_parked"] == 0
    if db_url.startswith("postgresql"):
        states = facts["backends_while_parked"]
        assert not any(state.startswith("idle in transaction") for state in states), states
        assert facts["psycopg_wait"] in ("wait_poll", "wait_select")  # cooperative waits
    assert facts["checked_out_after"] == 0
    assert facts["logged"] == [] and facts["warnings"] == []


def test_without_boundaries_sqlalchemy_carries_failed_requests_into_the_next_in_greenlets(
    pg_schema: str,
) -> None:
    """The same greenlets without boundaries on SQLAlchemy's ``scoped_session`` (greenlet-local
    once gevent patched): failed rows land with the next request, and each parked greenlet holds
    its failed last request's transaction open."""
    facts = run_green("gevent", "sqlalchemy", "no", f"{PG_URL}?options=-csearch_path%3D{pg_schema}")
    assert facts["verdict"]["errors"] == []
    assert len(facts["verdict"]["failed_landed"]) >= 90
    assert facts["verdict"]["unclean_starts"]
    assert facts["checked_out_while_parked"] == 4
    assert facts["backends_while_parked"].get("idle in transaction") == 4


# ------------------------------------------------------------------------------------------------
# (c) asyncio tasks and their thread-pool jobs on a pool of ONE thread


Offload = Callable[..., Awaitable[Any]]


def one_thread_pool(kind: str) -> Offload:
    """Run a job in a copy of the task's context on the running loop's pool of one thread."""
    if kind == "anyio":
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1
        return anyio.to_thread.run_sync
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
    return asyncio.to_thread


def rows_by_part(engine: Engine) -> Counter[tuple[str, int]]:
    with engine.connect() as conn:
        found = conn.execute(select(Row.owner, Row.n, func.count()).group_by(Row.owner, Row.n))
        return Counter({(owner, n): int(count) for owner, n, count in found})


@pytest.mark.parametrize("pool", ["anyio", "asyncio"])
def test_a_tasks_jobs_on_one_reused_thread_share_its_sessions_one_after_another(
    pool: str, database: Database
) -> None:
    """Eight tasks at once, three jobs each, all on the same thread. In each task: job 1 makes a
    guarded session and adds a row to it and one to the implicit ``Session()``; job 2 adds another
    row to the job-1 session and commits it; job 3 closes it and commits the implicit one.
    ``Session()`` is the same in the three jobs and in the task, and differs between tasks."""
    Session = sessionscope.scoped_session(sessionmaker(database.engine))
    SessionLocal = sessionscope.guard(sessionmaker(database.engine))
    threads: set[int] = set()
    implicit: dict[str, list[OrmSession]] = {}

    async def request(tag: str, to_thread: Offload) -> None:
        async with sessionscope.unit_of_work():
            # (no transaction spans two jobs: on SQLite a write lock held by one task while the
            # single thread runs another task's write would wait out the lock timeout)
            def job_1() -> OrmSession:
                threads.add(threading.get_ident())
                made = SessionLocal()
                made.add(Row(owner=tag, n=1))
                Session.add(Row(owner=tag, n=0))
                implicit[tag] = [Session()]
                return made

            def job_2(made: OrmSession) -> None:
                made.add(Row(owner=tag, n=2))
                made.commit()
                implicit[tag].append(Session())

            def job_3(made: OrmSession) -> None:
                made.close()
                Session.commit()
                implicit[tag].append(Session())

            made = await to_thread(job_1)
            await asyncio.sleep(0.01)  # the other tasks' jobs take the thread meanwhile
            await to_thread(job_2, made)
            await asyncio.sleep(0.01)
            await to_thread(job_3, made)
            implicit[tag].append(Session())  # the task's own lookup

    async def main() -> None:
        to_thread = one_thread_pool(pool)
        await asyncio.gather(*(request(f"task-{k}", to_thread) for k in range(8)))

    asyncio.run(main())
    assert len(threads) == 1
    for sessions in implicit.values():
        assert all(session is sessions[0] for session in sessions)
    assert len({id(sessions[0]) for sessions in implicit.values()}) == 8
    assert rows_by_part(database.engine) == Counter(
        {(f"task-{k}", n): 1 for k in range(8) for n in (0, 1, 2)}
    )
    database.assert_nothing_left()


@pytest.mark.parametrize("pool", ["anyio", "asyncio"])
def test_every_other_unit_is_refused_a_session_made_in_a_tasks_job_every_time(
    pool: str, database: Database
) -> None:
    """Task A makes a session in a job and waits. On the same pool thread, another marked task's
    jobs, that task itself (a sibling), an unmarked sibling task and its jobs, and a thread started
    by hand are all refused, each attempt, before anything reaches the session: A's job then
    commits its row exactly once, untouched."""
    SessionLocal = sessionscope.guard(sessionmaker(database.engine))
    refused: list[str] = []

    def attempt(who: str, use: Callable[[], object]) -> None:
        try:
            use()
        except sessionscope.CrossUnitError as error:
            refused.append(who)
            assert "request-A" in str(error), str(error)  # the owner's unit of work, named
        else:
            raise AssertionError(f"{who} was let into A's session")

    async def main() -> None:
        to_thread = one_thread_pool(pool)
        made_it = asyncio.Event()
        others_done = asyncio.Event()
        box: dict[str, Any] = {}

        async def request_a() -> None:
            async with sessionscope.unit_of_work():

                def make() -> None:
                    session = box["session"] = SessionLocal()
                    box["row"] = Row(owner="A", n=0)
                    session.add(box["row"])
                    session.flush()

                await to_thread(make)
                made_it.set()
                await others_done.wait()
                await to_thread(lambda: box["session"].commit())
                await to_thread(lambda: box["session"].close())

        def uses(who: str) -> list[tuple[str, Callable[[], object]]]:
            session, row = box["session"], box["row"]
            return [
                (f"{who}: execute", lambda: session.execute(text("select 1"))),
                (f"{who}: add", lambda: session.add(Row(owner=who, n=1))),
                (f"{who}: attribute write", lambda: setattr(row, "n", 99)),
            ]

        async def in_its_jobs_then_itself(task: str) -> None:
            for what, use in uses(f"{task}'s job"):
                await to_thread(attempt, what, use)
            for what, use in uses(f"task {task}"):
                attempt(what, use)

        async def request_b() -> None:
            await made_it.wait()
            async with sessionscope.unit_of_work():
                await in_its_jobs_then_itself("B")

        async def unmarked_c() -> None:
            await made_it.wait()
            await in_its_jobs_then_itself("C")

        async def thread_d() -> None:
            await made_it.wait()
            for what, use in uses("thread D"):
                by_hand = threading.Thread(target=attempt, args=(what, use))
                by_hand.start()
                await asyncio.to_thread(by_hand.join)

        a = asyncio.create_task(request_a(), name="request-A")
        others = [asyncio.create_task(other()) for other in (request_b, unmarked_c, thread_d)]
        try:
            await asyncio.gather(*others)
        finally:
            others_done.set()
            await a

    asyncio.run(main())
    assert len(refused) == 15 and len(set(refused)) == 15
    assert rows_by_part(database.engine) == Counter({("A", 0): 1})
    database.assert_nothing_left()


@pytest.mark.parametrize("fix", [False, True], ids=["implicit-session", "scope-new-per-job"])
def test_two_jobs_of_one_task_inside_its_session_at_once_raise_concurrent_use_error(
    fix: bool, database: Database
) -> None:
    """``gather(to_thread(a), to_thread(b))`` on the task's implicit session: job a is inside a
    flush (held there by a ``before_flush`` hook until b has tried), so b's ``add`` is stopped
    with ``ConcurrentUseError`` pointing at ``scope(new=True)``; only a's row is committed. Each
    job in ``Session.scope(new=True)`` instead: both rows, no error."""
    Session = sessionscope.scoped_session(sessionmaker(database.engine))
    a_inside, b_tried = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold_flush(session: OrmSession, *_: Any) -> None:
        if any(getattr(obj, "owner", None) == "a" for obj in session.new):
            a_inside.set()
            b_tried.wait(10)

    def job_a() -> None:
        with Session.scope(new=True) if fix else contextlib.nullcontext(Session()) as s:
            event.listen(s, "before_flush", hold_flush)
            s.add(Row(owner="a", n=0))
            s.flush()

    def job_b() -> None:
        assert a_inside.wait(10), "job a never got inside its flush"
        try:
            with Session.scope(new=True) if fix else contextlib.nullcontext(Session()) as s:
                s.add(Row(owner="b", n=0))
        except sessionscope.ConcurrentUseError as error:
            errors.append(error)
        finally:
            b_tried.set()

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(2))
        async with sessionscope.unit_of_work():
            Session()  # the task's session exists before the jobs start
            await asyncio.gather(asyncio.to_thread(job_a), asyncio.to_thread(job_b))
            await asyncio.to_thread(Session.commit)

    asyncio.run(main())
    if fix:
        assert errors == []
        assert rows_by_part(database.engine) == Counter({("a", 0): 1, ("b", 0): 1})
    else:
        assert len(errors) == 1
        assert "scope(new=True)" in str(errors[0]), str(errors[0])
        assert rows_by_part(database.engine) == Counter({("a", 0): 1})
    database.assert_nothing_left()
