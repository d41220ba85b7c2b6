"""A FastAPI application served by uvicorn in the tests, configured by environment variables.

    SS_DB_URL     the database URL (PostgreSQL: ``options=-csearch_path=<schema>`` and an
                  ``application_name`` the test finds its backends by)
    SS_REGISTRY   ``sessionscope`` (default) or ``sqlalchemy``: whose ``scoped_session`` the
                  registry endpoints use, and whether the tutorial's sessionmaker is guarded
    SS_THREADS    the size of anyio's default thread pool (FastAPI's ``def`` endpoints and
                  dependencies), set at startup: 1 or 40
    SS_WRAP       ``1``: every HTTP request runs inside ``async with sessionscope.unit_of_work():``
                  (a pure ASGI wrapper); ``0``: unmarked

``create_app()`` is the factory (``uvicorn --factory tests.servers.fastapi_app:create_app``);
importing this module connects nowhere, so the tests import :data:`Base` to create the table.

Every request is given an id by the client, in the path. Write endpoints insert rows tagged with it
(``n`` says which part of the request wrote the row); failing endpoints flush a row and raise
:class:`ExpectedFailure`, answered ``500 {"expected_failure": id}``. Whoever touches a session
first in a request checks it is fresh: no transaction, nothing pending, no other request's id in
``Session.info``; anything else is recorded as a *leak* and reported by ``/stats``, as are the
``sessionscope`` errors (answered ``500 {"share_nothing": ...}`` with the message).

The families, each under its own path:

- ``/tutorial/def/{id}``, ``/tutorial/async/{id}``: FastAPI's tutorial dependency,
  ``def get_db(): db = SessionLocal(); try: yield db; finally: db.close()``, with
  ``SessionLocal = sessionscope.guard(sessionmaker(engine))``, used by a ``def`` and an
  ``async def`` endpoint that commit.
- ``/registry/{id}``: the registry used implicitly in a ``def`` dependency (adds row 0), the
  ``def`` endpoint (adds row 1 and commits both) and a sync background task (row 2, committed).
- ``/registry/plain/{id}``: the registry implicitly in a ``def`` endpoint only (row 1).
- ``/scope/{id}``: ``def get_db(): with Session.scope() as s: yield s`` in a sync dependency; the
  ``def`` endpoint adds row 1, the scope commits.

Append ``/fail`` to any of them for the failing variant.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name
# dependencies local to create_app()
import os
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import anyio.to_thread
from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session as sa_scoped_session

import sessionscope


class Base(DeclarativeBase):
    pass


class RequestRow(Base):
    """A row written by request ``req``; ``n`` is the part of the request that wrote it."""

    __tablename__ = "fastapi_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    req: Mapped[str] = mapped_column(String(40), index=True)
    n: Mapped[int]


class ExpectedFailure(Exception):
    """The failure of a request that fails on purpose, after flushing a row."""


class Stats:
    """What the application saw, for ``/stats`` (updated from pool threads and the loop)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.completed = 0  # HTTP requests whose ASGI call returned (boundary ended too)
        self.leaks: list[str] = []  # another request's state seen at the start of a request
        self.share_nothing: list[str] = []  # sessionscope errors raised in requests

    def add(self, field: str, value: str) -> None:
        with self.lock:
            getattr(self, field).append(value)


