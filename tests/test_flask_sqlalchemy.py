"""``sessionscope.flask_sqlalchemy.unit_scoped``: Flask-SQLAlchemy's ``db.session``, per request.

A real Flask app on PostgreSQL, served from a pool of reused threads: concurrent requests get
sessions of their own, a failed request's flushed rows never land (not even through the next
request on that thread), and a request's object used from another thread is ``CrossUnitError``.
Then Flask-SQLAlchemy's own test suite, run with ``unit_scoped`` applied to every instance it makes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

flask = pytest.importorskip("flask")
flask_sqlalchemy = pytest.importorskip("flask_sqlalchemy")

import sessionscope  # noqa: E402
from sessionscope.flask_sqlalchemy import UnitScopedSession, unit_scoped  # noqa: E402
from tests.conftest import PG_URL, require_server  # noqa: E402

HERE = Path(__file__).parent


def _make_db() -> tuple[Any, Any]:
    class Base(DeclarativeBase):
        pass

    db = flask_sqlalchemy.SQLAlchemy(model_class=Base)

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "fsa_items"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(50))

    return db, Item


def _app(url: str) -> Any:
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = url
    if url.startswith("postgresql"):
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": 5, "max_overflow": 10}
    return app


# -- setup: the order of unit_scoped and init_app ------------------------------------------------


@pytest.mark.parametrize("order", ["before_init_app", "after_init_app", "after_constructor"])
def test_either_order_works(order: str) -> None:
    db, _ = _make_db()
    app = _app("sqlite://")
    if order == "before_init_app":
        registry = unit_scoped(db)
        db.init_app(app)
    elif order == "after_init_app":
        db.init_app(app)
        registry = unit_scoped(db)
    else:
        db = flask_sqlalchemy.SQLAlchemy(app)
        registry = unit_scoped(db)
    assert db.session is registry
    assert isinstance(registry, UnitScopedSession)
    with app.app_context():
        session = db.session()
        assert isinstance(session, flask_sqlalchemy.session.Session)  # its class, binds and all
        db.session.execute(sa.text("select 1"))
        assert session.in_transaction()
        assert db.session() is session
        in_request = None
        with app.test_request_context():  # same app: Flask reuses the app context
            in_request = db.session()
        assert in_request is session
    with app.app_context():
        assert db.session() is not session
    assert not session.in_transaction()


def test_again_same_guard_is_a_no_op_other_guard_refused() -> None:
    db, _ = _make_db()
    registry = unit_scoped(db)
    assert unit_scoped(db) is registry
    with pytest.raises(sa_exc.InvalidRequestError, match="guard='raise'"):
        unit_scoped(db, guard="off")
    with pytest.raises(sa_exc.ArgumentError, match="db"):
        unit_scoped(object())  # type: ignore[arg-type]
    with pytest.raises(sa_exc.ArgumentError, match="guard"):
        unit_scoped(_make_db()[0], guard="loud")  # type: ignore[arg-type]


def test_outside_an_app_context_refused_as_flask_sqlalchemy_does() -> None:
    db, _ = _make_db()
    app = _app("sqlite://")
    db.init_app(app)
    unit_scoped(db)
    with pytest.raises(RuntimeError, match="application context"):
        db.session()


def test_binds_and_teardown_close() -> None:
    db, Item = _make_db()
    app = _app("sqlite://")
    app.config["SQLALCHEMY_BINDS"] = {"other": "sqlite://"}

    class Other(db.Model):  # type: ignore[name-defined,misc]
        __bind_key__ = "other"
        id: Mapped[int] = mapped_column(primary_key=True)

    unit_scoped(db)
    db.init_app(app)
    with app.app_context():
        db.create_all()
        assert db.session.get_bind(mapper=Item) is db.engine  # Flask-SQLAlchemy's get_bind
        assert db.session.get_bind(mapper=Other) is db.engines["other"]
        db.session.add(Item(name="kept?"))
        db.session.flush()
        session = db.session()
        assert session.in_transaction()
    assert not session.in_transaction()  # rolled back and closed at teardown
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Item.id))) == 0


def test_context_pushed_before_hooking_becomes_a_unit() -> None:
    db, _ = _make_db()
    app = _app("sqlite://")
    with app.app_context():
        db.init_app(app)
        unit_scoped(db)
        session = db.session()
        with app.app_context():  # a nested context: a session of its own, as in Flask-SQLAlchemy
            assert db.session() is not session
        assert db.session() is session
    assert not session.in_transaction()


def test_async_view_uses_the_request_session_its_children_their_own() -> None:
    """Flask runs an ``async def`` view as a task (asgiref) while the request's thread waits."""
    pytest.importorskip("asgiref")
    db, Item = _make_db()
    unit_scoped(db)
    app = _app("sqlite://")
    db.init_app(app)
    with app.app_context():
        db.create_all()
    seen: dict[str, Any] = {}

    @app.before_request
    def before() -> None:
        seen["item"] = Item(id=1, name="from before_request")
        db.session.add(seen["item"])
        db.session.flush()
        seen["session"] = db.session()

    @app.get("/async")
    async def view() -> str:
        import asyncio

        seen["item"].name = "changed in the view"  # the request's object, in the view's task
        children = await asyncio.gather(*(_is(db, seen["session"]) for _ in range(2)))
        same = db.session() is seen["session"]
        db.session.commit()
        return f"{same} {children}"

    assert client_get(app, "/async") == "True [False, False]"
    with app.app_context():
        assert db.session.scalars(sa.select(Item.name)).all() == ["changed in the view"]


