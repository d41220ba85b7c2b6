"""Applications behind ``sessionscope.asgi.SessionScopeMiddleware``, served by uvicorn in the tests.

Configured by environment variables:

    SS_PG_URL     the PostgreSQL URL (psycopg) with the user the application connects as: a role
                  without BYPASSRLS, so the tenants' row-level security applies to it
    SS_SCHEMA     the schema of the test's tables (search_path)
    SS_APP_NAME   the ``application_name`` of every connection, the test finds its backends by it
    SS_KIND       ``fastapi-sync``: FastAPI, ``sessionscope.scoped_session``, ``def`` and
                  ``async def`` endpoints; ``fastapi-async``: FastAPI, ``async_scoped_session``;
                  ``starlette``: a plain Starlette app, sync registry, blocking calls in
                  ``run_in_threadpool``

Every application has ``SessionScopeMiddleware(commit=True)`` and no endpoint commits: the
middleware commits below 400 and rolls back otherwise. The paths (all POST), ``{req}`` the
client's id of the request:

- ``/{mode}/write/{req}``: one row (``n=1``); FastAPI's ``def`` variant adds a background task
  that writes ``n=2`` after the response and commits it itself (the request's session is closed
  and clean by then).
- ``/{mode}/slow/{req}``: a row flushed, a sleep (other requests run meanwhile), committed.
- ``/{mode}/read/{req}``: a query, no row.
- ``/def/stream/{req}`` (``fastapi-sync``): row ``n=1`` written before the response (committed as
  it starts), then a streaming body whose generator flushes row ``n=3`` (never committed: the
  middleware rolls it back when the body ends, or when the client went away mid-stream).
- ``/def/conflict/{req}`` (``fastapi-sync``): a row whose id is taken, answered 200 by the
  endpoint; the middleware's commit fails before the response starts, so the server answers 500.
- ``/tenant/{mode}/{tenant}/{req}``: ``SET LOCAL app.tenant`` then read every ``tenant_rows`` row
  row-level security lets through; answers the tenants seen.
- ``/leaky/tenant/{tenant}/{req}`` (``fastapi-sync`` only): the same with SQLAlchemy's own
  ``scoped_session`` in an ``async def`` endpoint, the misuse: one session per *thread*, so every
  request on the event loop shares one session and one transaction.

``mode`` is ``def`` or ``async`` (FastAPI endpoints), ``async`` only for ``fastapi-async`` and
``starlette``. Append ``/fail`` for the failing variant: a row flushed, then
:class:`ExpectedFailure`, answered ``500 {"expected_failure": req}``. Successful requests answer
``{"req": req, "rows": [the row parts it wrote]}``.

Whoever takes the session first in a request checks it is fresh (no ``info``, nothing pending, no
transaction, no objects), tags ``info`` with the request, and checks the tag again after awaiting;
anything else is a *leak*, reported by ``/stats``.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations
import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import String, create_engine, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.orm import scoped_session as sa_scoped_session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

import sessionscope
import sessionscope.fastapi
from sessionscope.asgi import SessionScopeMiddleware
from tests.servers.fastapi_app import ExpectedFailure
from tests.servers.fastapi_app import RequestRow as WrittenRow


class Base(DeclarativeBase):
    pass


class TenantRow(Base):
    """A row of one tenant; row-level security shows a request only its tenant's rows."""

    __tablename__ = "tenant_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40))


SLOW = 0.02  # seconds between a slow request's flush and its end
STREAM_CHUNKS = 10  # chunks of /def/stream after its first, SLOW apart
CONFLICT_ID = -1  # the id of a row the test inserts: /def/conflict's commit fails on it


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.completed = 0
        self.leaks: list[str] = []

    def leak(self, what: str) -> None:
        with self.lock:
            self.leaks.append(what)


