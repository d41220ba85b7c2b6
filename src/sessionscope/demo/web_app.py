"""The web application of the demo's web section, served by gunicorn (WSGI) or uvicorn (ASGI).

One application, two variants, chosen by environment variables when the server builds it:

    SESSIONSCOPE_DEMO_URL        the database URL (the demo's table must exist)
    SESSIONSCOPE_DEMO_REGISTRY   ``sqlalchemy``: SQLAlchemy's ``scoped_session`` with the wrapper
                                 people write by hand (commit below 400, else roll back, then
                                 ``Session.remove()``); ``sessionscope``: its ``scoped_session``
                                 behind ``sessionscope.wsgi`` / ``sessionscope.asgi``'s
                                 ``SessionScopeMiddleware(commit=True)``

``create_wsgi_app()`` is gunicorn's factory, ``create_asgi_app`` uvicorn's (``--factory``).
Importing this module connects nowhere.

Endpoints (POST; ``{req}`` is the client's id of the request, stored as the row's ``owner``):

- ``/write/{req}``: add a row; the wrapper commits when the response is 200.
- ``/slow/{req}``: add a row, wait (other requests run on the worker meanwhile), then return.
- ``/fail/{req}``: add a row, wait, then answer ``500`` (the payment was declined): the wrapper
  rolls back, and the row must never be committed.

No endpoint flushes before its wait, so no request holds a write transaction while another runs:
that keeps SQLite usable under concurrent greenlets and tasks (a writer waiting for SQLite's lock
blocks its whole worker, so one holding it across a wait would stall everyone). The damage the
demo measures is done in the Session, not in the database.

Every answer says how many objects of *other* requests the request found in its Session (pending
or in the identity map), when it started and after its wait: ``{"req": ..., "foreign": n}``.
Nothing else is reported by the server; the demo measures the rest from the responses and from
the table.

The handler is written once, as a generator (each ``yield`` is a wait), as the demo's workload is:
the WSGI app waits with ``time.sleep`` (gevent's, once the worker has monkey-patched), the ASGI app
with ``await asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm import scoped_session as sa_scoped_session

import sessionscope

from .workload import DemoRow

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

URL_VARIABLE = "SESSIONSCOPE_DEMO_URL"
REGISTRY_VARIABLE = "SESSIONSCOPE_DEMO_REGISTRY"
SQLALCHEMY, SESSIONSCOPE = "sqlalchemy", "sessionscope"

WAIT_SECONDS = 0.02
"""A slow or failing request's wait (a payment service): long enough for others to run."""

KINDS = ("write", "slow", "fail")

Answer = tuple[int, dict[str, Any]]
HEALTHY: dict[str, Any] = {"ok": True}
NOT_FOUND: dict[str, Any] = {"error": "no such endpoint"}
Handler = Generator[None, None, Answer]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def handle(Session: Any, kind: str, req: str) -> Handler:
    """One request's work on the registry ``Session``; yields where it waits; returns its answer.

    ``Session()`` is called again after the wait, as any code calling the registry's proxies
    would: with a registry shared between requests, it may by then be another Session.
    """
    mine = DemoRow(owner=req, n=0)
    foreign = foreign_objects(Session(), mine)
    Session.add(mine)
    if kind in ("slow", "fail"):
        yield  # waiting for the payment service
        foreign = max(foreign, foreign_objects(Session(), mine))
    if kind == "fail":
        return 500, {"expected_failure": req, "foreign": foreign}
    return 200, {"req": req, "foreign": foreign}


def foreign_objects(session: Session, mine: object) -> int:
    """Objects in ``session`` that this request did not add: another request's, pending or loaded.

    Read without touching the database (``new`` and the identity map), so checking changes nothing.
    """
    return sum(1 for obj in session.new if obj is not mine) + sum(
        1 for obj in session.identity_map.values() if obj is not mine
    )


def dispatch(Session: Any, path: str) -> Answer | Handler:
    """The answer to ``path`` when no database work is needed, else the handler to run (each
    server runs it with its own way of waiting)."""
    if path == "/health":
        return 200, HEALTHY
    parts = path.strip("/").split("/")
    if len(parts) == 2 and parts[0] in KINDS and parts[1]:
        return handle(Session, parts[0], parts[1])
    return 404, NOT_FOUND


