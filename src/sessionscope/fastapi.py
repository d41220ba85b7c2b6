"""FastAPI: the request's session by type, ``Depends(sessionscope.fastapi.session(Session))``.

The session's lifetime belongs to :class:`sessionscope.asgi.SessionScopeMiddleware` (the request's
unit of work, its commit policy, its end after a streaming body); the dependency only hands the
endpoint the request's session, by type::

    Session = sessionscope.scoped_session(sessionmaker(engine))
    app = FastAPI()
    app.add_middleware(SessionScopeMiddleware, session=Session, commit=True)

    @app.post("/items")
    def create(db: OrmSession = Depends(sessionscope.fastapi.session(Session))): ...

It is the same object as ``Session()`` anywhere in the request: ``def`` and ``async def``
endpoints and dependencies, sync background tasks (thread-pool jobs of the request) and async ones.
The dependency has no ``yield``, so FastAPI's dependency scopes (``Depends(scope="function")``)
change nothing: the session ends with the response, not with the dependency.

Without the middleware the dependency fails with a message saying to add it, rather than opening
a unit of work itself. A dependency runs too late and sees too little to be the boundary: sync
dependencies resolved before it already ran as jobs of their own (each its own unit of work, so
their sessions would be refused in the endpoint), it cannot see the response status (commit
policy) or the end of a streaming body, and its exit runs before or after the response depending
on the FastAPI version and the dependency's scope. A half-marked request would fail later and
elsewhere; a missing middleware fails at once, with the fix.

``fastapi`` is imported only when :func:`session` is called; the core never imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc as sa_exc

from .asgi import SCOPE_KEY, _expect_registry

__all__ = ["session"]


def session(registry: Any) -> Callable[..., Any]:
    """A FastAPI dependency giving the request's session of ``registry``.

    ``registry`` is a ``sessionscope.scoped_session`` (a ``Session``) or an
    ``async_scoped_session`` (an ``AsyncSession``), the one given to ``SessionScopeMiddleware``.
    The dependency is an ``async def`` with no ``yield``: it costs no thread-pool job, and the
    session it returns is the one the middleware scoped for the request.
    """
    _expect_registry_for_dependency(registry)
    from starlette.requests import HTTPConnection  # (fastapi depends on starlette)

    wanted = id(registry)
    name = getattr(registry, "__name__", None) or "Session"

    async def request_session(connection: HTTPConnection) -> Any:
        if wanted not in connection.scope.get(SCOPE_KEY, ()):
            raise sa_exc.InvalidRequestError(
                "sessionscope.fastapi.session(): no SessionScopeMiddleware for this registry "
                f"around this request. Add it: `app.add_middleware(SessionScopeMiddleware, "
                f"session={name})` (from sessionscope.asgi): it makes the request one unit of "
                "work, whose thread-pool jobs share its session, and ends the session after the "
                "response. See docs/integrations/fastapi.md."
            )
        return registry()

    # FastAPI reads the parameter's annotation; with postponed annotations it would look the name
    # up in this module's globals, where HTTPConnection is not (it is imported lazily)
    request_session.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "connection", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=HTTPConnection
            )
        ]
    )
    request_session.__qualname__ = request_session.__name__ = f"session_of_{name}"
    return request_session


def _expect_registry_for_dependency(registry: object) -> None:
    try:
        _expect_registry(registry)
    except sa_exc.ArgumentError as error:
        raise sa_exc.ArgumentError(
            str(error).replace("SessionScopeMiddleware()", "sessionscope.fastapi.session()", 1)
        ) from None
