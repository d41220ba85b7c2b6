"""WSGI: one unit of work and one session scope per request, until the response is done.

WSGI servers reuse threads (gunicorn ``gthread``, waitress, mod_wsgi) and greenlets (gunicorn
``gevent``/``eventlet``: a keep-alive connection's greenlet serves request after request), so the
thread or greenlet is not the request. :class:`SessionScopeMiddleware` marks the request:

- The request runs in a copy of the server's context, inside ``sessionscope.unit_of_work()`` and a
  ``session.scope()``: ``Session()`` and its proxies are the request's own session wherever the
  application calls them, and nothing of the request is left in the server's thread or greenlet.
- The request ends when the server is done with the response: when the body iterable is
  exhausted and closed (PEP 3333 makes ``close()`` the server's duty, also on errors), not when
  the application returns. A streaming body keeps its session while it is produced; a body
  that is a built list or tuple (most responses) runs no code that could use it, so the request
  ends as the application returns it and the connection is back in the pool before the response
  goes out. Every path
  that stops early (the application raising before or after ``start_response``, the body raising,
  a client gone mid-stream) ends it too: uncommitted work is rolled back and the connection goes
  back to the pool.
- ``commit=True`` commits in the ``start_response`` it passes to the application, when the status
  is below 400: the commit happens before the status line can go out, so a commit that fails
  raises out of ``start_response`` (and out of the application) and the server answers 500,
  instead of a 200 for a write that was lost. The exception reaches the server and any error
  middleware around this one, as any exception of the application does.
"""

from __future__ import annotations

import contextvars
import sys
import weakref
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ._arguments import expect_flags, refuse
from ._expect_registry import expect_registry
from ._guard._site import Site, application_site
from ._scoping import scoped_session
from ._work import UnitOfWork

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from sqlalchemy.orm import Session

    from ._scope import SessionScope

__all__ = ["SessionScopeMiddleware"]

_NO_ERROR: tuple[None, None, None] = (None, None, None)
ExcInfo = tuple[type[BaseException], BaseException, TracebackType] | tuple[None, None, None]

_current: contextvars.ContextVar[weakref.ref[RequestScope] | None] = contextvars.ContextVar(
    "sessionscope.wsgi.request", default=None
)
"""Weakly: the request's context must not keep its request alive (a body the server dropped
without ``close()`` ends its unit of work as it is freed, not when the garbage collector runs)."""


def current_request_scope() -> RequestScope | None:
    """The request (or Flask app context) scope the running code is in, if any."""
    ref = _current.get()
    return None if ref is None else ref()


class RequestScope(UnitOfWork):
    """One request: a unit of work (this object is its boundary), its scope, and how its end is
    decided.

    Everything it opens runs in ``context``, a copy of the server's context made for this request:
    the server may call the body's ``close()`` from another point of its loop, and the
    request's context variables must be reset where they were set. For a WSGI request it is also
    the ``start_response`` the application is given (:meth:`__call__`). One object for all three
    roles: everything a request makes lives while it runs, where the collector sees it.
    """

    __slots__ = (
        "context",
        "registry",
        "scope",
        "session",
        "commit",
        "site",
        "ended",
        "started",
        "_start_response",
        "_current_token",
    )

    def __init__(
        self,
        registry: scoped_session[Any],
        commit: bool,
        site: Site | None = None,
        start_response: StartResponse | None = None,
    ) -> None:
        """``site``: where the integration was set up, what its sessions were "created at" (a
        request's own stack is the server's); None to look for it as for any session.
        ``start_response``: the server's, for a WSGI request (see :meth:`__call__`)."""
        self.context = contextvars.copy_context()
        self.registry = registry
        # new=True: a request is independent of any scope around the server (a test's, say)
        self.scope: SessionScope[Any] = registry.scope(new=True, commit=False)
        self.session: Session | None = None
        self.commit = commit
        self.site = site
        self.ended = False
        self.started = False
        """Whether the application has called ``start_response`` (the status went out)."""
        self._start_response = start_response
        self._current_token: contextvars.Token[weakref.ref[RequestScope] | None] | None = None

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Any:
        """The ``start_response`` the application is given: commit if the policy says so (a
        failing commit raises into the application, before any status is sent), then the
        server's. The request itself, not a closure or bound method made per request."""
        self.commit_for(status)
        self.started = True
        assert self._start_response is not None
        return self._start_response(status, headers, exc_info)

    def open(self) -> None:
        """Enter the unit of work, then the scope, in the running context."""
        work = self._open()
        root = work.root  # (work.root_unit(), inlined)
        unit = root() if type(root) is weakref.ref else root
        try:
            # (the scope is new: no savepoint to begin; the unit and work were just looked up)
            self.session = self.scope.enter(1, (unit, work, self.site))
        except BaseException:
            self.ended = True
            self.__exit__(*sys.exc_info())
            raise
        self._current_token = _current.set(weakref.ref(self))

    def commit_for(self, status: str) -> None:
        """Commit when asked to and the status is a success (see :meth:`commit_now`)."""
        if self.commit and _code(status) < 400:
            self.commit_now()

    def commit_now(self) -> None:
        """Commit the request's session; if that fails, roll back and raise the failure."""
        if self.ended or self.session is None:
            return
        try:
            self.session.commit()
        except BaseException:
            self.session.rollback()
            raise

    def end(self, exc_info: ExcInfo | OptExcInfo = _NO_ERROR) -> None:
        """Close the scope (rolling back what was not committed) and end the unit of work, once.

        With ``exc_info`` of an error in flight, a failure to close is logged by the scope and the
        original error stays the one raised.
        """
        if self.ended:
            return
        self.ended = True
        token, self._current_token = self._current_token, None
        if token is not None:
            try:  # noqa: SIM105 - (contextlib.suppress is a context manager more, per request)
                _current.reset(token)
            except ValueError:  # ended from another context: nothing to reset
                pass
        try:
            self.scope.__exit__(*exc_info)
        finally:
            self.__exit__(*exc_info)  # (the unit of work's end)


