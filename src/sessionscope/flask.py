"""Flask: a session scope per request, and per app context outside requests.

``SessionScope(app, Session)`` (or ``init_app(app)`` in an application factory) does for Flask
what the hand-written pair ``before_request`` (nothing to do) / ``teardown_request``
(``Session.remove()``) did, without the pair's gaps:

- **Requests** get their own ``sessionscope.unit_of_work()`` and ``Session.scope()``, opened
  around ``app.wsgi_app`` (the place Flask documents for WSGI middleware), so the scope covers all
  of Flask's request handling: ``before_request``, the view, error handlers, ``after_request``,
  every extension's ``teardown_request``/``teardown_appcontext``, and the response body while the
  server iterates it (streaming responses keep their session). It ends when the server closes the
  body. A ``teardown_request`` hook would end it before a streamed body runs, and before or after
  other extensions' teardown depending on registration order.
- **The commit** (``commit=True``) is an ``after_request`` hook registered first, so it runs after
  the application's own ``after_request`` hooks: when the response's status is below 400 it
  commits. A commit that fails raises there, which Flask handles as any error of the request:
  ``got_request_exception``, the application's 500 handler, a 500 response. The response of that
  handler goes through ``after_request`` again, with its status at or above 400: nothing is
  committed. Whatever was not committed is rolled back when the request ends.
- **App contexts outside requests** (``flask`` CLI commands, ``with app.app_context():`` in
  scripts, tests and workers) get a scope of their own, opened by the ``appcontext_pushed`` signal
  and ended by ``teardown_appcontext``; it is kept on ``flask.g``, the app context's namespace.
  Nothing is committed for them: a CLI command's failure does not reach the teardown (click ends
  the context without it), so committing there could commit a failed command's work. An app
  context pushed inside a request or inside another scoped app context joins that scope.

flask is imported when an application is initialised; ``import sessionscope`` never imports it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc

from ._arguments import expect_flags, refuse
from ._expect_registry import expect_registry
from .wsgi import RequestScope, SessionScopeMiddleware, current_request_scope

if TYPE_CHECKING:
    from flask import Flask
    from flask.wrappers import Response

    from ._scoping import scoped_session

__all__ = ["SessionScope"]

EXTENSION = "sessionscope"
"""The key in ``app.extensions``."""
_ON_G = "_sessionscope"
"""Where an app context's own scope is kept on ``flask.g``."""


class SessionScope:
    """The Flask extension: one session scope of ``session`` per request and per app context.

    :param app: the Flask application, or None to call :meth:`init_app` later.
    :param session: the application's ``sessionscope.scoped_session``; views, hooks and commands
        call it as usual (``Session()``, ``Session.add(...)``) and get the current request's or app
        context's session.
    :param commit: ``True`` commits a request's session when its response status is below 400;
        ``False`` (default) never commits for you. Either way, what was not committed is rolled
        back when the request or app context ends.
    """

    def __init__(self, app: Flask | None = None, session: Any = None, *, commit: bool = False):
        expect_flags("SessionScope()", commit=commit)
        if session is not None:
            expect_registry("SessionScope()", session)
        self.session: scoped_session[Any] | None = session
        self.commit = commit
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Scope ``app``'s requests and app contexts (once per application)."""
        import flask

        if not isinstance(app, flask.Flask):
            refuse(TypeError, "SessionScope.init_app()", "app", app, "a Flask application")
        if self.session is None:
            refuse(
                sa_exc.ArgumentError,
                "SessionScope.init_app()",
                "session",
                None,
                "a sessionscope.scoped_session",
                "Pass it when creating the extension: SessionScope(session=Session).",
            )
        if EXTENSION in app.extensions:
            raise RuntimeError(
                f"SessionScope.init_app(): {app.name!r} already has a SessionScope "
                f"(app.extensions[{EXTENSION!r}]); initialise one per application."
            )
        app.extensions[EXTENSION] = self
        # the request's scope ends after Flask's own teardown and after the body was sent
        app.wsgi_app = SessionScopeMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, self.session, commit=False
        )
        # registered now, so it runs after the after_request hooks registered later (Flask runs
        # them in reverse order), on the response as it will be sent
        app.after_request(self._commit)
        flask.appcontext_pushed.connect(self._app_context_pushed, app)
        app.teardown_appcontext(self._app_context_ended)

    def _mine(self, frame: RequestScope | None) -> bool:
        return frame is not None and frame.registry is self.session

    def _commit(self, response: Response) -> Response:
        if self.commit and response.status_code < 400:
            frame = current_request_scope()
            if frame is not None and self._mine(frame):
                frame.commit_now()  # raises into Flask's error handling if the commit fails
        return response

    def _app_context_pushed(self, sender: Flask, **_: Any) -> None:
        if self._mine(current_request_scope()):
            return  # inside a request, or a scoped app context: join its scope
        import flask

        assert self.session is not None
        frame = RequestScope(self.session, commit=False)
        frame.open()
        setattr(flask.g, _ON_G, frame)

    def _app_context_ended(self, exc: BaseException | None) -> None:
        import flask

        frame: RequestScope | None = flask.g.pop(_ON_G, None)
        if frame is None:
            return
        if exc is None:
            frame.end()
        else:
            frame.end((type(exc), exc, exc.__traceback__ or sys.exc_info()[2]))  # type: ignore[arg-type]
