"""A WSGI application served by gunicorn in the tests: plain WSGI or Flask, configured by env.

    SS_DB_URL      the database URL (PostgreSQL as the application's role, without BYPASSRLS;
                   ``options=-csearch_path=<schema>`` and an ``application_name``)
    SS_FRAMEWORK   ``wsgi``: a plain WSGI function wrapped in ``SessionScopeMiddleware``;
                   ``flask``: a Flask application with the ``SessionScope`` extension
    SS_REGISTRY    ``sessionscope`` (default), or ``sqlalchemy``: SQLAlchemy's ``scoped_session``
                   with the hand-written pair (commit below 400 else roll back, then ``remove()``)
                   that sessionscope's integrations replace

``create_app()`` is the factory (``gunicorn 'tests.servers.wsgi_app:create_app()'``); importing
the module connects nowhere. Both frameworks use ``commit=True``: the integration commits a
response below 400 and rolls back the others; endpoints never commit themselves.

Endpoints (POST, the request id in the path):

- ``/write/{id}``: add a row tagged ``id``; ``/slow/{id}``: add it, sleep, then return (another
  request runs on the worker in the middle); ``/read/{id}``: count rows, write nothing;
  ``/fail/{id}``: add and flush a row (it is in the database, uncommitted), then fail with
  ``500 {"expected_failure": id}``.
- ``/tenant/{tenant}/{id}``: ``SET LOCAL app.tenant``, add a row of that tenant to a table under
  row-level security, and return the tenants of every row the request could see.
- ``/commitfail/{id}``: add two rows breaking a deferred unique constraint: the integration's
  commit fails, and the response must be a 500.

The first touch of the session in a request checks it is fresh: no ``Session.info`` of another
request, nothing pending, nothing in the identity map, no transaction. Anything else is printed as
a ``LEAK:`` line (stdout is the server log, shared by all workers), which the tests look for.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import String, UniqueConstraint, create_engine, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session as sa_scoped_session

import sessionscope
from sessionscope.demo.web_app import by_hand

SLOW_SECONDS = 0.02


class Base(DeclarativeBase):
    pass


class WsgiRow(Base):
    """A row written by request ``req``."""

    __tablename__ = "wsgi_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    req: Mapped[str] = mapped_column(String(40), index=True)


class TenantRow(Base):
    """A row of ``tenant``; the table is under row-level security keyed by ``app.tenant``."""

    __tablename__ = "tenant_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40), index=True)
    req: Mapped[str] = mapped_column(String(40))


class UniqueRow(Base):
    """Its unique constraint is checked at COMMIT (deferred): a commit that fails."""

    __tablename__ = "unique_rows"
    __table_args__ = (UniqueConstraint("k", deferrable=True, initially="DEFERRED"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    k: Mapped[str] = mapped_column(String(40))


class ExpectedFailure(Exception):
    """A request failing on purpose, after flushing a row."""


def leak(message: str) -> None:
    print(f"LEAK: {message}", file=sys.stdout, flush=True)


def fresh(session: OrmSession, req: str) -> OrmSession:
    """Check ``session`` carries nothing of another request, then tag it with ``req``."""
    if session.info.get("req") not in (None, req):
        leak(f"{req} saw info of {session.info['req']}")
    if session.new:
        leak(f"{req} saw {len(session.new)} pending object(s)")
    if len(session.identity_map):
        leak(f"{req} saw {len(session.identity_map)} object(s) in the identity map")
    if session.in_transaction():
        leak(f"{req} found a transaction open")
    session.info["req"] = req
    return session


def handle(Session: Any, path: str) -> tuple[int, dict[str, Any]]:
    """One request's work on the registry: (status, JSON body). Raises ExpectedFailure."""
    parts = path.strip("/").split("/")
    kind, req = parts[0], parts[-1]
    session = fresh(Session(), req)
    if kind == "write":
        session.add(WsgiRow(req=req))
        return 200, {"req": req}
    if kind == "slow":
        session.add(WsgiRow(req=req))
        session.flush()
        time.sleep(SLOW_SECONDS)  # patched under gevent/eventlet: other requests run meanwhile
        if session.info.get("req") != req:
            leak(f"{req} after sleeping saw info of {session.info.get('req')}")
        return 200, {"req": req}
    if kind == "read":
        session.scalar(select(func.count()).select_from(WsgiRow))
        return 200, {"req": req}
    if kind == "fail":
        session.add(WsgiRow(req=req))
        session.flush()
        time.sleep(SLOW_SECONDS / 4)
        raise ExpectedFailure(req)
    if kind == "commitfail":  # flushes fine; the integration's commit fails
        session.add_all([UniqueRow(k=req), UniqueRow(k=req)])
        session.flush()
        return 200, {"req": req}
    if kind == "tenant":
        tenant = parts[1]
        session.execute(text("select set_config('app.tenant', :t, true)"), {"t": tenant})
        session.add(TenantRow(tenant=tenant, req=req))
        session.flush()
        time.sleep(SLOW_SECONDS / 4)
        seen = sorted(set(session.scalars(select(TenantRow.tenant))))
        return 200, {"req": req, "tenants": seen}
    return 404, {"error": "no such endpoint"}


def create_app() -> Callable[..., Iterable[bytes]]:
    """The WSGI application (the gunicorn factory)."""
    url = os.environ["SS_DB_URL"]
    framework = os.environ.get("SS_FRAMEWORK", "wsgi")
    registry = os.environ.get("SS_REGISTRY", "sessionscope")
    engine = create_engine(url, pool_size=5, max_overflow=60, pool_timeout=20)
    if registry == "sessionscope":
        Session: Any = sessionscope.scoped_session(sessionmaker(engine))
    else:
        Session = sa_scoped_session(sessionmaker(engine))
    if framework == "flask":
        return flask_app(Session, sessionscope_registry=registry == "sessionscope")
    return wsgi_app(Session, sessionscope_registry=registry == "sessionscope")


# -- plain WSGI ----------------------------------------------------------------------------------


def wsgi_app(Session: Any, *, sessionscope_registry: bool) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/health":
            status, body = 200, {"ok": True}
        else:
            try:
                status, body = handle(Session, path)
            except ExpectedFailure as failure:
                status, body = 500, {"expected_failure": str(failure)}
        payload = json.dumps(body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        start_response(f"{status} {'OK' if status < 400 else 'Error'}", headers)
        return [payload]

    if sessionscope_registry:
        from sessionscope.wsgi import SessionScopeMiddleware

        return SessionScopeMiddleware(app, Session, commit=True)
    return by_hand(app, Session)


# -- Flask ---------------------------------------------------------------------------------------


def flask_app(Session: Any, *, sessionscope_registry: bool) -> Any:
    from flask import Flask, jsonify, request

    api = Flask(__name__)
    if sessionscope_registry:
        from sessionscope.flask import SessionScope

        SessionScope(api, Session, commit=True)
    else:
        # the hand-written pair that the extension replaces
        @api.after_request
        def commit(response: Any) -> Any:
            if response.status_code < 400:
                Session.commit()
            return response

        @api.teardown_request
        def remove(exc: BaseException | None) -> None:
            Session.remove()

    @api.errorhandler(ExpectedFailure)
    def expected(failure: ExpectedFailure) -> Any:
        return jsonify({"expected_failure": str(failure)}), 500

    @api.get("/health")
    def health() -> Any:
        return {"ok": True}

    @api.post("/<path:path>")
    def endpoint(path: str) -> Any:
        status, body = handle(Session, request.path)
        return jsonify(body), status

    return api
