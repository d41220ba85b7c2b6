"""SessionScopeMiddleware under uvicorn and real load: one session per request, nothing carries.

``tests/servers/scoped_app.py`` runs in a uvicorn subprocess (asyncio or uvloop loop) on
PostgreSQL, behind ``SessionScopeMiddleware(commit=True)``: FastAPI with the
``sessionscope.fastapi.session()`` dependency (sync registry with ``def`` and ``async def``
endpoints and a background task; async registry with ``async def``) and a plain Starlette app.
Keep-alive clients send write, slow (a sleep between flush and commit), read, failing and tenant
requests at once, in rounds. Checked:

- no unexpected response: the only 5xx are the failing endpoints' own;
- every acknowledged row committed exactly once (the middleware's commit, the background task's
  own), no row of a failed request;
- no request saw another's objects, transaction or ``Session.info`` (the application checks);
- afterwards no connection out, no ``idle in transaction`` backend of the server (by its
  ``application_name``), and the server's RSS flat from round to round;
- tenants: PostgreSQL row-level security keyed by ``SET LOCAL app.tenant`` (a role without
  BYPASSRLS, ``FORCE ROW LEVEL SECURITY``): no request sees another tenant's rows. SQLAlchemy's
  own ``scoped_session`` misused in an ``async def`` endpoint of the same application (one session
  per thread: every request on the loop shares it) does show other tenants' rows, so the check
  can fail.

``make test`` runs one representative case (FastAPI, sync registry, asyncio loop, ~1,000
requests from 20 clients) and the misuse; uvloop, the other applications and the 2,000-request
loads are marked slow.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, insert, make_url, text
from sqlalchemy.pool import NullPool

from tests import test_fastapi_uvicorn as fastapi_uvicorn
from tests.conftest import PG_URL
from tests.servers.fastapi_app import Base as RowsBase
from tests.servers.fastapi_app import RequestRow
from tests.servers.process import Result, Server, drive, running
from tests.servers.scoped_app import CONFLICT_ID, Base, TenantRow

pytestmark = pytest.mark.timeout(240)

APP = "tests.servers.scoped_app:create_app"
TENANTS = 8
FAIL_EVERY = 5  # request i fails when i % FAIL_EVERY == FAIL_EVERY - 1 (tenant requests never)
PATHS = {
    "fastapi-sync": ("/def/write", "/def/slow", "/def/read", "/async/write"),
    "fastapi-async": ("/async/write", "/async/slow", "/async/read"),
    "starlette": ("/async/write", "/async/slow", "/async/read"),
}
TENANT_MODE = {"fastapi-sync": "def", "fastapi-async": "async", "starlette": "async"}


@dataclass
class Database(fastapi_uvicorn.Database):
    """The rows table and the backends' query of the FastAPI harness; ``url`` connects as a role
    without BYPASSRLS, in ``schema``."""

    schema: str = ""


@pytest.fixture
def database(pg_schema: str) -> Iterator[Database]:
    """A schema, a login role without BYPASSRLS, and ``tenant_rows`` under forced RLS."""
    tag = uuid.uuid4().hex[:8]
    schema, role = f"{pg_schema}_asgi_{tag}", f"ss_rls_{tag}"
    admin = create_engine(PG_URL, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
        conn.execute(text(f'create role "{role}" login nosuperuser nobypassrls'))
    reader = create_engine(f"{PG_URL}?options=-csearch_path%3D{schema}", poolclass=NullPool)
    RowsBase.metadata.create_all(reader)
    Base.metadata.create_all(reader)
    with reader.begin() as conn:
        conn.execute(
            insert(TenantRow), [{"tenant": f"t{k}"} for k in range(TENANTS) for _ in range(3)]
        )
        for statement in (
            "alter table tenant_rows enable row level security",
            "alter table tenant_rows force row level security",
            "create policy tenant_only on tenant_rows "
            "using (tenant = current_setting('app.tenant', true))",
            f'grant usage on schema "{schema}" to "{role}"',
            f'grant select, insert, update, delete on all tables in schema "{schema}" to "{role}"',
            f'grant usage, select on all sequences in schema "{schema}" to "{role}"',
        ):
            conn.execute(text(statement))
    app_url = make_url(PG_URL).set(username=role).render_as_string(hide_password=False)
    yield Database(app_url, f"ss_asgi_{tag}", reader, schema)
    reader.dispose()
    with admin.begin() as conn:
        conn.execute(text(f'drop schema "{schema}" cascade'))
        conn.execute(text(f'drop owned by "{role}"'))
        conn.execute(text(f'drop role "{role}"'))
    admin.dispose()


def serve(database: Database, tmp_path: Path, kind: str, loop: str = "asyncio") -> Any:
    env = {
        "SS_PG_URL": database.url,
        "SS_SCHEMA": database.schema,
        "SS_APP_NAME": database.app_name,
        "SS_KIND": kind,
    }
    return running(APP, env, tmp_path / "server.log", args=["--loop", loop])


def plan(kind: str, count: int, round_: int) -> list[str]:
    """Mixed requests: every 6th a tenant read, the others alternating writes, slow writes and
    reads, every FAIL_EVERY-th of those failing."""
    paths: list[str] = []
    prefixes = PATHS[kind]
    for i in range(count):
        req = f"k{round_}x{i}"
        if i % 6 == 5:
            paths.append(f"/tenant/{TENANT_MODE[kind]}/t{i % TENANTS}/{req}")
        else:
            fail = "/fail" if i % FAIL_EVERY == FAIL_EVERY - 1 else ""
            paths.append(f"{prefixes[i % len(prefixes)]}/{req}{fail}")
    return paths


def request_id(result: Result) -> str:
    return result.path.removesuffix("/fail").rsplit("/", 1)[1]


def as_expected(result: Result) -> bool:
    req = request_id(result)
    if result.path.endswith("/fail"):
        return result.status == 500 and result.body == {"expected_failure": req}
    if result.status != 200 or not isinstance(result.body, dict) or result.body["req"] != req:
        return False
    if result.path.startswith(("/tenant/", "/leaky/")):
        return True  # the tenants seen: checked by the tests
    return True


def tenant_of(result: Result) -> str:
    return result.path.split("/")[-2]


def other_tenants_seen(results: list[Result]) -> list[Result]:
    return [
        r
        for r in results
        if r.path.startswith(("/tenant/", "/leaky/"))
        and isinstance(r.body, dict)
        and set(r.body.get("tenants", ())) - {tenant_of(r)}
    ]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def settled(server: Server, sent: int, timeout: float = 30) -> dict[str, Any]:
    """The server's stats once every request sent has completed (the ASGI call returned, so the
    background tasks and the unit of work ended) and no connection is out."""
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = server.get("/stats")
        if (stats["completed"] >= sent and stats["checkedout"] == 0) or (
            time.monotonic() > deadline
        ):
            return stats
        time.sleep(0.1)


def run_load(
    database: Database,
    tmp_path: Path,
    kind: str,
    *,
    loop: str = "asyncio",
    rounds: int = 3,
    per_round: int = 340,
    clients: int = 24,
) -> None:
    """Rounds of mixed load on one server, then every check of the module docstring."""
    results: list[Result] = []
    rss: list[int] = []
    with serve(database, tmp_path, kind, loop) as server:
        for round_ in range(rounds):
            batch = drive(server.base_url, plan(kind, per_round, round_), clients=clients)
            results += batch
            unexpected = [r for r in batch if not as_expected(r)]
            assert unexpected == [], (
                f"{len(unexpected)} unexpected, first: {unexpected[:3]}\n{server.log()[-3000:]}"
            )
            stats = settled(server, len(results))
            rss.append(rss_kib(server.process.pid))
        assert stats["completed"] == len(results)
        assert stats["checkedout"] == 0
        assert stats["leaks"] == [], stats["leaks"][:5]
        backends = database.backends()
        assert backends["idle in transaction"] == 0, backends
        assert backends["idle in transaction (aborted)"] == 0, backends
        log = server.log()
    assert "Traceback" not in log, log[-5000:]

    assert other_tenants_seen(results) == []
    tenant_results = [r for r in results if r.path.startswith("/tenant/")]
    assert tenant_results
    assert all(r.body["tenants"] == [tenant_of(r)] for r in tenant_results)

    expected: Counter[tuple[str, int]] = Counter()
    for r in results:
        if not r.path.endswith("/fail") and not r.path.startswith("/tenant/"):
            expected.update({(request_id(r), n): 1 for n in r.body["rows"]})
    committed = database.committed()
    assert committed == expected, {
        "missing": sorted(set(expected) - set(committed))[:5],
        "not acknowledged (failed requests' rows)": sorted(set(committed) - set(expected))[:5],
        "duplicated": [key for key, count in committed.items() if count > 1][:5],
    }
    # after the first round (imports, pools, caches warmed up) the worker does not grow
    growth_mib = (rss[-1] - rss[0]) / 1024
    assert growth_mib < 6, f"RSS per round (KiB): {rss}"  # observed: under 1.5 MiB
    print(f"{kind}/{loop}: {len(results)} requests, RSS per round (KiB): {rss}")


def test_fastapi_sync_registry_under_load_on_asyncio(database: Database, tmp_path: Path) -> None:
    """The representative case: FastAPI, ``scoped_session``, ``def`` and ``async def`` endpoints,
    a background task, the dependency; uvicorn's asyncio loop; 3 rounds of 340 requests from 24
    keep-alive clients."""
    run_load(database, tmp_path, "fastapi-sync")


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("kind", ["fastapi-sync", "fastapi-async", "starlette"])
def test_matrix_under_load(database: Database, tmp_path: Path, kind: str, loop: str) -> None:
    """Every application on both loops, 2,000 requests each (5 rounds of 400), 30 clients."""
    run_load(database, tmp_path, kind, loop=loop, rounds=5, per_round=400, clients=30)


def test_sqlalchemy_scoped_session_misused_in_the_same_app_shows_other_tenants(
    database: Database, tmp_path: Path
) -> None:
    """The check can fail: SQLAlchemy's thread-keyed ``scoped_session`` in an ``async def``
    endpoint gives every request on the loop one session; a request's ``SET LOCAL app.tenant`` is
    overwritten by another's before it reads, and it is shown the other tenant's rows."""
    paths = [f"/leaky/tenant/t{i % TENANTS}/L{i}" for i in range(300)]
    with serve(database, tmp_path, "fastapi-sync") as server:
        results = drive(server.base_url, paths, clients=20)
    assert [r for r in results if r.status == 200], results[:3]
    leaked = other_tenants_seen(results)
    assert leaked, "no request saw another tenant's rows through the shared session"


def test_streaming_bodies_and_clients_that_leave_mid_stream(
    database: Database, tmp_path: Path
) -> None:
    """``/def/stream``: its row 1 is committed as the response starts; the generator flushes row 3
    after that, which is never committed, whether the client reads the whole body or closes the
    connection after the first chunk. Either way the session ends: no connection out, no backend
    idle in transaction."""
    read_whole = [f"full{i}" for i in range(20)]
    leave = [f"gone{i}" for i in range(20)]

    def stream(base_url: str, req: str, whole: bool) -> bytes:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            with client.stream("POST", f"/def/stream/{req}") as response:
                assert response.status_code == 200
                if whole:
                    return response.read()
                return next(response.iter_raw())  # then the connection is closed unread

    with serve(database, tmp_path, "fastapi-sync") as server:
        with ThreadPoolExecutor(10) as pool:
            bodies = list(
                pool.map(
                    stream,
                    [server.base_url] * 40,
                    read_whole + leave,
                    [True] * 20 + [False] * 20,
                )
            )
        stats = settled(server, 40)
        backends = database.backends()
        log = server.log()
    assert all(body.count(b"\n") == 11 for body in bodies[:20]), bodies[:2]
    assert stats["completed"] == 40, stats
    assert stats["checkedout"] == 0, stats
    assert stats["leaks"] == []
    assert backends["idle in transaction"] == 0, backends
    assert "Traceback" not in log, log[-5000:]
    assert database.committed() == Counter({(req, 1): 1 for req in read_whole + leave})


def test_a_commit_that_fails_is_a_500_not_a_lost_write_behind_a_200(
    database: Database, tmp_path: Path
) -> None:
    """``/def/conflict``: the endpoint returns 200, but its row's id is taken; the middleware
    commits before forwarding ``http.response.start``, the commit fails, and uvicorn answers 500.
    The session is closed all the same."""
    with database.reader.begin() as conn:
        conn.execute(insert(RequestRow), [{"id": CONFLICT_ID, "req": "taken", "n": 0}])
    with serve(database, tmp_path, "fastapi-sync") as server:
        results = drive(server.base_url, [f"/def/conflict/c{i}" for i in range(20)], clients=5)
        stats = settled(server, 20)
        backends = database.backends()
        log = server.log()
    assert {r.status for r in results} == {500}, results[:3]
    assert "IntegrityError" in log
    assert stats["checkedout"] == 0, stats
    assert backends["idle in transaction"] == 0, backends
    assert database.committed() == Counter({("taken", 0): 1})
