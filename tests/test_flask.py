"""The Flask extension: in process (Flask's test client and CLI runner), then under gunicorn.

In process, on an SQLite file: a request's session is its own and ends with the response (also a
streamed one); ``commit=True`` commits below 400; a commit that fails goes through Flask's error
handling to a 500; app contexts outside requests (``with app.app_context():``, CLI commands) get a
scope of their own, ended by the app context's teardown.

Under gunicorn, on PostgreSQL: the same load and checks as ``test_wsgi_gunicorn.py`` (see there),
with the Flask application of ``tests/servers/wsgi_app.py``. Unmarked: gevent ``--preload``;
``slow``: every worker class with and without ``--preload``, the tenant check, and SQLAlchemy's
``scoped_session`` with the hand-written ``after_request``/``teardown_request`` pair failing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from flask import Flask, Response, stream_with_context
from sqlalchemy import Engine, event, exc
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

import sessionscope
from sessionscope.flask import SessionScope
from tests.models import Row
from tests.servers.gunicorn_process import drive_clients
from tests.servers.process import drive
from tests.servers.wsgi_checks import (
    CLIENTS,
    WsgiDatabase,
    assert_data_went_wrong,
    assert_failed_commits_are_500s,
    assert_served_cleanly,
    assert_tenants_isolated,
    mark_known_failures,
    plan,
    serve,
    sqlalchemy_registry_problems,
    tenant_plans,
    wsgi_database,
)
from tests.test_wsgi_middleware import checked_out, committed, sqlite_engine

pytestmark = pytest.mark.timeout(180)


# ------------------------------------------------------------------------------------------------
# in process


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    yield from sqlite_engine(tmp_path)


@pytest.fixture
def Session(engine: Engine) -> sessionscope.scoped_session[OrmSession]:
    return sessionscope.scoped_session(sessionmaker(engine))


def make_app(Session: Any, *, commit: bool = True) -> Flask:
    app = Flask(__name__)
    SessionScope(app, Session, commit=commit)
    seen: list[OrmSession] = []
    app.config["seen"] = seen

    @app.post("/add/<owner>/<int:status>")
    def add(owner: str, status: int) -> Any:
        session = Session()
        assert session.info == {}, "a request's session starts fresh"
        session.info["owner"] = owner
        seen.append(session)
        Session.add(Row(owner=owner, n=0))
        Session.flush()
        return {"owner": owner}, status

    return app


def test_each_request_has_its_own_session_committed_below_400(engine: Engine, Session: Any) -> None:
    app = make_app(Session)
    outside = Session()
    client = app.test_client()
    assert client.post("/add/ok/200").status_code == 200
    assert client.post("/add/created/201").status_code == 201
    assert client.post("/add/conflict/409").status_code == 409
    assert client.post("/add/broken/500").status_code == 500
    assert committed(engine) == ["ok", "created"]
    seen = app.config["seen"]
    assert len(set(map(id, seen))) == 4 and outside not in seen
    assert Session() is outside and outside.info == {}
    assert checked_out(engine) == 0
    assert app.extensions["sessionscope"].session is Session


def test_commit_false_commits_nothing_for_you(engine: Engine, Session: Any) -> None:
    app = make_app(Session, commit=False)
    assert app.test_client().post("/add/ok/200").status_code == 200
    assert committed(engine) == []
    assert checked_out(engine) == 0


def test_a_failing_commit_goes_through_flasks_error_handling_to_a_500(
    engine: Engine, Session: Any
) -> None:
    app = make_app(Session)
    handled: list[str] = []

    @app.errorhandler(500)
    def internal(error: Any) -> Any:
        handled.append(type(getattr(error, "original_exception", error)).__name__)
        return {"error": "commit failed"}, 500

    def refuse_commit(session: OrmSession) -> None:
        raise exc.OperationalError("COMMIT", {}, Exception("the database refused the commit"))

    @app.before_request
    def sabotage() -> None:
        event.listen(Session(), "before_commit", refuse_commit)

    response = app.test_client().post("/add/lost/200")
    assert response.status_code == 500
    assert response.json == {"error": "commit failed"}
    assert handled == ["OperationalError"]
    assert committed(engine) == []
    assert checked_out(engine) == 0


def test_a_streamed_response_keeps_its_session_until_the_body_is_closed(
    engine: Engine, Session: Any
) -> None:
    app = Flask(__name__)
    SessionScope(app, Session, commit=False)

    @app.get("/stream")
    def stream() -> Response:
        session = Session()

        def rows() -> Iterator[str]:
            for i in range(3):
                assert Session() is session
                Session.add(Row(owner=f"streamed{i}", n=i))
                Session.flush()
                yield f"{i},"
            Session.commit()

        return Response(stream_with_context(rows()))

    response = app.test_client().get("/stream", buffered=False)
    body = response.iter_encoded()
    assert next(body) == b"0,"
    assert checked_out(engine) == 1  # the body is still being produced, in its request's session
    assert b"".join(body) == b"1,2,"
    response.close()
    assert committed(engine) == ["streamed0", "streamed1", "streamed2"]
    assert checked_out(engine) == 0


def test_an_app_context_outside_requests_has_a_scope_ended_by_its_teardown(
    engine: Engine, Session: Any
) -> None:
    app = make_app(Session)
    outside = Session()
    with app.app_context():
        mine = Session()
        assert mine is not outside
        with app.app_context():  # nested: joins the enclosing app context's scope
            assert Session() is mine
        Session.add(Row(owner="committed", n=0))
        Session.commit()
        # a request inside the block (tests do this) gets its own session, not the block's
        assert app.test_client().post("/add/inner/200").status_code == 200
        assert Session() is mine and app.config["seen"][0] is not mine
        Session.add(Row(owner="left-uncommitted", n=1))
        Session.flush()
    assert Session() is outside
    assert committed(engine) == ["committed", "inner"]
    assert checked_out(engine) == 0


def test_a_cli_command_has_a_scope_of_its_own(engine: Engine, Session: Any) -> None:
    app = make_app(Session)
    outside = Session()

    @app.cli.command("seed")
    @click.argument("owner")
    def seed(owner: str) -> None:
        assert Session() is not outside
        Session.add(Row(owner=owner, n=0))
        Session.commit()
        Session.add(Row(owner="not-committed", n=1))
        Session.flush()
        click.echo("seeded")

    result = app.test_cli_runner().invoke(args=["seed", "cli"])
    assert result.exit_code == 0, result.output
    assert "seeded" in result.output
    assert committed(engine) == ["cli"]
    assert checked_out(engine) == 0


def test_init_app_later_once_per_application_with_a_registry(Session: Any) -> None:
    extension = SessionScope(session=Session, commit=True)
    app = Flask(__name__)
    extension.init_app(app)
    assert app.extensions["sessionscope"] is extension
    with pytest.raises(RuntimeError, match="already has a SessionScope"):
        extension.init_app(app)
    with pytest.raises(exc.ArgumentError, match="argument `session`"):
        SessionScope().init_app(Flask(__name__))
    with pytest.raises(exc.ArgumentError, match="argument `session`"):
        SessionScope(Flask(__name__), sessionmaker())
    with pytest.raises(TypeError, match="argument `commit`"):
        SessionScope(session=Session, commit="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="argument `app`"):
        SessionScope(session=Session).init_app(object())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# under gunicorn, on PostgreSQL


@pytest.fixture
def database(pg_schema: str) -> Iterator[WsgiDatabase]:
    yield from wsgi_database(pg_schema)


def test_flask_under_gevent_preload_commits_exactly_its_rows_and_leaves_nothing_behind(
    database: WsgiDatabase, tmp_path: Path
) -> None:
    with serve(database, tmp_path, framework="flask", worker="gevent", preload=True) as server:
        results = drive(server.base_url, plan(1000), clients=CLIENTS)
        assert_served_cleanly(server, database, results)
        assert_failed_commits_are_500s(server, database)


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["", "preload"])
@pytest.mark.parametrize("worker", ["sync", "gthread", "gevent", "eventlet"])
def test_flask_under_every_worker_class_and_2000_requests(
    worker: str,
    preload: bool,
    database: WsgiDatabase,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    mark_known_failures(request, worker, preload)
    with serve(database, tmp_path, framework="flask", worker=worker, preload=preload) as server:
        results = drive(server.base_url, plan(2000), clients=CLIENTS)
        assert_served_cleanly(server, database, results)


@pytest.mark.slow
@pytest.mark.parametrize("worker", ["gevent", "gthread"])
def test_flask_row_level_security_never_returns_another_tenants_rows(
    worker: str, database: WsgiDatabase, tmp_path: Path
) -> None:
    with serve(database, tmp_path, framework="flask", worker=worker, preload=True) as server:
        results = drive_clients(server.base_url, tenant_plans(CLIENTS, 20))
        assert_tenants_isolated(server, database, results)


@pytest.mark.slow
def test_sqlalchemy_scoped_session_with_the_hand_written_pair_fails_under_gevent(
    database: WsgiDatabase, tmp_path: Path
) -> None:
    assert_data_went_wrong(sqlalchemy_registry_problems(database, tmp_path, "flask"))
