"""The WSGI middleware in process: every way a request can end ends its scope, once.

A small WSGI application on an SQLite file (the edge cases are about the WSGI protocol, not the
database; the servers under load are in ``test_wsgi_gunicorn.py``). Each test checks what the
database holds afterwards and that no connection is left checked out.
"""

from __future__ import annotations

import io
import os
import wsgiref.handlers
import wsgiref.util
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, exc, select
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.orm import sessionmaker

import sessionscope
from sessionscope.wsgi import SessionScopeMiddleware
from tests.models import Base, Row

App = Callable[[dict[str, Any], Any], Iterable[bytes]]


def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine on an SQLite file with the test tables (also for ``test_flask.py``)."""
    engine = create_engine(f"sqlite:///{os.fspath(tmp_path / 'app.db')}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    yield from sqlite_engine(tmp_path)


@pytest.fixture
def Session(engine: Engine) -> sessionscope.scoped_session[OrmSession]:
    return sessionscope.scoped_session(sessionmaker(engine))


def committed(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(Row.owner).order_by(Row.id)))


def checked_out(engine: Engine) -> int:
    return engine.pool.checkedout()  # type: ignore[attr-defined, no-any-return]


def serve(app: App) -> tuple[str, bytes]:
    """Run ``app`` for one request through wsgiref (a PEP 3333 server): status line and body."""
    environ: dict[str, Any] = {}
    wsgiref.util.setup_testing_defaults(environ)
    out, err = io.BytesIO(), io.StringIO()
    handler = wsgiref.handlers.SimpleHandler(io.BytesIO(), out, err, environ)
    handler.run(app)  # type: ignore[arg-type]
    head, _, body = out.getvalue().partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode().split(" ", 1)[1]  # "HTTP/1.0 200 OK"
    return status, body


class StartResponse:
    """A recording ``start_response`` for calling the middleware by hand."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        self.calls.append(status)
        return lambda data: None


def add(Session: Any, owner: str) -> None:
    Session.add(Row(owner=owner, n=0))
    Session.flush()