async def _is(db: Any, session: Any) -> bool:
    return db.session() is session  # type: ignore[no-any-return]


# -- a real app under threads (PostgreSQL) --------------------------------------------------------


@pytest.fixture
def pg_app(pg_schema: str) -> Iterator[tuple[Any, Any, Any]]:
    db, Item = _make_db()
    unit_scoped(db)
    app = _app(f"{PG_URL}?options=-csearch_path%3D{pg_schema}")
    db.init_app(app)
    with app.app_context():
        db.drop_all()
        db.create_all()
    yield app, db, Item
    with app.app_context():
        db.drop_all()
        db.engine.dispose()


def test_threads_each_request_its_own_session_failed_rows_never_land(
    pg_app: tuple[Any, Any, Any],
) -> None:
    app, db, Item = pg_app
    workers = 4
    barrier = threading.Barrier(workers, timeout=10)
    seen: list[int] = []

    @app.post("/add/<name>")
    def add(name: str) -> str:
        db.session.add(Item(name=name))
        db.session.flush()
        seen.append(id(db.session()))
        barrier.wait()  # all four requests are inside their sessions at once
        db.session.commit()
        return "ok"

    @app.post("/fail/<name>")
    def fail(name: str) -> str:
        db.session.add(Item(name=name))
        db.session.flush()  # the row is in this request's transaction ...
        raise RuntimeError("request failed")  # ... which must never be committed

    @app.post("/commit-nothing")
    def commit_nothing() -> str:
        db.session.commit()  # would commit a leaked failed row if the thread carried it over
        return "ok"

    client = app.test_client()
    with ThreadPoolExecutor(workers) as pool:  # threads reused request after request
        codes = list(pool.map(lambda n: client.post(f"/add/ok{n}").status_code, range(8)))
        assert codes == [200] * 8
        assert len(set(seen[:workers])) == workers and len(set(seen[workers:])) == workers
    app.config["PROPAGATE_EXCEPTIONS"] = False
    with ThreadPoolExecutor(1) as one:  # the next request surely runs on the failed one's thread
        for n in range(workers):
            assert one.submit(client.post, f"/fail/bad{n}").result().status_code == 500
            assert one.submit(client.post, "/commit-nothing").result().status_code == 200
    with app.app_context():
        names = set(db.session.scalars(sa.select(Item.name)))
        assert names == {f"ok{n}" for n in range(8)}
        assert db.engine.pool.checkedout() == 1