def create_app() -> Any:
    """The ASGI application (the uvicorn factory), as ``SS_KIND`` says."""
    kind = os.environ.get("SS_KIND", "fastapi-sync")
    schema = os.environ["SS_SCHEMA"]
    app_name = os.environ["SS_APP_NAME"]
    url = os.environ["SS_PG_URL"]
    stats = Stats()

    engine = create_engine(
        url,
        connect_args={"options": f"-csearch_path={schema}", "application_name": app_name},
        pool_size=10,
        max_overflow=50,
        pool_timeout=20,
    )
    sync_registry: Any = sessionscope.scoped_session(sessionmaker(engine))
    async_engine: Any = None
    if kind == "fastapi-async":
        async_engine = create_async_engine(
            url.replace("+psycopg", "+asyncpg"),
            connect_args={"server_settings": {"search_path": schema, "application_name": app_name}},
            pool_size=10,
            max_overflow=50,
            pool_timeout=20,
        )
        registry: Any = sessionscope.async_scoped_session(async_sessionmaker(async_engine))
    else:
        registry = sync_registry
    leaky = sa_scoped_session(sessionmaker(engine))  # SQLAlchemy's: one session per thread

    def fresh(session: Any, req: str) -> Any:
        if session.info:
            stats.leak(f"{req} saw info {dict(session.info)}")
        if session.new or len(session.identity_map):
            stats.leak(f"{req} saw objects of another request")
        if session.in_transaction():
            stats.leak(f"{req} found a transaction open")
        session.info["req"] = req
        return session

    def still_mine(session: Any, req: str) -> None:
        if registry() is not session or session.info.get("req") != req:
            stats.leak(f"{req}'s session changed under it: {dict(session.info)}")

    def set_tenant_sql() -> Any:
        return text("select set_config('app.tenant', :tenant, true)")

    def tenants_seen() -> Any:
        return select(TenantRow.tenant).distinct()

    # -- sync bodies (def endpoints, thread-pool jobs) -----------------------------------------

    def write_sync(db: Session, req: str, *, fail: bool, slow: bool = False) -> None:
        fresh(db, req).add(WrittenRow(req=req, n=1))
        if fail or slow:
            db.flush()
        if slow:
            time.sleep(SLOW)
            still_mine(db, req)
        if fail:
            raise ExpectedFailure(req)

    def read_sync(db: Session, req: str, *, fail: bool) -> None:
        fresh(db, req).execute(select(WrittenRow.id).limit(1)).all()
        if fail:
            db.add(WrittenRow(req=req, n=1))
            db.flush()
            raise ExpectedFailure(req)

    def tenant_sync(db: Session, tenant: str, req: str) -> list[str]:
        fresh(db, req).execute(set_tenant_sql(), {"tenant": tenant})
        time.sleep(0.002)
        return sorted(db.scalars(tenants_seen()).all())

    # -- async bodies (AsyncSession) -----------------------------------------------------------

    async def write_async(db: AsyncSession, req: str, *, fail: bool, slow: bool = False) -> None:
        fresh(db, req).add(WrittenRow(req=req, n=1))
        if fail or slow:
            await db.flush()
        if slow:
            await asyncio.sleep(SLOW)
            still_mine(db, req)
        if fail:
            raise ExpectedFailure(req)

    async def read_async(db: AsyncSession, req: str, *, fail: bool) -> None:
        (await fresh(db, req).execute(select(WrittenRow.id).limit(1))).all()
        if fail:
            db.add(WrittenRow(req=req, n=1))
            await db.flush()
            raise ExpectedFailure(req)

    async def tenant_async(db: AsyncSession, tenant: str, req: str) -> list[str]:
        await fresh(db, req).execute(set_tenant_sql(), {"tenant": tenant})
        await asyncio.sleep(0.002)
        return sorted((await db.scalars(tenants_seen())).all())

    def answer(req: str, rows: list[int]) -> dict[str, Any]:
        return {"req": req, "rows": rows}

    async def expected(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"expected_failure": str(exc)}, status_code=500)

    async def health(request: Any = None) -> Any:
        return JSONResponse({"ok": True})

    async def get_stats(request: Any = None) -> Any:
        with stats.lock:
            out = {
                "completed": stats.completed,
                "checkedout": engine.pool.checkedout(),  # type: ignore[attr-defined]
                "leaks": list(stats.leaks),
                "pid": os.getpid(),
            }
        if async_engine is not None:
            out["checkedout"] += async_engine.pool.checkedout()
        return JSONResponse(out)

    async def lifespan(app: Any) -> Any:
        yield
        engine.dispose()
        if async_engine is not None:
            await async_engine.dispose()

    if kind == "starlette":
        inner: Any = starlette_app(
            registry, write_sync, read_sync, tenant_sync, answer, expected, health, get_stats
        )
        inner.router.lifespan_context = contextlib.asynccontextmanager(lifespan)
    else:
        api = FastAPI(lifespan=lifespan)
        api.add_exception_handler(ExpectedFailure, expected)
        api.add_api_route("/health", health, methods=["GET"])
        api.add_api_route("/stats", get_stats, methods=["GET"])
        Db = Annotated[Any, Depends(sessionscope.fastapi.session(registry))]

        def fail_flag(request: Request) -> bool:
            return request.url.path.endswith("/fail")

        Fail = Annotated[bool, Depends(fail_flag)]

        if kind == "fastapi-sync":

            def background(req: str) -> None:
                session = registry()
                if session.in_transaction() or session.new:
                    stats.leak(f"{req}'s background task found its request's transaction open")
                session.add(WrittenRow(req=req, n=2))
                session.commit()

            @api.post("/def/write/{req}")
            @api.post("/def/write/{req}/fail")
            def def_write(req: str, db: Db, fail: Fail, tasks: BackgroundTasks) -> Any:
                write_sync(db, req, fail=fail)
                tasks.add_task(background, req)
                return answer(req, [1, 2])

            @api.post("/def/slow/{req}")
            @api.post("/def/slow/{req}/fail")
            def def_slow(req: str, db: Db, fail: Fail) -> Any:
                write_sync(db, req, fail=fail, slow=True)
                return answer(req, [1])

            @api.post("/def/read/{req}")
            @api.post("/def/read/{req}/fail")
            def def_read(req: str, db: Db, fail: Fail) -> Any:
                read_sync(db, req, fail=fail)
                return answer(req, [])

            @api.post("/def/conflict/{req}")
            def def_conflict(req: str, db: Db) -> Any:
                db.add(WrittenRow(id=CONFLICT_ID, req=req, n=1))  # the id is taken: commit fails
                return answer(req, [1])

            @api.post("/def/stream/{req}")
            def def_stream(req: str, db: Db) -> Any:
                write_sync(db, req, fail=False)  # row 1: committed as the response starts

                def body() -> Iterator[bytes]:  # iterated in thread-pool jobs of the request
                    yield b"first\n"
                    if registry() is not db or db.info.get("req") != req:
                        stats.leak(f"{req}'s stream lost its session")
                    db.add(WrittenRow(req=req, n=3))  # after the commit: never committed
                    db.flush()
                    for _ in range(STREAM_CHUNKS):
                        time.sleep(SLOW)
                        yield b"more\n"

                return StreamingResponse(body())

            @api.post("/tenant/def/{tenant}/{req}")
            def def_tenant(tenant: str, req: str, db: Db) -> Any:
                return {"req": req, "tenants": tenant_sync(db, tenant, req)}

            # async def endpoints with the sync registry: blocking calls on the loop, as the
            # tutorial's; still the request's own session
            @api.post("/async/write/{req}")
            @api.post("/async/write/{req}/fail")
            async def async_write(req: str, db: Db, fail: Fail) -> Any:
                write_sync(db, req, fail=fail)
                return answer(req, [1])

            @api.post("/leaky/tenant/{tenant}/{req}")
            async def leaky_tenant(tenant: str, req: str) -> Any:
                db = leaky()  # the loop thread's session: every request's
                try:
                    db.execute(set_tenant_sql(), {"tenant": tenant})
                    await asyncio.sleep(0.002)  # another request sets its tenant meanwhile
                    seen = sorted(db.scalars(tenants_seen()).all())
                    db.commit()
                except Exception:
                    db.rollback()
                    raise
                return {"req": req, "tenants": seen}

        else:

            @api.post("/async/write/{req}")
            @api.post("/async/write/{req}/fail")
            async def async_write(req: str, db: Db, fail: Fail) -> Any:
                await write_async(db, req, fail=fail)
                return answer(req, [1])

            @api.post("/async/slow/{req}")
            @api.post("/async/slow/{req}/fail")
            async def async_slow(req: str, db: Db, fail: Fail) -> Any:
                await write_async(db, req, fail=fail, slow=True)
                return answer(req, [1])

            @api.post("/async/read/{req}")
            @api.post("/async/read/{req}/fail")
            async def async_read(req: str, db: Db, fail: Fail) -> Any:
                await read_async(db, req, fail=fail)
                return answer(req, [])

            @api.post("/tenant/async/{tenant}/{req}")
            async def async_tenant(tenant: str, req: str, db: Db) -> Any:
                return {"req": req, "tenants": await tenant_async(db, tenant, req)}

        inner = api

    wrapped = SessionScopeMiddleware(inner, registry, commit=True)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await wrapped(scope, receive, send)
        finally:
            if scope["type"] == "http" and scope["path"] not in ("/stats", "/health"):
                with stats.lock:
                    stats.completed += 1

    return app


