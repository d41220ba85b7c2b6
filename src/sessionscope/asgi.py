"""ASGI middleware: every HTTP request and WebSocket is a unit of work with a session scope.

Pure ASGI (no ``BaseHTTPMiddleware``, which runs the app in another task and breaks streaming and
context variables), so it wraps Starlette, FastAPI, Litestar, Quart or any ASGI application::

    Session = sessionscope.scoped_session(sessionmaker(engine))   # or async_scoped_session
    app = SessionScopeMiddleware(app, Session, commit=True)

Why a middleware and not a dependency: the request is the unit of work, and only the outermost
layer sees all of it. FastAPI runs a request's sync dependencies, its ``def`` endpoint and its
background tasks as separate thread-pool jobs while the request's task waits; they share the
request's session only when the request was marked (``unit_of_work()``) *before* the first of them
ran. And only the ASGI layer sees the response status (the commit policy), the end of a streaming
body and the end of the background tasks (the session's lifetime).

The order of events in one HTTP request:

1. ``async with unit_of_work():`` and a ``Session.scope(commit=False)`` of the registry: inside,
   ``Session()`` and its proxies are the request's own session, in the request's task and in every
   thread-pool job it waits for.
2. ``http.response.start`` passes: with ``commit=True`` and a status below 400 the session commits
   *before* the message is forwarded, so a commit that fails raises into the application with no
   response sent yet (the server answers 500) instead of losing the write behind a 200.
3. The last ``http.response.body`` passes (the end of a streaming body too): the session is closed,
   which rolls back whatever was not committed and returns its connection. Background tasks, which
   Starlette runs after that, find a clean session (no transaction, no objects): a transaction of
   their own.
4. The application returns: with ``commit=True`` what the background tasks left uncommitted is
   committed (they did not fail). It raises: that is rolled back. Then the scope and the unit of
   work end (closing every session the request made, guarded sessionmakers' included), whatever
   happened: errors, client disconnects, cancellation.

Sync sessions (``scoped_session``) commit and close in a worker thread, a job of the request's unit
of work, never on the event loop; AsyncSessions (``async_scoped_session``) are awaited, their
closes in a task that cancellation cannot stop. Either way a request cancelled meanwhile (Quart
cancels its handler task, which sends the body, when the client disconnects) waits for the call to
finish before it goes on: the session is never closed halfway, nor twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import async_scoped_session as sa_async_scoped_session
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.orm import sessionmaker

from ._arguments import expect_flags, refuse
from ._async_scoping import async_scoped_session
from ._async_session_end import start_close
from ._scoping import scoped_session
from ._work import unit_of_work

__all__ = ["SCOPE_KEY", "SessionScopeMiddleware"]

log = logging.getLogger("sessionscope")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SCOPE_KEY = "sessionscope.registries"
"""Key of the ASGI scope under which the middleware lists the ids of the registries it scoped
(``sessionscope.fastapi`` checks it to tell a missing middleware from a present one)."""

_CALL = "SessionScopeMiddleware()"
_CLEAN_CLOSE = (1000, 1001)
"""WebSocket close codes that end a WebSocket cleanly (RFC 6455: normal closure, going away);
with ``commit=True`` a WebSocket the application closes with any other code is rolled back."""
_EXPECTED = "a sessionscope.scoped_session or sessionscope.async_scoped_session (the registry)"


def _expect_registry(value: object) -> None:
    """Refuse anything but one of sessionscope's registries, saying what to pass instead."""
    if isinstance(value, scoped_session | async_scoped_session):
        return
    if isinstance(value, sa_scoped_session | sa_async_scoped_session):
        fix = (
            "SQLAlchemy's own registry keys sessions by thread or by a scopefunc, not by request: "
            "use sessionscope.scoped_session / sessionscope.async_scoped_session, a drop-in."
        )
    elif isinstance(value, sessionmaker) or callable(value) and not isinstance(value, OrmSession):
        fix = "Wrap the session factory in a registry: `sessionscope.scoped_session(factory)`."
    else:
        fix = "Pass the registry (`Session = sessionscope.scoped_session(...)`), not a session."
    refuse(sa_exc.ArgumentError, _CALL, "session", value, _EXPECTED, fix)


