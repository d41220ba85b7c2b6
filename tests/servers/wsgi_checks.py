"""What the gunicorn tests (plain WSGI and Flask) share: the database, the load, the checks.

:func:`wsgi_database` makes a schema with the application's tables, and a role for the server
without BYPASSRLS (row-level security applies to it: ``tenant_rows`` is under a policy keyed by
``app.tenant``, forced). :func:`serve` starts ``tests.servers.wsgi_app`` under a gunicorn worker
class. :func:`assert_served_cleanly` and :func:`assert_tenants_isolated` are the checks.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.pool import NullPool

from tests.conftest import PG_URL
from tests.servers.gunicorn_process import drive_clients, gunicorn
from tests.servers.process import REPO, Result, Server, drive
from tests.servers.wsgi_app import Base, TenantRow, UniqueRow, WsgiRow
from tests.test_fastapi_uvicorn import Database

APP = "tests.servers.wsgi_app:create_app()"
CLIENTS = 30
KINDS = ("write", "read", "slow", "write", "fail", "write", "slow", "fail")
"""Request i is of kind KINDS[i % 8]: a quarter fail after flushing a row."""

WORKERS: dict[str, list[str]] = {
    "sync": ["-k", "sync", "-w", "4"],
    "gthread": ["-k", "gthread", "-w", "2", "--threads", "16"],
    "gevent": ["-k", "gevent", "-w", "2", "--worker-connections", "200"],
    "eventlet": ["-k", "eventlet", "-w", "2", "--worker-connections", "200"],
}
GREEN = ("gevent", "eventlet")

EVENTLET_GUNICORN = Path(
    os.environ.get("SESSIONSCOPE_GUNICORN_EVENTLET", str(REPO / ".venv" / "gunicorn-eventlet"))
)
"""gunicorn 23.0 removed the eventlet worker. The eventlet cases run a gunicorn < 23 installed
apart, on PYTHONPATH: ``pip install --no-deps --target .venv/gunicorn-eventlet "gunicorn==22.0.0"``
(or 23.0.0, which still ships it deprecated), or a directory named by this variable."""


EVENTLET_PRELOAD = pytest.mark.xfail(
    strict=False,
    reason="eventlet with --preload: SQLAlchemy's pool locks are made before eventlet patches the "
    "worker (in the master, and by the after-fork dispose in the child), and a pool Condition then "
    "fails under load with 'RuntimeError: cannot wait on un-acquired lock' (plain SQLAlchemy "
    "without sessionscope fails every request the same way)",
)


def mark_known_failures(request: pytest.FixtureRequest, worker: str, preload: bool) -> None:
    if worker == "eventlet" and preload:
        request.applymarker(EVENTLET_PRELOAD)


def eventlet_worker_or_skip() -> dict[str, str]:
    """The environment that gives the server a gunicorn with the eventlet worker, or skip."""
    import gunicorn as installed

    if (Path(installed.__file__).parent / "workers" / "geventlet.py").exists():
        return {}
    if (EVENTLET_GUNICORN / "gunicorn" / "workers" / "geventlet.py").exists():
        return {"PYTHONPATH": os.pathsep.join([str(EVENTLET_GUNICORN), str(REPO)])}
    reason = (
        f"gunicorn {installed.__version__} has no eventlet worker and {EVENTLET_GUNICORN} holds "
        'no gunicorn < 23: pip install --no-deps --target <that dir> "gunicorn==23.0.0" (make '
        "venv does)"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)  # CI set the machine up with make: a missing worker is a failure
    pytest.skip(reason)


@dataclass
class WsgiDatabase(Database):
    """A schema of its own for one server; ``url`` is the server's (its role, application_name).

    ``reader`` (the test's own connections) is a superuser: it sees every tenant's rows.
    """

    def committed(self) -> Counter[str]:  # type: ignore[override]
        """Request id -> how many rows it committed in ``wsgi_rows``."""
        with self.reader.connect() as conn:
            found = conn.execute(select(WsgiRow.req, func.count()).group_by(WsgiRow.req)).all()
        return Counter({req: int(count) for req, count in found})

    def tenant_rows(self) -> Counter[tuple[str, str]]:
        """(tenant, request id) -> rows committed in ``tenant_rows``."""
        with self.reader.connect() as conn:
            found = conn.execute(
                select(TenantRow.tenant, TenantRow.req, func.count()).group_by(
                    TenantRow.tenant, TenantRow.req
                )
            ).all()
        return Counter({(tenant, req): int(count) for tenant, req, count in found})

    def settled_backends(self, timeout: float = 10) -> Counter[str]:
        """The backends once none is in a transaction (each request's end runs after its
        response went out), or as they are at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            backends = self.backends()
            busy = sum(n for state, n in backends.items() if "transaction" in state)
            if not busy or time.monotonic() > deadline:
                return backends
            time.sleep(0.1)


def wsgi_database(pg_schema: str) -> Iterator[WsgiDatabase]:
    """The body of the tests' ``database`` fixture (a generator: set up, yield, drop)."""
    tag = uuid.uuid4().hex[:8]
    schema = f"{pg_schema}_wsgi_{tag}"
    role = f"ss_wsgi_app_{tag}"
    admin = create_engine(PG_URL, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
        conn.execute(text(f'create role "{role}" login nosuperuser nobypassrls'))
    on_schema = f"{PG_URL}?options=-csearch_path%3D{schema}"
    reader = create_engine(on_schema, poolclass=NullPool)
    Base.metadata.create_all(reader)
    with reader.begin() as conn:
        conn.execute(text(f'grant usage on schema "{schema}" to "{role}"'))
        conn.execute(text(f'grant select, insert on all tables in schema "{schema}" to "{role}"'))
        conn.execute(text(f'grant usage on all sequences in schema "{schema}" to "{role}"'))
        conn.execute(text("alter table tenant_rows enable row level security"))
        conn.execute(text("alter table tenant_rows force row level security"))
        conn.execute(
            text(
                "create policy tenant_isolation on tenant_rows "
                "using (tenant = current_setting('app.tenant', true)) "
                "with check (tenant = current_setting('app.tenant', true))"
            )
        )
    app_name = f"ss_wsgi_{tag}"
    as_role = re.sub(r"//[^@/]*@", f"//{role}@", on_schema, count=1)
    yield WsgiDatabase(f"{as_role}&application_name={app_name}", app_name, reader)
    reader.dispose()
    with admin.begin() as conn:
        conn.execute(text(f'drop schema "{schema}" cascade'))
        conn.execute(text(f'drop role "{role}"'))
    admin.dispose()


def serve(
    database: WsgiDatabase,
    tmp_path: Path,
    *,
    framework: str,
    worker: str,
    preload: bool,
    registry: str = "sessionscope",
) -> Any:
    env = {"SS_DB_URL": database.url, "SS_FRAMEWORK": framework, "SS_REGISTRY": registry}
    if worker in GREEN:
        # psycopg waits cooperatively only if gevent patched `select` before psycopg was
        # imported (and never detects eventlet); with --preload the application (and psycopg)
        # is imported in the master, before the worker patches. `select.select` is looked up
        # at each wait, so this one is.
        env["PSYCOPG_WAIT_FUNC"] = "wait_select"
    if worker == "eventlet":
        env.update(eventlet_worker_or_skip())
    options = WORKERS[worker] + (["--preload"] if preload else [])
    if registry != "sessionscope":  # its hung requests need not be waited for at shutdown
        options += ["--graceful-timeout", "1"]
    return gunicorn(APP, env, tmp_path / "server.log", options)


def plan(count: int) -> list[str]:
    return [f"/{KINDS[i % len(KINDS)]}/r{i}" for i in range(count)]


def kind_of(result: Result) -> str:
    return result.path.split("/")[1]


def request_id(result: Result) -> str:
    return result.path.rsplit("/", 1)[1]


def as_expected(result: Result) -> bool:
    if kind_of(result) == "fail":
        return result.status == 500 and result.body == {"expected_failure": request_id(result)}
    return result.status == 200 and result.body == {"req": request_id(result)}


def leaks(server: Server) -> list[str]:
    return [line for line in server.log().splitlines() if line.startswith("LEAK:")]


def problems(
    server: Server, database: WsgiDatabase, results: list[Result], settle: float = 10
) -> dict[str, Any]:
    """Everything that went wrong, by check (empty lists and zeros when served cleanly)."""
    writes = {"write", "slow"}
    acknowledged = {request_id(r) for r in results if kind_of(r) in writes and as_expected(r)}
    failed = {request_id(r) for r in results if kind_of(r) == "fail"}
    committed = database.committed()
    backends = database.settled_backends(settle)
    log = server.log()
    return {
        "unexpected responses": [r for r in results if not as_expected(r)][:5],
        "acknowledged rows missing": sorted(acknowledged - set(committed))[:5],
        "rows committed more than once": [req for req, n in committed.items() if n > 1][:5],
        "failed requests' rows committed": sorted(failed & set(committed))[:5],
        "rows of reads": sorted(set(committed) - acknowledged - failed)[:5],
        "leaks": leaks(server)[:5],
        "idle in transaction": backends["idle in transaction"]
        + backends["idle in transaction (aborted)"],
        "tracebacks": log.count("Traceback"),
    }


CLEAN = {
    "unexpected responses": [],
    "acknowledged rows missing": [],
    "rows committed more than once": [],
    "failed requests' rows committed": [],
    "rows of reads": [],
    "leaks": [],
    "idle in transaction": 0,
    "tracebacks": 0,
}


def assert_served_cleanly(server: Server, database: WsgiDatabase, results: list[Result]) -> None:
    found = problems(server, database, results)
    assert found == CLEAN, f"{found}\n{server.log()[-3000:]}"


def tenant_plans(clients: int, per_client: int) -> list[list[str]]:
    """Client c is tenant ``t{c}`` for all its requests."""
    return [[f"/tenant/t{c}/c{c}r{i}" for i in range(per_client)] for c in range(clients)]


def assert_tenants_isolated(server: Server, database: WsgiDatabase, results: list[Result]) -> None:
    foreign = []
    unexpected = []
    for result in results:
        tenant = result.path.split("/")[2]
        if result.status != 200 or not isinstance(result.body, dict):
            unexpected.append(result)
        elif result.body.get("tenants") != [tenant]:
            foreign.append((result.path, result.body.get("tenants")))
    assert unexpected == [], f"{unexpected[:3]}\n{server.log()[-3000:]}"
    assert foreign == [], f"rows of another tenant returned: {foreign[:5]}"
    expected = Counter({(r.path.split("/")[2], request_id(r)): 1 for r in results})
    assert database.tenant_rows() == expected
    assert leaks(server) == []
    backends = database.settled_backends()
    assert backends["idle in transaction"] == 0, backends


def sqlalchemy_registry_problems(
    database: WsgiDatabase, tmp_path: Path, framework: str
) -> dict[str, Any]:
    """What the checks find with SQLAlchemy's ``scoped_session`` (and the hand-written wrapper)
    under gevent with ``--preload``: its ``threading.local`` is made before gevent patches the
    worker, so all the worker's greenlets share one session. Short timeouts: greenlets sharing
    one connection can hang a request."""
    with serve(
        database,
        tmp_path,
        framework=framework,
        worker="gevent",
        preload=True,
        registry="sqlalchemy",
    ) as server:
        paths = plan(240)
        plans = [paths[c::CLIENTS] for c in range(CLIENTS)]
        results = drive_clients(server.base_url, plans, deadline=4, timeout=2)
        return problems(server, database, results, settle=1)


def assert_data_went_wrong(found: dict[str, Any]) -> None:
    """The checks failed, and on the data: rows lost or foreign, or another request's state."""
    assert found != CLEAN
    wrong_data = (
        found["acknowledged rows missing"]
        or found["failed requests' rows committed"]
        or found["leaks"]
    )
    assert wrong_data, found


def assert_failed_commits_are_500s(server: Server, database: WsgiDatabase) -> None:
    """Commits that fail at COMMIT (a deferred constraint): a 500 each, nothing written, nothing
    left in a transaction. (The server logs each failure with its traceback.)"""
    results = drive(server.base_url, [f"/commitfail/c{i}" for i in range(20)], clients=5)
    assert [r.status for r in results] == [500] * 20, results[:3]
    with database.reader.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(UniqueRow)) == 0
    assert "UniqueViolation" in server.log()
    backends = database.settled_backends()
    assert backends["idle in transaction"] + backends["idle in transaction (aborted)"] == 0