def starlette_app(
    registry: Any,
    write_sync: Any,
    read_sync: Any,
    tenant_sync: Any,
    answer: Any,
    expected: Any,
    health: Any,
    get_stats: Any,
) -> Any:
    """A plain Starlette app: async endpoints, the sync registry's work in ``run_in_threadpool``
    (thread-pool jobs of the request's unit of work, sharing its session)."""

    async def endpoint(request: Any) -> Any:
        action = request.path_params["action"]
        req = request.path_params["req"]
        fail = request.url.path.endswith("/fail")
        db = registry()  # the request's session: the same in the jobs below
        if action == "write":
            await run_in_threadpool(write_sync, db, req, fail=fail)
            return JSONResponse(answer(req, [1]))
        if action == "slow":
            await run_in_threadpool(write_sync, db, req, fail=fail, slow=True)
            return JSONResponse(answer(req, [1]))
        await run_in_threadpool(read_sync, db, req, fail=fail)
        return JSONResponse(answer(req, []))

    async def tenant(request: Any) -> Any:
        req = request.path_params["req"]
        seen = await run_in_threadpool(tenant_sync, registry(), request.path_params["tenant"], req)
        return JSONResponse({"req": req, "tenants": seen})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/stats", get_stats),
            Route("/async/{action}/{req}", endpoint, methods=["POST"]),
            Route("/async/{action}/{req}/fail", endpoint, methods=["POST"]),
            Route("/tenant/async/{tenant}/{req}", tenant, methods=["POST"]),
        ],
        exception_handlers={ExpectedFailure: expected},
    )