class SessionScopeMiddleware:
    """Run each HTTP request and WebSocket in a unit of work with a scope of ``session``.

    :param app: the ASGI application to wrap.
    :param session: the registry, a ``sessionscope.scoped_session`` (sync sessions: their commit
     and close run in a worker thread) or ``sessionscope.async_scoped_session``.
    :param commit: ``True``: commit when the response starts with a status below 400 (before the
     start is sent: a failing commit becomes a 500); commit the background tasks' work (after the
     body) and a WebSocket's when the application returns without error (and did not close it
     with an error code: anything but 1000 or 1001). ``False`` (default):
     never commit; the application commits what it means to keep, and the rest is rolled back when
     the response body ends (and again when the application returns).

    Lifespan (and any other scope type) passes straight through.
    """

    def __init__(self, app: ASGIApp, session: Any, *, commit: bool = False) -> None:
        _expect_registry(session)
        if commit.__class__ is not bool:
            expect_flags(_CALL, commit=commit)
        self.app = app
        self.session = session
        self.commit = commit
        self._async = isinstance(session, async_scoped_session)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        # a copy, as the ASGI spec asks of middleware that changes the scope
        scope = {**scope, SCOPE_KEY: (*scope.get(SCOPE_KEY, ()), id(self.session))}
        async with unit_of_work():
            if self._async:
                async with self.session.scope(commit=False) as session:
                    await _Request(self, session, is_async=True).serve(scope, receive, send)
                return
            block = self.session.scope(commit=False)
            session = block.__enter__()
            request = _Request(self, session, is_async=False)
            try:
                await request.serve(scope, receive, send)
            except BaseException:
                exc_info = sys.exc_info()
                await request.close(quietly=True)
                try:
                    block.__exit__(*exc_info)  # the session is closed: no I/O on the loop
                except Exception:  # the application's error is the one to report
                    log.exception("sessionscope: ending a failed request's scope failed")
                raise
            await request.close(quietly=False)
            block.__exit__(None, None, None)


class _Request:
    """One request's session and where its response is (started, status, body ended)."""

    __slots__ = ("middleware", "session", "is_async", "status", "closed")

    def __init__(self, middleware: SessionScopeMiddleware, session: Any, *, is_async: bool):
        self.middleware = middleware
        self.session = session
        self.is_async = is_async
        self.status: int | None = None
        self.closed = False

    async def run(self, method: str) -> None:
        """Call ``session.<method>()``: awaited, or for a sync session in a worker thread."""
        if self.is_async:
            if method == "close":
                # in a task of its own that cancellation cannot stop, waited for through
                # cancellations: the body's last send may run in a task the framework cancels
                # as soon as the client is gone (Quart's handler task), and a close cut short
                # leaves the connection half closed (an overflow connection's close interrupted)
                await _wait_through_cancellation(start_close(self.session))
            else:
                await getattr(self.session, method)()
        elif method == "close" and not self.session.in_transaction():
            self.session.close()  # nothing to roll back, no connection: no I/O, no thread hop
        else:
            await _off_loop(getattr(self.session, method))

    async def close(self, *, quietly: bool) -> None:
        """Roll back what was not committed and return the connection (once per body end)."""
        try:
            await self.run("close")
        except Exception:
            if not quietly:
                raise
            log.exception("sessionscope: closing a request's session failed")

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        commit = self.middleware.commit

        async def send_through(message: Message) -> None:
            kind = message["type"]
            if kind == "websocket.http.response.start":  # a WebSocket denied with a response
                self.status = int(message["status"])
            elif kind == "websocket.close" and message.get("code", 1000) not in _CLEAN_CLOSE:
                # the framework answered a failure with an error close code (Litestar closes
                # with 4500 when a handler raises, and returns without an exception)
                self.status = 500
            elif kind == "http.response.start":
                self.status = int(message["status"])
                if commit and self.status < 400:
                    await self.run("commit")  # before the start: a failure is still a 500
                await send(message)
                return
            await send(message)
            ended = kind == "http.response.body" and not message.get("more_body", False)
            if ended and not self.closed:  # the body has ended: so has the request's transaction
                self.closed = True
                await self.close(quietly=False)

        await self.middleware.app(scope, receive, send_through)
        if not commit:
            return
        if scope["type"] == "websocket":
            if (self.status or 0) < 400:
                await self.run("commit")  # the application returned without error
        elif self.closed and self.session.in_transaction():
            # the work of the background tasks, which ran after the body and did not fail
            await self.run("commit")


async def _off_loop(call: Callable[[], object]) -> None:
    """Run a blocking session call in a worker thread, a job of the request's unit of work.

    The job runs in a copy of the request's context, so the guard sees the request's own work.
    Cancelled while the job runs, it still waits for the job to finish, then re-raises the
    cancellation: the job cannot be stopped, and the request's end must not close the session
    under it (that would be two threads in one session). anyio's cancel scopes (Starlette's
    streaming responses on a client disconnect) cancel again at every await until the scope is
    left, so the wait goes on through repeated cancellations.
    """
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    await _wait_through_cancellation(loop.run_in_executor(None, context.run, call))


async def _wait_through_cancellation(job: asyncio.Future[Any]) -> None:
    """Wait for ``job``; cancelled meanwhile, wait on until it is done, then re-raise."""
    try:
        await asyncio.shield(job)
    except asyncio.CancelledError:
        while not job.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([job])
        failure = None if job.cancelled() else job.exception()  # (retrieved: no warning)
        if failure is not None:
            log.debug("sessionscope: a cancelled request's session call failed", exc_info=failure)
        raise
