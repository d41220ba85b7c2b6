"""FastAPI under uvicorn, under load: every request has a session of its own, and nothing carries.

A real server (``tests/servers/fastapi_app.py`` in a uvicorn subprocess, PostgreSQL via psycopg)
gets 1,000 requests from 20 keep-alive clients at once; a quarter of them flush a row and fail.
FastAPI runs a request's sync dependency, its ``def`` endpoint, its background task and the
dependency's exit as separate thread-pool jobs while the request's task waits: with the request
marked by ``async with sessionscope.unit_of_work():`` (a pure ASGI wrapper), those jobs are one unit
of work. With a pool of 1 thread (every request's jobs on the same reused thread) and of 40:

- no unexpected error: the only 5xx are the failing endpoint's own;
- every acknowledged request's rows are committed exactly once, a failed request's never;
- no request starts with another's session state (``Session.info``, pending objects, an open
  transaction);
- afterwards the server holds no connection (``engine.pool.checkedout() == 0``) and PostgreSQL has
  no ``idle in transaction`` backend of the server (found by its ``application_name``).

Unmarked requests are each job a unit of work of its own: the registry in ``def`` endpoints still
serves cleanly, and the tutorial's ``get_db`` session is refused in the endpoint's job with a
``CrossUnitError`` that says to open ``unit_of_work()``. SQLAlchemy's own ``scoped_session`` in the
same application carries a failed request's flushed rows and ``Session.info`` into the next
request on the reused pool thread: the same checks fail for it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.pool import NullPool

from tests.conftest import PG_URL
from tests.servers.fastapi_app import Base, RequestRow
from tests.servers.process import Result, Server, drive, running

pytestmark = pytest.mark.timeout(150)

APP = "tests.servers.fastapi_app:create_app"
REQUESTS = 1000
CLIENTS = 20
FAIL_EVERY = 4  # request i fails when i % FAIL_EVERY == FAIL_EVERY - 1

FAMILIES: dict[str, tuple[tuple[str, ...], frozenset[int]]] = {
    # family: (the paths its requests alternate between, the rows a successful request writes)
    "tutorial": (("/tutorial/def", "/tutorial/async"), frozenset({1})),
    "registry": (("/registry",), frozenset({0, 1, 2})),  # dependency, endpoint, background task
    "registry-plain": (("/registry/plain",), frozenset({1})),
    "scope": (("/scope",), frozenset({1})),
}


@dataclass
class Database:
    """A schema of its own for one server; ``url`` is the server's (with its application_name)."""

    url: str
    app_name: str
    reader: Engine  # the test's own connections: another application_name, no pool

    def committed(self) -> Counter[tuple[str, int]]:
        """(request id, row part) -> how many such rows were committed."""
        with self.reader.connect() as conn:
            found = conn.execute(
                select(RequestRow.req, RequestRow.n, func.count()).group_by(
                    RequestRow.req, RequestRow.n
                )
            ).all()
        return Counter({(req, n): int(count) for req, n, count in found})

    def backends(self) -> Counter[str]:
        """The server's PostgreSQL backends now, by state."""
        with self.reader.connect() as conn:
            found = conn.execute(
                text(
                    "select coalesce(state, '?'), count(*) from pg_stat_activity "
                    "where application_name = :app group by 1"
                ),
                {"app": self.app_name},
            ).all()
        return Counter({state: int(count) for state, count in found})


