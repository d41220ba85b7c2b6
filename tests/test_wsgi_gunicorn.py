"""Plain WSGI with ``SessionScopeMiddleware`` under gunicorn, under load, on PostgreSQL.

``tests/servers/wsgi_app.py`` (a WSGI function, wrapped with ``commit=True``) in a gunicorn
subprocess gets requests from 30 keep-alive clients at once: writes, reads, slow writes (a sleep
between the add and the commit, so another request runs on the worker meanwhile) and failures (a
row flushed, then a 500). gthread threads and gevent greenlets serve request after request, so
only the middleware tells one request from the next. Checks:

- no unexpected response: 200 for the others, the failing endpoint's own 500;
- every acknowledged write committed exactly once; no row of a failed request or of a read;
- no request saw another's ``Session.info``, pending objects, identity map or transaction;
- no ``idle in transaction`` backend of the server after the load (by ``application_name``);
- with row-level security keyed by ``SET LOCAL app.tenant`` (one tenant per client, the server's
  role without BYPASSRLS, the policy forced): no request ever sees a row of another tenant.

SQLAlchemy's own ``scoped_session`` with the usual hand-written wrapper, in the same application
under gevent with ``--preload``, fails the same checks.

Unmarked: gthread and gevent ``--preload`` (1,000 requests), the tenant check and SQLAlchemy's
failure. ``slow``: every worker class (``sync``, ``gthread``, ``gevent``, ``eventlet``), with and
without ``--preload``, 2,000 requests each. gunicorn 23.0 removed the ``eventlet`` worker: those
cases run a gunicorn < 23 installed apart (see ``tests/servers/wsgi_checks.py``) or skip; eventlet
with ``--preload`` is an expected failure (SQLAlchemy's pool locks predate the patch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.gunicorn_process import drive_clients
from tests.servers.process import drive
from tests.servers.wsgi_checks import (
    CLIENTS,
    WsgiDatabase,
    assert_data_went_wrong,
    assert_failed_commits_are_500s,
    assert_served_cleanly,
    assert_tenants_isolated,
    mark_known_failures,
    plan,
    serve,
    sqlalchemy_registry_problems,
    tenant_plans,
    wsgi_database,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def database(pg_schema: str) -> Iterator[WsgiDatabase]:
    yield from wsgi_database(pg_schema)


@pytest.mark.parametrize(
    ("worker", "preload"), [("gthread", False), ("gevent", True)], ids=["gthread", "gevent-preload"]
)
def test_each_request_commits_exactly_its_rows_and_leaves_nothing_behind(
    worker: str, preload: bool, database: WsgiDatabase, tmp_path: Path
) -> None:
    with serve(database, tmp_path, framework="wsgi", worker=worker, preload=preload) as server:
        results = drive(server.base_url, plan(1000), clients=CLIENTS)
        assert_served_cleanly(server, database, results)
        assert_failed_commits_are_500s(server, database)


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["", "preload"])
@pytest.mark.parametrize("worker", ["sync", "gthread", "gevent", "eventlet"])
def test_every_worker_class_under_2000_requests(
    worker: str,
    preload: bool,
    database: WsgiDatabase,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    mark_known_failures(request, worker, preload)
    with serve(database, tmp_path, framework="wsgi", worker=worker, preload=preload) as server:
        results = drive(server.base_url, plan(2000), clients=CLIENTS)
        assert_served_cleanly(server, database, results)


@pytest.mark.parametrize(
    "worker",
    ["gevent", pytest.param("gthread", marks=pytest.mark.slow)],
)
def test_row_level_security_never_returns_another_tenants_rows(
    worker: str, database: WsgiDatabase, tmp_path: Path
) -> None:
    with serve(database, tmp_path, framework="wsgi", worker=worker, preload=True) as server:
        results = drive_clients(server.base_url, tenant_plans(CLIENTS, 20))
        assert_tenants_isolated(server, database, results)


def test_sqlalchemy_scoped_session_in_the_same_app_fails_the_checks_under_gevent(
    database: WsgiDatabase, tmp_path: Path
) -> None:
    """With ``--preload`` the registry's ``threading.local`` is made before gevent patches the
    worker: one session for all the worker's greenlets. A request's commit or rollback takes the
    others' rows with it, and requests see each other's ``Session.info`` and objects."""
    assert_data_went_wrong(sqlalchemy_registry_problems(database, tmp_path, "wsgi"))