def create_app() -> Any:
    """The ASGI application (the uvicorn factory): FastAPI, wrapped as SS_WRAP says."""
    url = os.environ["SS_DB_URL"]
    registry_kind = os.environ.get("SS_REGISTRY", "sessionscope")
    threads = int(os.environ.get("SS_THREADS", "40"))
    wrap = os.environ.get("SS_WRAP", "1") == "1"

    engine = create_engine(url, pool_size=5, max_overflow=60, pool_timeout=20)
    SessionLocal = sessionmaker(engine)
    if registry_kind == "sessionscope":
        SessionLocal = sessionscope.guard(SessionLocal)
        Session: Any = sessionscope.scoped_session(sessionmaker(engine))
    else:
        Session = sa_scoped_session(sessionmaker(engine))
    stats = Stats()

    async def lifespan(app: Any) -> Any:
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield
        engine.dispose()

    api = FastAPI(lifespan=lifespan)

    def fresh(session: OrmSession, req: str) -> OrmSession:
        """Check ``session`` carries nothing of another request, then tag it with ``req``."""
        if session.info.get("req") not in (None, req):
            stats.add("leaks", f"{req} saw info of {session.info['req']}")
        if session.new:
            stats.add("leaks", f"{req} saw {len(session.new)} pending object(s)")
        if session.in_transaction():
            stats.add("leaks", f"{req} found a transaction open")
        session.info["req"] = req
        return session

    def write(session: OrmSession, req: str, n: int, *, fail: bool) -> None:
        session.add(RequestRow(req=req, n=n))
        if fail:
            session.flush()  # the row is in the database, in the request's transaction
            raise ExpectedFailure(req)

    @api.exception_handler(ExpectedFailure)
    async def expected(request: Request, exc: ExpectedFailure) -> JSONResponse:
        return JSONResponse({"expected_failure": str(exc)}, status_code=500)

    @api.exception_handler(sessionscope.ShareNothingError)
    async def share_nothing(request: Request, exc: Exception) -> JSONResponse:
        stats.add("share_nothing", f"{type(exc).__name__}: {exc}")
        return JSONResponse({"share_nothing": type(exc).__name__, "message": str(exc)}, 500)

    # -- the tutorial's get_db -----------------------------------------------------------------

    def get_db() -> Iterator[OrmSession]:
        db = SessionLocal()
        try:
            yield db
        finally:
            db.close()

    Db = Annotated[OrmSession, Depends(get_db)]

    @api.post("/tutorial/def/{req}")
    def tutorial_def(req: str, db: Db) -> dict[str, str]:
        write(fresh(db, req), req, 1, fail=False)
        db.commit()
        return {"req": req}

    @api.post("/tutorial/def/{req}/fail")
    def tutorial_def_fail(req: str, db: Db) -> None:
        write(fresh(db, req), req, 1, fail=True)

    @api.post("/tutorial/async/{req}")
    async def tutorial_async(req: str, db: Db) -> dict[str, str]:
        write(fresh(db, req), req, 1, fail=False)
        db.commit()
        return {"req": req}

    @api.post("/tutorial/async/{req}/fail")
    async def tutorial_async_fail(req: str, db: Db) -> None:
        write(fresh(db, req), req, 1, fail=True)

    # -- the registry, implicitly --------------------------------------------------------------

    def registry_dependency(req: str) -> str:
        fresh(Session(), req).add(RequestRow(req=req, n=0))  # pending until the endpoint commits
        return req

    Checked = Annotated[str, Depends(registry_dependency)]

    def background(req: str) -> None:
        if Session.info.get("req") != req:  # the request's own session, committed already
            stats.add("leaks", f"{req}'s background task saw info of {Session.info.get('req')}")
        Session.add(RequestRow(req=req, n=2))
        Session.commit()

    @api.post("/registry/{req}")
    def registry(req: str, tasks: BackgroundTasks, checked: Checked) -> dict[str, str]:
        if Session.info.get("req") != req:
            stats.add("leaks", f"{req}'s endpoint saw info of {Session.info.get('req')}")
        write(Session(), req, 1, fail=False)
        Session.commit()  # row 0 (the dependency's) and row 1
        tasks.add_task(background, req)
        return {"req": req}

    @api.post("/registry/{req}/fail")
    def registry_fail(req: str, checked: Checked) -> None:
        write(Session(), req, 1, fail=True)

    @api.post("/registry/plain/{req}")
    def registry_plain(req: str) -> dict[str, str]:
        write(fresh(Session(), req), req, 1, fail=False)
        Session.commit()
        return {"req": req}

    @api.post("/registry/plain/{req}/fail")
    def registry_plain_fail(req: str) -> None:
        write(fresh(Session(), req), req, 1, fail=True)

    # -- a scope in a sync dependency ----------------------------------------------------------

    def scope_db() -> Iterator[OrmSession]:
        with Session.scope() as session:
            yield session

    ScopeDb = Annotated[OrmSession, Depends(scope_db)]

    @api.post("/scope/{req}")
    def scope(req: str, db: ScopeDb) -> dict[str, str]:
        write(fresh(db, req), req, 1, fail=False)  # committed by the scope, as the request ends
        return {"req": req}

    @api.post("/scope/{req}/fail")
    def scope_fail(req: str, db: ScopeDb) -> None:
        write(fresh(db, req), req, 1, fail=True)

    # -- health and facts ----------------------------------------------------------------------

    @api.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @api.get("/stats")
    async def get_stats() -> dict[str, Any]:
        with stats.lock:
            return {
                "completed": stats.completed,
                "checkedout": engine.pool.checkedout(),  # type: ignore[attr-defined]
                "leaks": list(stats.leaks),
                "share_nothing": list(stats.share_nothing),
                "threads": anyio.to_thread.current_default_thread_limiter().total_tokens,
            }

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # lifespan: straight through
            await api(scope, receive, send)
            return
        try:
            if wrap:
                async with sessionscope.unit_of_work():
                    await api(scope, receive, send)
            else:
                await api(scope, receive, send)
        finally:
            if scope["path"] not in ("/stats", "/health"):
                with stats.lock:
                    stats.completed += 1

    return app