@pytest.fixture
def database(pg_schema: str) -> Iterator[Database]:
    tag = uuid.uuid4().hex[:8]
    schema = f"{pg_schema}_fastapi_{tag}"
    admin = create_engine(PG_URL, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    on_schema = f"{PG_URL}?options=-csearch_path%3D{schema}"
    reader = create_engine(on_schema, poolclass=NullPool)
    Base.metadata.create_all(reader)
    app_name = f"ss_fastapi_{tag}"
    yield Database(f"{on_schema}&application_name={app_name}", app_name, reader)
    reader.dispose()
    with admin.begin() as conn:
        conn.execute(text(f'drop schema "{schema}" cascade'))
    admin.dispose()


def serve(
    database: Database,
    tmp_path: Path,
    *,
    wrap: bool,
    threads: int,
    registry: str = "sessionscope",
) -> Any:
    env = {
        "SS_DB_URL": database.url,
        "SS_WRAP": "1" if wrap else "0",
        "SS_THREADS": str(threads),
        "SS_REGISTRY": registry,
    }
    return running(APP, env, tmp_path / "server.log")


def plan(family: str, count: int = REQUESTS) -> list[str]:
    """The requests' paths: ids r0, r1, ...; every FAIL_EVERY-th fails."""
    prefixes = FAMILIES[family][0]
    return [
        f"{prefixes[i % len(prefixes)]}/r{i}" + ("/fail" if failing(i) else "")
        for i in range(count)
    ]


def failing(i: int) -> bool:
    return i % FAIL_EVERY == FAIL_EVERY - 1


def request_id(result: Result) -> str:
    return result.path.removesuffix("/fail").rsplit("/", 1)[1]


def as_expected(result: Result) -> bool:
    """200 for a request that succeeds; the failing endpoint's own 500 for one that fails."""
    if result.path.endswith("/fail"):
        return result.status == 500 and result.body == {"expected_failure": request_id(result)}
    return result.status == 200 and result.body == {"req": request_id(result)}


def wait_for(server: Server, done: Any, timeout: float = 30) -> dict[str, Any]:
    """Poll ``/stats`` until ``done(stats)`` or the timeout; the last stats either way."""
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = server.get("/stats")
        if done(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def settled(server: Server, sent: int, stale: int = 0) -> dict[str, Any]:
    """The server's stats once every request sent has completed and at most ``stale``
    connections are out.

    Completed means the ASGI call returned: a dependency's exit and the background tasks run after
    the response, and the boundary ends after them.
    """
    return wait_for(server, lambda s: s["completed"] >= sent and s["checkedout"] <= stale)


def assert_served_cleanly(
    server: Server, database: Database, family: str, results: list[Result], stale: int = 0
) -> None:
    """``stale``: connections allowed to stay out (unmarked jobs, see the test that passes it)."""
    unexpected = [r for r in results if not as_expected(r)]
    assert unexpected == [], (
        f"{len(unexpected)} unexpected responses, first: {unexpected[:3]}\n{server.log()[-3000:]}"
    )
    stats = settled(server, len(results), stale)
    assert stats["completed"] == len(results)
    assert stats["leaks"] == [], "a request saw another's session state"
    assert stats["share_nothing"] == []
    assert stats["checkedout"] <= stale

    rows = FAMILIES[family][1]
    acknowledged = [request_id(r) for r in results if not r.path.endswith("/fail")]
    expected = Counter({(req, n): 1 for req in acknowledged for n in rows})
    committed = database.committed()
    assert committed == expected, {
        "missing": sorted(set(expected) - set(committed))[:5],
        "not acknowledged (failed requests' rows)": sorted(set(committed) - set(expected))[:5],
        "duplicated": [key for key, count in committed.items() if count > 1][:5],
    }
    backends = database.backends()
    assert backends["idle in transaction"] <= stale, backends
    assert backends["idle in transaction (aborted)"] == 0, backends
    assert "Traceback" not in server.log(), server.log()[-5000:]


def wait_for_no_backends(database: Database, timeout: float = 10) -> Counter[str]:
    """The server's backends once it stopped (its pool disposed at shutdown); empty in time."""
    deadline = time.monotonic() + timeout
    while (backends := database.backends()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return backends


# ------------------------------------------------------------------------------------------------
# requests marked with unit_of_work(): one unit of work each, whichever threads run its jobs


@pytest.mark.parametrize("threads", [1, 40], ids=["pool-of-1", "pool-of-40"])
@pytest.mark.parametrize("family", ["tutorial", "registry", "scope"])
def test_marked_requests_under_load_commit_exactly_their_rows_and_leave_nothing_behind(
    family: str, threads: int, database: Database, tmp_path: Path
) -> None:
    """``tutorial``: FastAPI's ``get_db`` (a guarded sessionmaker, closed in ``finally``) used by a
    ``def`` and an ``async def`` endpoint. ``registry``: ``Session()`` implicitly in a ``def``
    dependency, the ``def`` endpoint and a sync background task, which all see the one session of
    their request (its ``info``, its pending row). ``scope``: ``with Session.scope() as s: yield s``
    in a sync dependency, committed at its exit (another job, often on another thread)."""
    with serve(database, tmp_path, wrap=True, threads=threads) as server:
        assert server.get("/stats")["threads"] == threads
        results = drive(server.base_url, plan(family), clients=CLIENTS)
        assert_served_cleanly(server, database, family, results)
    assert wait_for_no_backends(database) == Counter()


# ------------------------------------------------------------------------------------------------
# unmarked requests: every pool job a unit of work of its own


@pytest.mark.parametrize("threads", [1, 40], ids=["pool-of-1", "pool-of-40"])
def test_unmarked_def_endpoints_using_the_registry_carry_nothing_between_requests(
    threads: int, database: Database, tmp_path: Path
) -> None:
    """Without the wrapper, each ``def`` endpoint's job gets its own implicit session, closed
    (rolled back if uncommitted) as the pool drops the job: a failed request's flushed row never
    lands, no later request on the reused thread sees its ``info`` or transaction."""
    with serve(database, tmp_path, wrap=False, threads=threads) as server:
        results = drive(server.base_url, plan("registry-plain"), clients=CLIENTS)
        # a pool thread may hold its last job until it runs the next: one more round, then check
        final = [f"/registry/plain/final{i}" for i in range(CLIENTS)]
        results += drive(server.base_url, final, clients=CLIENTS)
        # The documented limit of unmarked jobs: a job that failed leaves its context in a
        # reference cycle (the exception, its traceback, the pool's future). Its session is
        # closed when its pool thread starts its next job, or by the garbage collector: at most
        # one per pool thread stays out meanwhile. (Marked requests: none, see above.)
        assert_served_cleanly(server, database, "registry-plain", results, stale=threads)


def test_unmarked_tutorial_get_db_is_refused_in_the_endpoint_and_told_to_mark_the_request(
    database: Database, tmp_path: Path
) -> None:
    """The LIMIT, by design: without the wrapper the session that ``get_db`` made in its own pool
    job belongs to that job, so the endpoint (the next job, or the request's task for an
    ``async def`` endpoint) is refused, every time, with a message that says to open
    ``sessionscope.unit_of_work()``. Nothing is written and nothing is left open."""
    with serve(database, tmp_path, wrap=False, threads=1) as server:
        results = drive(server.base_url, plan("tutorial", 40), clients=CLIENTS)
        stats = settled(server, len(results))
    assert {r.status for r in results} == {500}
    refusals = [r.body for r in results]
    assert all(isinstance(body, dict) for body in refusals), refusals[:3]
    assert {body.get("share_nothing") for body in refusals} == {"CrossUnitError"}, refusals[:3]
    without_hint = [b["message"] for b in refusals if "unit_of_work()" not in b["message"]]
    assert without_hint == [], without_hint[:2]
    assert database.committed() == Counter()
    assert stats["checkedout"] == 0
    assert wait_for_no_backends(database) == Counter()


# ------------------------------------------------------------------------------------------------
# the same application with SQLAlchemy's scoped_session: the checks above can fail


def test_sqlalchemy_scoped_session_in_the_same_app_carries_failed_requests_into_the_next(
    database: Database, tmp_path: Path
) -> None:
    """SQLAlchemy keys its sessions by pool thread: a failed request's flushed (uncommitted) row
    and its ``Session.info`` stay in the thread's session, the next request on that thread sees
    them and commits the failed request's rows with its own. The wrapper does not help it."""
    with serve(database, tmp_path, wrap=True, threads=1, registry="sqlalchemy") as server:
        results = drive(server.base_url, plan("registry", 300), clients=CLIENTS)
        stats = settled(server, len(results))
    assert [r for r in results if not as_expected(r)] == []  # nothing visibly wrong...
    failed = {request_id(r) for r in results if r.path.endswith("/fail")}
    landed = {req for req, _ in database.committed() if req in failed}
    assert landed, "no failed request's rows were committed by a later request"
    assert any(" saw info of " in leak for leak in stats["leaks"]), stats["leaks"][:5]