def test_commit_true_commits_a_success_and_rolls_back_an_error_status(
    engine: Engine, Session: Any
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        add(Session, environ["PATH_INFO"])
        status = "404 Not Found" if environ["PATH_INFO"] == "/missing" else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        return [b"done"]

    wrapped = SessionScopeMiddleware(app, Session, commit=True)
    for path in ("/ok", "/missing"):
        environ: dict[str, Any] = {}
        wsgiref.util.setup_testing_defaults(environ)
        environ["PATH_INFO"] = path
        body = wrapped(environ, StartResponse())
        assert b"".join(body) == b"done"
        if hasattr(body, "close"):  # (PEP 3333: a body is closed if it can be)
            body.close()
    assert committed(engine) == ["/ok"]
    assert checked_out(engine) == 0


def test_commit_false_rolls_back_what_the_request_did_not_commit(
    engine: Engine, Session: Any
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        add(Session, "committed-by-the-app")
        Session.commit()
        add(Session, "left-uncommitted")
        start_response("200 OK", [])
        return [b"ok"]

    status, body = serve(SessionScopeMiddleware(app, Session))
    assert (status, body) == ("200 OK", b"ok")
    assert committed(engine) == ["committed-by-the-app"]
    assert checked_out(engine) == 0


def test_the_request_has_its_own_session_and_the_server_thread_keeps_none(
    engine: Engine, Session: Any
) -> None:
    seen: list[OrmSession] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        session = Session()
        assert session.info == {}
        session.info["mine"] = True
        seen.append(session)
        start_response("200 OK", [])
        return [b"ok"]

    outside = Session()
    wrapped = SessionScopeMiddleware(app, Session)
    serve(wrapped)
    serve(wrapped)
    assert seen[0] is not seen[1]
    assert outside not in seen and Session() is outside and "mine" not in outside.info
    assert checked_out(engine) == 0


def test_a_failing_commit_is_a_500_never_a_200(engine: Engine, Session: Any) -> None:
    def refuse_commit(session: OrmSession) -> None:
        raise exc.OperationalError("COMMIT", {}, Exception("the database refused the commit"))

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        event.listen(Session(), "before_commit", refuse_commit)
        add(Session, "lost")
        start_response("200 OK", [])
        return [b"written"]

    status, body = serve(SessionScopeMiddleware(app, Session, commit=True))
    assert status.startswith("500")
    assert b"written" not in body
    assert committed(engine) == []
    assert checked_out(engine) == 0


def test_a_streaming_body_keeps_its_session_until_closed_even_when_closed_early(
    engine: Engine, Session: Any
) -> None:
    events: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", [])
        session = Session()
        try:
            for i in range(10):
                add(Session, f"chunk{i}")
                assert Session() is session
                yield f"{i}".encode()
        finally:
            events.append(f"finally, session open: {Session() is session}")

    body = iter(SessionScopeMiddleware(app, Session)({}, StartResponse()))
    assert next(body) == b"0"
    assert next(body) == b"1"
    assert checked_out(engine) == 1  # the request still holds its connection
    body.close()  # type: ignore[attr-defined]
    assert events == ["finally, session open: True"]  # the app's body closed before the scope
    assert committed(engine) == []
    assert checked_out(engine) == 0
    body.close()  # type: ignore[attr-defined]  # a second close does nothing


def test_start_response_called_in_the_first_iteration_still_commits_first(
    engine: Engine, Session: Any
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        add(Session, "lazy")
        start_response("201 Created", [])
        yield b"made"

    wrapped = SessionScopeMiddleware(app, Session, commit=True)
    assert serve(wrapped) == ("201 Created", b"made")
    assert committed(engine) == ["lazy"]
    assert checked_out(engine) == 0


@pytest.mark.parametrize("when", ["before start_response", "after start_response"])
def test_an_app_raising_ends_the_scope_and_the_error_propagates(
    when: str, engine: Engine, Session: Any
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        add(Session, "failed")
        if when == "after start_response":
            start_response("200 OK", [])
        raise ValueError(when)

    with pytest.raises(ValueError, match=when):
        SessionScopeMiddleware(app, Session)({}, StartResponse())
    assert committed(engine) == []
    assert checked_out(engine) == 0
    assert serve(SessionScopeMiddleware(app, Session))[0].startswith("500")
    assert checked_out(engine) == 0


def test_an_error_in_the_body_ends_the_scope_at_once(engine: Engine, Session: Any) -> None:
    closed: list[bool] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            add(Session, "half")
            yield b"half"
            raise RuntimeError("mid-body")

        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body()

    body = iter(SessionScopeMiddleware(app, Session, commit=True)({}, StartResponse()))
    assert next(body) == b"half"
    with pytest.raises(RuntimeError, match="mid-body"):
        next(body)
    assert closed == [True]  # before the server's close(), which may never come
    assert checked_out(engine) == 0
    body.close()  # type: ignore[attr-defined]
    assert closed == [True]


def test_an_app_that_returns_without_calling_start_response_never_commits(
    engine: Engine, Session: Any
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        add(Session, "never")
        return []

    start = StartResponse()
    body = SessionScopeMiddleware(app, Session, commit=True)({}, start)
    assert list(body) == []
    body.close()  # type: ignore[attr-defined]
    assert start.calls == []
    assert committed(engine) == []
    assert checked_out(engine) == 0


def test_a_file_wrapper_goes_to_the_server_as_is_after_the_scope_ended(
    engine: Engine, Session: Any, tmp_path: Path
) -> None:
    path = tmp_path / "file.txt"
    path.write_bytes(b"file body")

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        add(Session, "with-file")
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](path.open("rb"))  # type: ignore[no-any-return]

    environ: dict[str, Any] = {"wsgi.file_wrapper": wsgiref.util.FileWrapper}
    result = SessionScopeMiddleware(app, Session, commit=True)(environ, StartResponse())
    assert isinstance(result, wsgiref.util.FileWrapper)  # sendfile stays possible
    assert checked_out(engine) == 0
    assert committed(engine) == ["with-file"]
    assert b"".join(result) == b"file body"
    result.close()


def test_a_built_body_ends_the_request_as_the_app_returns_it(engine: Engine, Session: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        add(Session, "built")
        Session.commit()
        add(Session, "left uncommitted")
        start_response("200 OK", [])
        return [b"a", b"b"]

    body = SessionScopeMiddleware(app, Session)({}, StartResponse())
    assert type(body) is list  # the server gets the body itself
    assert checked_out(engine) == 0  # before the server writes anything
    assert committed(engine) == ["built"]  # what was not committed was rolled back
    assert not Session.registry.has()  # nothing left in the server's thread


def test_a_body_never_closed_is_ended_when_dropped(engine: Engine, Session: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        add(Session, "dropped")
        start_response("200 OK", [])
        yield b"x"

    body = SessionScopeMiddleware(app, Session)({}, StartResponse())
    next(iter(body))  # a streaming body: the request lasts until it is closed
    assert checked_out(engine) == 1
    del body  # a server that lost the response: the unit of work ends with its context
    assert checked_out(engine) == 0
    assert committed(engine) == []


@pytest.mark.parametrize(
    ("session", "error"),
    [
        (None, exc.ArgumentError),
        (sessionmaker(), exc.ArgumentError),
        (sa_scoped_session(sessionmaker()), exc.ArgumentError),
        (
            sessionscope.async_scoped_session(
                __import__("sqlalchemy.ext.asyncio", fromlist=["x"]).async_sessionmaker()
            ),
            exc.ArgumentError,
        ),
    ],
    ids=["None", "sessionmaker", "sqlalchemy-scoped_session", "async_scoped_session"],
)
def test_bad_arguments_are_refused_naming_them(session: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="argument `session`"):
        SessionScopeMiddleware(lambda e, s: [], session)


def test_bad_app_and_commit_are_refused(Session: Any) -> None:
    with pytest.raises(TypeError, match="argument `app`"):
        SessionScopeMiddleware(None, Session)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument `commit`"):
        SessionScopeMiddleware(lambda e, s: [], Session, commit=1)  # type: ignore[arg-type]
