"""A Litestar application behind ``SessionScopeMiddleware``, served by uvicorn in the tests.

``uvicorn --factory tests.servers.litestar_app:create_app``; the paths, the environment and the
checks are those of :mod:`tests.servers.framework_app`. Litestar's usual style: route handler
functions, ``sync_to_thread=True`` for the sync ones (the sync registry, in a worker thread of the
request's unit of work), the sessions handed in by Litestar's own dependency injection
(``Provide``), the middleware added with ``middleware=[DefineMiddleware(...)]`` (one per registry),
exception handlers for the failures, and a ``BackgroundTask`` on a response.
"""

# no `from __future__ import annotations`: Litestar reads the handlers' annotations
import os
from typing import Any

from litestar import Litestar, Request, Response, WebSocket, get, post, websocket
from litestar.background_tasks import BackgroundTask
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from sessionscope.asgi import SessionScopeMiddleware
from tests.servers.framework_app import App, ExpectedFailure, Rejected

ACTIONS = ("write", "slow", "read", "reject")


def create_app() -> Any:
    """The ASGI application (the uvicorn factory)."""
    state = App()

    def provide_db() -> Session:
        return state.Session()  # type: ignore[no-any-return]

    async def provide_async_db() -> AsyncSession:
        return state.AsyncSession()  # type: ignore[no-any-return]

    def answer(
        req: str, rows: list[int], background: BackgroundTask | None = None
    ) -> Response[Any]:
        return Response({"req": req, "rows": rows}, status_code=200, background=background)

    # one path per handler: Litestar 2 (up to 2.25 at least) calls a sync_to_thread handler
    # registered on a list of paths without awaiting it ("coroutine 'sync_to_thread' was never
    # awaited"), with or without any middleware
    def sync_route(suffix: str) -> Any:
        @post(
            f"/def/{{action:str}}/{{req:str}}{suffix}",
            sync_to_thread=True,
            dependencies={"db": Provide(provide_db, sync_to_thread=False)},
        )
        def sync_handler(action: str, req: str, db: Session) -> Response[Any]:
            if action not in ACTIONS:
                return Response({"unknown": action}, status_code=404)
            if db is not state.Session():
                state.leak(f"{req}: the injected session is not the registry's")
            rows = state.run_sync(action, req, fail=bool(suffix))
            if action == "write":  # row 2: a background task's own, after the response
                return answer(req, [*rows, 2], BackgroundTask(state.background, req))
            return answer(req, rows)

        return sync_handler

    def async_route(suffix: str) -> Any:
        @post(
            f"/async/{{action:str}}/{{req:str}}{suffix}",
            dependencies={"db": Provide(provide_async_db)},
        )
        async def async_handler(action: str, req: str, db: AsyncSession) -> Response[Any]:
            if action not in ACTIONS:
                return Response({"unknown": action}, status_code=404)
            if db is not state.AsyncSession():
                state.leak(f"{req}: the injected session is not the registry's")
            return answer(req, await state.run_async(action, req, fail=bool(suffix)))

        return async_handler

    @websocket("/ws/{req:str}")
    async def socket(req: str, socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        await state.websocket(req, socket.receive_text, socket.send_text)
        await socket.close()

    @get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @get("/stats")
    async def stats() -> dict[str, Any]:
        return state.stats()

    def expected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        return Response({"expected_failure": str(exc)}, status_code=500)

    def rejected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        return Response({"rejected": str(exc)}, status_code=409)

    app = Litestar(
        route_handlers=[
            *(make(suffix) for make in (sync_route, async_route) for suffix in ("", "/fail")),
            socket,
            health,
            stats,
        ],
        middleware=[
            DefineMiddleware(
                SessionScopeMiddleware, session=state.AsyncSession, commit=state.commit
            ),
            DefineMiddleware(SessionScopeMiddleware, session=state.Session, commit=state.commit),
        ],
        exception_handlers={ExpectedFailure: expected, Rejected: rejected},
        on_startup=[state.startup],
        on_shutdown=[state.shutdown],
        debug=os.environ.get("SS_DEBUG") == "1",  # tracebacks in the log, for a failing test
    )
    return state.counted(app)