class Waits:
    """Iterating runs the handler one wait at a time; :attr:`answer` is its answer once done."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.answer: Answer = (500, {"error": "the handler did not finish"})

    def __iter__(self) -> Iterator[None]:
        self.answer = yield from self.handler


def make_engine(url: str) -> Engine:
    """A pool big enough that no request waits for a connection.

    SQLite: any thread may use a connection (the ASGI middleware commits in a worker thread), a
    writer waits up to 30 s for the lock, and the file is in WAL mode without a sync per commit.
    In the default journal mode concurrent commits hold the lock long enough that SQLite's
    busy-wait (sleeps of up to 100 ms, first come not first served) left a request waiting 1.5 s
    in 1,200; with WAL a commit holds it for microseconds.
    """
    if not url.startswith("sqlite"):
        return create_engine(url, pool_size=5, max_overflow=60, pool_timeout=20)
    engine = create_engine(
        url,
        pool_size=5,
        max_overflow=60,
        pool_timeout=20,
        connect_args={"check_same_thread": False, "timeout": 30},
    )

    @event.listens_for(engine, "connect")
    def wal(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def _configured() -> tuple[Engine, Any, bool]:
    """(engine, registry, is sessionscope's) from the environment."""
    engine = make_engine(os.environ[URL_VARIABLE])
    kind = os.environ.get(REGISTRY_VARIABLE, SESSIONSCOPE)
    if kind == SESSIONSCOPE:
        return engine, sessionscope.scoped_session(sessionmaker(engine)), True
    if kind == SQLALCHEMY:
        return engine, sa_scoped_session(sessionmaker(engine)), False  # noqa: SS101 (on purpose)
    raise ValueError(f"{REGISTRY_VARIABLE}={kind!r}: expected {SESSIONSCOPE} or {SQLALCHEMY}")


def _json(status: int, body: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    payload = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    return f"{status} {'OK' if status < 400 else 'Error'}", headers, payload


# -- WSGI (gunicorn) -----------------------------------------------------------------------------


def create_wsgi_app() -> WSGIApplication:
    """gunicorn's factory: ``gunicorn 'sessionscope.demo.web_app:create_wsgi_app()'``."""
    _engine, Session, is_sessionscope = _configured()

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        work = dispatch(Session, environ.get("PATH_INFO", "/"))
        status, body = work if isinstance(work, tuple) else run_blocking(work)
        status_line, headers, payload = _json(status, body)
        start_response(status_line, headers)
        return [payload]

    if is_sessionscope:
        from sessionscope.wsgi import SessionScopeMiddleware

        return SessionScopeMiddleware(app, Session, commit=True)
    return by_hand(app, Session)


def run_blocking(handler: Handler) -> Answer:
    """Run ``handler``, waiting with ``time.sleep`` (looked up per call: gevent's once patched)."""
    waits = Waits(handler)
    for _ in waits:
        time.sleep(WAIT_SECONDS)
    return waits.answer


def by_hand(app: WSGIApplication, Session: Any) -> WSGIApplication:
    """The usual hand-written wrapper around SQLAlchemy's registry: commit below 400, else roll
    back, and ``remove()`` when the request is done. What ``SessionScopeMiddleware`` replaces."""

    def wrapped(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        def commit_first(status: str, headers: Any, exc_info: Any = None) -> Any:
            if int(status[:3]) < 400:
                Session.commit()
            else:
                Session.rollback()
            return start_response(status, headers, exc_info)

        try:
            return list(app(environ, commit_first))
        finally:
            Session.remove()

    return wrapped


# -- ASGI (uvicorn) ------------------------------------------------------------------------------


def create_asgi_app() -> ASGIApp:
    """uvicorn's factory: ``uvicorn --factory sessionscope.demo.web_app:create_asgi_app``.

    ``async def`` endpoints calling a sync ``Session`` on the event loop, as many applications do;
    with SQLAlchemy's thread-local registry every request on the loop gets the loop thread's one
    Session.
    """
    engine, Session, is_sessionscope = _configured()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send, engine)
            return
        work = dispatch(Session, scope["path"])
        status, body = work if isinstance(work, tuple) else await run_async(work)
        _status_line, headers, payload = _json(status, body)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    if is_sessionscope:
        from sessionscope.asgi import SessionScopeMiddleware

        return SessionScopeMiddleware(app, Session, commit=True)
    return asgi_by_hand(app, Session)


async def run_async(handler: Handler) -> Answer:
    """Run ``handler``, waiting with ``await asyncio.sleep``: other requests run meanwhile."""
    waits = Waits(handler)
    for _ in waits:
        await asyncio.sleep(WAIT_SECONDS)
    return waits.answer


async def lifespan(receive: Receive, send: Send, engine: Engine) -> None:
    """Startup: nothing to do. Shutdown: return the pool's connections."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            engine.dispose()
            await send({"type": "lifespan.shutdown.complete"})
            return


def asgi_by_hand(app: ASGIApp, Session: Any) -> ASGIApp:
    """The hand-written ASGI wrapper around SQLAlchemy's registry: commit as a response below 400
    starts, else roll back, and ``remove()`` when the request is done."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_through(message: Message) -> None:
            if message["type"] == "http.response.start":
                if int(message["status"]) < 400:
                    Session.commit()
                else:
                    Session.rollback()
            await send(message)

        try:
            await app(scope, receive, send_through)
        finally:
            Session.remove()

    return wrapped