def test_request_object_from_another_thread_is_cross_unit_error(
    pg_app: tuple[Any, Any, Any],
) -> None:
    app, db, Item = pg_app
    with app.app_context():
        db.session.add(Item(id=1, name="one"))
        db.session.commit()

    @app.get("/cross")
    def cross() -> str:
        item = db.session.get(Item, 1)
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                item.name = "changed"  # the request's object, from a thread it did not start
            except BaseException as exc:  # noqa: BLE001 - reported back to the request
                errors.append(exc)

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        return type(errors[0]).__name__ if errors else "no error"

    assert client_get(app, "/cross") == "CrossUnitError"
    assert issubclass(sessionscope.CrossUnitError, sa_exc.InvalidRequestError)
    with app.app_context():
        assert db.session.get(Item, 1).name == "one"


def test_gevent_greenlets_in_a_subprocess(pg_schema: str) -> None:
    """30 requests as greenlets of one thread, switching while their sessions hold rows."""
    pytest.importorskip("gevent")
    script = HERE / "scenarios" / "flask_sqlalchemy_gevent.py"
    url = f"{PG_URL}?options=-csearch_path%3D{pg_schema}"
    done = subprocess.run(
        [sys.executable, str(script), url], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["distinct_sessions"] == 30 and facts["max_overlap"] == 30
    assert facts["codes"] == {n: 500 if n.startswith("bad") else 200 for n in facts["codes"]}
    assert facts["rows"] == sorted(f"ok{n}" for n in range(30) if n % 5)  # no failed row landed
    assert facts["cross"] == "CrossUnitError" and facts["unchanged"]
    assert facts["checked_out"] == 0


def client_get(app: Any, path: str) -> str:
    response = app.test_client().get(path)
    assert response.status_code == 200, response.data
    return response.get_data(as_text=True)  # type: ignore[no-any-return]


# -- Flask-SQLAlchemy's own test suite, with unit_scoped applied ----------------------------------


def _sdist_tests(cache_dir: Path) -> Path:
    """Flask-SQLAlchemy's sdist for the installed version (its tests), downloaded once."""
    from importlib.metadata import version as dist_version

    version = dist_version("flask-sqlalchemy")
    root = cache_dir / f"flask_sqlalchemy-{version}"
    if not (root / "tests" / "conftest.py").exists():
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
            + ["-d", str(cache_dir), f"flask-sqlalchemy=={version}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        archives = list(cache_dir.glob(f"flask_sqlalchemy-{version}.tar.gz"))
        if download.returncode != 0 or not archives:
            require_server(f"cannot download the Flask-SQLAlchemy sdist: {download.stderr[-300:]}")
        import tarfile

        with tarfile.open(archives[0]) as tar:
            tar.extractall(cache_dir, filter="data")
    return root


def _run_suite(root: Path, *args: str, plugin: bool) -> tuple[dict[str, str], str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd += ["-p", "no:asyncio", "-p", "no:sessionscope"]
    if plugin:
        cmd += ["-p", "flask_sqlalchemy_plugin"]
    env = {**os.environ, "PYTHONPATH": str(HERE / "compat")}
    done = subprocess.run(
        cmd + list(args), cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    outcomes = {
        m.group(2): m.group(1)
        for m in re.finditer(r"^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", done.stdout, re.M)
    }
    return outcomes, done.stdout


@pytest.mark.slow  # about 35 s: the suite (452 tests), then its failures again without the plugin
def test_flask_sqlalchemy_own_suite_passes_with_unit_scoped(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every test of the suite that passes without sessionscope passes with it.

    Tests that fail *without* the plugin too (Flask-SQLAlchemy 3.1.1 against SQLAlchemy 2.1:
    declarative dataclass bases) are re-run without it and must fail the same way there.
    """
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    root = _sdist_tests(cache.mkdir("flask-sqlalchemy-sdist") if cache else tmp_path)
    ours, output = _run_suite(root, plugin=True)
    applied = re.search(r"unit_scoped applied to (\d+) SQLAlchemy instances", output)
    assert applied and int(applied.group(1)) > 0, output[-2000:]
    assert sum(o == "PASSED" for o in ours.values()) > 100, output[-2000:]  # 3.0.5 has 129 tests
    failing = sorted(n for n, o in ours.items() if o in {"FAILED", "ERROR"})
    if failing:
        baseline, base_output = _run_suite(root, *failing, plugin=False)
        only_ours = [n for n in failing if baseline.get(n) not in {"FAILED", "ERROR"}]
        assert not only_ours, (only_ours, output[-4000:])
