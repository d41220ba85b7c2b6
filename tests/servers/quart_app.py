"""A Quart application behind ``SessionScopeMiddleware``, served by uvicorn in the tests.

``uvicorn --factory tests.servers.quart_app:create_app``; the paths, the environment and the checks
are those of :mod:`tests.servers.framework_app`. Quart's usual style: ``async def`` views on the
async registry, plain ``def`` views (Quart runs them in a worker thread, in a copy of the request's
context) on the sync registry, ``@app.errorhandler`` for the failures, ``before_serving`` /
``after_serving`` for the lifespan, and the middleware wrapped around ``app.asgi_app`` as Quart's
documentation says for ASGI middleware (one per registry).

Quart answers an exception of a WebSocket handler itself, after the socket was accepted: it logs
it and closes the socket with 1000, a normal closure, so nothing outside Quart can tell the socket
failed, and ``commit=True`` would commit its flushed work. The socket's handler works in a nested
``scope()`` (a SAVEPOINT, rolled back when the block raises), the documented recipe
(docs/integrations/asgi.md, Quart).
"""

from __future__ import annotations

from typing import Any

from quart import Quart, request, websocket

from tests.servers.framework_app import App, ExpectedFailure, Rejected

ACTIONS = ("write", "slow", "read", "reject")


def create_app() -> Any:
    """The ASGI application (the uvicorn factory)."""
    state = App()
    app = Quart(__name__)

    def answer(req: str, rows: list[int]) -> dict[str, Any]:
        return {"req": req, "rows": rows}

    @app.post("/def/<action>/<req>")
    @app.post("/def/<action>/<req>/fail", endpoint="def_fail")
    def def_view(action: str, req: str) -> Any:  # a worker thread of the request's unit of work
        if action not in ACTIONS:
            return {"unknown": action}, 404
        return answer(req, state.run_sync(action, req, fail=request.path.endswith("/fail")))

    @app.post("/async/<action>/<req>")
    @app.post("/async/<action>/<req>/fail", endpoint="async_fail")
    async def async_view(action: str, req: str) -> Any:
        if action not in ACTIONS:
            return {"unknown": action}, 404
        fail = request.path.endswith("/fail")
        return answer(req, await state.run_async(action, req, fail=fail))

    @app.websocket("/ws/<req>")
    async def socket(req: str) -> None:
        await websocket.accept()
        # Quart answers the handler's exception itself and closes with 1000: the savepoint
        await state.websocket(req, websocket.receive, websocket.send, savepoint=True)

    @app.get("/health")
    async def health() -> Any:
        return {"ok": True}

    @app.get("/stats")
    async def stats() -> Any:
        return state.stats()

    @app.errorhandler(ExpectedFailure)
    async def expected(exc: ExpectedFailure) -> Any:
        return {"expected_failure": str(exc)}, 500

    @app.errorhandler(Rejected)
    async def rejected(exc: Rejected) -> Any:
        return {"rejected": str(exc)}, 409

    app.before_serving(state.startup)
    app.after_serving(state.shutdown)

    app.asgi_app = state.wrap(app.asgi_app)  # type: ignore[method-assign]
    return state.counted(app)
