"""What the Litestar and Quart test applications share: configuration, registries, bodies, checks.

``tests/servers/litestar_app.py`` and ``tests/servers/quart_app.py`` route requests to the bodies
here, each in its framework's usual style, behind ``sessionscope.asgi.SessionScopeMiddleware``
(one per registry: a sync ``scoped_session`` and an ``async_scoped_session``). Configured by
environment variables:

    SS_DB_URL     the PostgreSQL URL (psycopg) with ``options=-csearch_path=<schema>`` and the
                  ``application_name`` the test finds the server's backends by; the async
                  engine (asyncpg) gets the same as its ``server_settings``
    SS_COMMIT     ``1``: ``SessionScopeMiddleware(commit=True)``, the endpoints never commit;
                  ``0``: ``commit=False``, the endpoints commit row 1 themselves, then flush row 4,
                  which nobody commits (the middleware rolls it back)

The paths (all POST), ``{req}`` the client's id of the request, ``mode`` ``def`` (a sync handler or
view in a worker thread, the sync registry) or ``async`` (the async registry):

- ``/{mode}/write/{req}``: row ``n=1``. Litestar's ``def`` variant adds a background task that
  writes ``n=2`` after the response and commits it itself.
- ``/{mode}/slow/{req}``: row 1 flushed, a sleep (other requests run meanwhile), then as write.
- ``/{mode}/read/{req}``: a query, no row.
- ``/{mode}/reject/{req}``: row 1 flushed, then :class:`Rejected`, which the framework's error
  handler answers ``409 {"rejected": req}``: never committed under either policy.
- append ``/fail``: row 1 flushed, then :class:`ExpectedFailure`, answered
  ``500 {"expected_failure": req}`` by the framework's error handler.

Successful requests answer ``{"req": req, "rows": [the row parts it committed]}``.

``/ws/{req}`` is a WebSocket with the async registry: each ``write`` message flushes a row
``n=10, 11, ...`` and answers the tag of the socket's session and the rows so far; ``bye`` ends it
(with ``commit=False`` the handler commits then); for a ``req`` ending in ``-fail``, ``bye``
raises :class:`ExpectedFailure` instead.

Whoever takes a session first in a request checks it is fresh (no ``info``, nothing pending, no
transaction, no objects), tags ``info`` with the request, and checks the tag again after awaiting
or sleeping; anything else is a *leak*, reported by ``/stats``. Lifespan: startup reads the
database through a ``scope()`` (no request around it) and sets ``started``; shutdown disposes the
engines and prints :data:`SHUTDOWN_LINE`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from sqlalchemy import create_engine, make_url, select, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import sessionscope
from sessionscope.asgi import SessionScopeMiddleware
from tests.servers.fastapi_app import ExpectedFailure
from tests.servers.fastapi_app import RequestRow as WrittenRow

SLOW = 0.02  # seconds between a slow request's flush and its end
SHUTDOWN_LINE = "sessionscope-test: lifespan shutdown complete"
LEFT_OVER = 4  # the row a commit=False request flushes after its own commit (never committed)
WS_FIRST_ROW = 10

__all__ = ["App", "ExpectedFailure", "WrittenRow"]


async def _async_sleep() -> None:
    await asyncio.sleep(SLOW)


class Rejected(Exception):
    """Raised by a body to make the route answer ``409 {"rejected": req}`` itself."""


class App:
    """One server's engines, registries, policy and what it saw (``/stats``)."""

    def __init__(self) -> None:
        url = make_url(os.environ["SS_DB_URL"])  # psycopg reads options and application_name
        schema = url.query["options"].removeprefix("-csearch_path=")  # type: ignore[union-attr]
        app_name = url.query["application_name"]
        self.commit = os.environ.get("SS_COMMIT", "1") == "1"
        self.engine = create_engine(url, pool_size=10, max_overflow=50, pool_timeout=20)
        self.async_engine = create_async_engine(
            url.set(drivername="postgresql+asyncpg", query={}),
            connect_args={"server_settings": {"search_path": schema, "application_name": app_name}},
            pool_size=10,
            max_overflow=50,
            pool_timeout=20,
        )
        self.Session: Any = sessionscope.scoped_session(sessionmaker(self.engine))
        self.AsyncSession: Any = sessionscope.async_scoped_session(
            async_sessionmaker(self.async_engine)
        )
        self.lock = threading.Lock()
        self.completed = 0
        self.leaks: list[str] = []
        self.started = False

    # -- the middleware, lifespan, /stats ------------------------------------------------------

    def wrap(self, app: Any) -> Any:
        """``app`` behind one ``SessionScopeMiddleware`` per registry."""
        inner = SessionScopeMiddleware(app, self.Session, commit=self.commit)
        return SessionScopeMiddleware(inner, self.AsyncSession, commit=self.commit)

    def counted(self, app: Any) -> Any:
        """The outermost layer: counts the HTTP requests whose ASGI call returned."""

        async def counting(scope: Any, receive: Any, send: Any) -> None:
            counts = scope["type"] == "http" and scope["path"] not in ("/stats", "/health")
            try:
                await app(scope, receive, send)
            finally:
                if counts:
                    self.count_completed()

        return counting

    async def startup(self) -> None:
        async with self.AsyncSession.scope() as session:  # no request: a scope of its own
            await session.execute(text("select 1"))
        self.started = True

    async def shutdown(self) -> None:
        self.engine.dispose()
        await self.async_engine.dispose()
        print(SHUTDOWN_LINE, flush=True)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "completed": self.completed,
                "checkedout": self.engine.pool.checkedout()  # type: ignore[attr-defined]
                + self.async_engine.pool.checkedout(),  # type: ignore[attr-defined]
                "leaks": list(self.leaks),
                "started": self.started,
                "commit": self.commit,
                "pid": os.getpid(),
            }

    # -- checks --------------------------------------------------------------------------------

    def count_completed(self) -> None:
        with self.lock:
            self.completed += 1

    def leak(self, what: str) -> None:
        with self.lock:
            self.leaks.append(what)

    def fresh(self, session: Any, req: str) -> Any:
        """``session``, checked to carry nothing of another request, then tagged with ``req``."""
        carried = {
            f"info {dict(session.info)}": bool(session.info),
            "objects of another request": bool(session.new) or len(session.identity_map) > 0,
            "a transaction open": session.in_transaction(),
        }
        for what in (what for what, found in carried.items() if found):
            self.leak(f"{req} found {what}")
        session.info["req"] = req
        return session

    def still_mine(self, registry: Any, session: Any, req: str) -> None:
        if registry() is not session or session.info.get("req") != req:
            self.leak(f"{req}'s session changed under it: {dict(session.info)}")

    # -- bodies --------------------------------------------------------------------------------

    def run_sync(self, action: str, req: str, *, fail: bool) -> list[int]:
        """A sync handler's work on the sync registry (in a worker thread); the rows committed."""
        db = self.fresh(self.Session(), req)
        for step in self._steps(db, self.Session, action, req, fail, lambda: time.sleep(SLOW)):
            step()
        return [] if action == "read" else [1]

    async def run_async(self, action: str, req: str, *, fail: bool) -> list[int]:
        """An async handler's work on the async registry; the rows committed."""
        db = self.fresh(self.AsyncSession(), req)
        for step in self._steps(db, self.AsyncSession, action, req, fail, _async_sleep):
            await step()
        return [] if action == "read" else [1]

    def _steps(
        self, db: Any, registry: Any, action: str, req: str, fail: bool, sleep: Callable[[], Any]
    ) -> Iterator[Callable[[], Any]]:
        """A request's database calls, written once: called by a sync handler, called and
        awaited by an async one (as ``sessionscope._scope`` ends its scopes)."""
        if action == "read":
            yield functools.partial(db.scalar, select(WrittenRow.id).limit(1))
            if not fail:
                return
        db.add(WrittenRow(req=req, n=1))
        if action == "slow" or fail or action == "reject":
            yield db.flush
        if action == "slow":
            yield sleep
            self.still_mine(registry, db, req)
        if fail:
            raise ExpectedFailure(req)
        if action == "reject":
            raise Rejected(req)
        if not self.commit:
            yield db.commit
            db.add(WrittenRow(req=req, n=LEFT_OVER))
            yield db.flush

    def background(self, req: str) -> None:
        """A sync background task after the response: the request's session, closed and clean."""
        session = self.Session()
        if session.in_transaction() or session.new:
            self.leak(f"{req}'s background task found its request's transaction open")
        session.add(WrittenRow(req=req, n=2))
        session.commit()

    async def websocket(
        self,
        req: str,
        receive_text: Callable[[], Awaitable[str]],
        send_text: Callable[[str], Awaitable[None]],
        *,
        savepoint: bool = False,
    ) -> None:
        """The socket's conversation: ``write`` flushes a row and answers the session's tag and
        the rows so far; ``bye`` commits (``commit=False``) and answers, or raises for a ``req``
        ending in ``-fail``. ``savepoint``: the conversation runs in a nested ``scope()`` (a
        SAVEPOINT of the socket's session, rolled back when it raises), for frameworks that
        answer a WebSocket handler's exception themselves and close the socket normally."""
        db = self.fresh(self.AsyncSession(), req)
        if savepoint:
            async with self.AsyncSession.scope():
                await self._converse(db, req, receive_text, send_text)
        else:
            await self._converse(db, req, receive_text, send_text)
        if not self.commit:
            await db.commit()
        await send_text(json.dumps({"bye": req}))

    async def _converse(
        self,
        db: Any,
        req: str,
        receive_text: Callable[[], Awaitable[str]],
        send_text: Callable[[str], Awaitable[None]],
    ) -> None:
        n = WS_FIRST_ROW
        while (message := await receive_text()) == "write":
            self.still_mine(self.AsyncSession, db, req)
            db.add(WrittenRow(req=req, n=n))
            await db.flush()
            n += 1
            await send_text(json.dumps({"req": db.info.get("req"), "rows": n - WS_FIRST_ROW}))
        if message != "bye" or req.endswith("-fail"):
            raise ExpectedFailure(req)