def _code(status: str) -> int:
    try:
        return int(status.split(None, 1)[0])
    except (ValueError, IndexError):
        return 500  # not a status line: never commit on it


class SessionScopeMiddleware:
    """Give every request its own unit of work and session scope of ``session``.

    :param app: the WSGI application.
    :param session: the application's ``sessionscope.scoped_session``; inside a request,
        ``session()`` and its proxies return the request's session.
    :param commit: ``True`` commits when the response status is below 400 (before the status line
        goes out, so a failed commit is a 500) and rolls back otherwise; ``False`` (default)
        never commits: what the request did not commit itself is rolled back.
    """

    def __init__(self, app: WSGIApplication, session: Any, *, commit: bool = False) -> None:
        if not callable(app):
            refuse(TypeError, "SessionScopeMiddleware()", "app", app, "a WSGI application")
        expect_registry("SessionScopeMiddleware()", session)
        expect_flags("SessionScopeMiddleware()", commit=commit)
        self.app = app
        self.session: scoped_session[Any] = session
        self.commit = commit
        self.site = application_site()
        """Where the application set the middleware up: its requests' sessions were "created"
        there (what their own stacks show is the server's loop)."""

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # (positionally: a class called with keywords builds a dict per request)
        request = RequestScope(self.session, self.commit, self.site, start_response)
        return request.context.run(_serve, self.app, request, environ)


def _serve(
    app: WSGIApplication, request: RequestScope, environ: WSGIEnvironment
) -> Iterable[bytes]:
    """One request, in its own context: the application's call, and the scope's end when the
    body is built (else the body ends it)."""
    request.open()
    try:
        result = app(environ, request)
    except BaseException:
        request.end(sys.exc_info())
        raise
    started = request.started
    if started and type(result) in _BUILT_BODIES:
        # The whole body is built (the usual response): no database work is left, so the
        # request ends now, and its connection is back in the pool before the server sends
        # the response (as a hand-written `finally: session.close()` does).
        request.end()
        return result
    file_wrapper = environ.get("wsgi.file_wrapper")
    if started and isinstance(file_wrapper, type) and isinstance(result, file_wrapper):
        # A file sent as is (sendfile): no database work is left, and wrapping it would hide
        # it from the server. The server closes it.
        try:
            request.end()
        except BaseException:
            _close(result)
            raise
        return result
    return ScopedBody(request, result)


_BUILT_BODIES = (list, tuple)
"""Bodies that are data, not code: iterating them cannot reach the session (a subclass could)."""


class ScopedBody:
    """The application's response body, ending the request's scope when closed.

    Each step of the iteration runs in the request's context. ``close()`` closes the
    application's iterable first (a generator's ``finally`` may still use the session), then ends
    the scope. An error raised by the iteration ends it at once, before it propagates.
    """

    __slots__ = ("_request", "_result", "_iterator")

    def __init__(self, request: RequestScope, result: Iterable[bytes]) -> None:
        self._request = request
        self._result = result
        self._iterator: Iterator[bytes] | None = None

    def __iter__(self) -> ScopedBody:
        return self

    def __next__(self) -> bytes:
        return self._request.context.run(self._next)

    def _next(self) -> bytes:
        try:
            if self._iterator is None:
                self._iterator = iter(self._result)
            return next(self._iterator)
        except StopIteration:
            raise
        except BaseException:
            self._close(sys.exc_info())
            raise

    def close(self) -> None:
        """The server is done with the response: close the application's body, end the scope."""
        if not self._request.ended:
            self._request.context.run(self._close, _NO_ERROR)

    def _close(self, exc_info: ExcInfo | OptExcInfo) -> None:
        try:
            _close(self._result)
        except BaseException:
            self._request.end(exc_info if exc_info[0] is not None else sys.exc_info())
            raise
        self._request.end(exc_info)


def _close(result: object) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()
