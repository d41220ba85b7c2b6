"""``sessionscope.celery.install()`` under real ``celery worker`` subprocesses, on PostgreSQL.

``tests/servers/celery_app.py`` runs in a ``celery worker`` per pool (prefork, threads, solo,
gevent, eventlet) against RabbitMQ or Redis on 127.0.0.1 (results in Redis). The test sends a few
hundred tasks, interleaved: inserts, failures after a flush, loads by id and tasks that retry
once after flushing; then it checks the DATA in a PostgreSQL schema of its own:

- every insert's row exactly once; no row of a failed task or of a retried attempt;
- every load returned the row asked for, also when the worker's main process queried the
  database before its pool forked (prefork: the children must not share its connection);
- no task started inside another's transaction or with another's pending objects;
- no ``idle in transaction`` backend of the worker afterwards (by ``application_name``).

SQLAlchemy's own ``scoped_session`` in the same application (tasks committing themselves, no
``remove()``) fails the checks: a failed task's flushed row is committed by the next task on the
thread. Eager mode and ``apply()`` run in-process.

Under prefork, with the main process having queried before forking, it also shares that
connection among the children (``ResourceClosedError``, duplicate prepared statements).

Unmarked: prefork and threads on RabbitMQ (100 tasks each), SQLAlchemy's failure under threads,
eager/apply. ``slow``: every pool on both brokers, 400 tasks each; SQLAlchemy's under prefork.
Outside CI an unreachable broker skips; with CI=true it fails.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.orm import sessionmaker

import sessionscope
from sessionscope.celery import install
from tests.conftest import PG_URL, require_server
from tests.servers.celery_app import Row, make_app, metadata, rows
from tests.servers.process import REPO

pytestmark = pytest.mark.timeout(240)

AMQP = "amqp://guest:guest@127.0.0.1:5672//"
REDIS = "redis://127.0.0.1:6379/0"
RESULTS = "redis://127.0.0.1:6379/1"
BROKERS = {"rabbitmq": AMQP, "redis": REDIS}
SEEDS = 50


def reachable(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(2)
        try:
            probe.connect(("127.0.0.1", port))
        except OSError:
            return False
    return True


def require_brokers(*ports: int) -> None:
    for port in ports:
        if not reachable(port):
            require_server(f"no broker or result store on 127.0.0.1:{port}")


@dataclass
class CeleryDatabase:
    """A schema of the test's own with ``celery_rows`` seeded, and the URL a worker uses."""

    schema: str
    app_name: str
    url: str
    seed_ids: dict[int, str] = field(default_factory=dict)

    def stored_keys(self) -> list[str]:
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                return list(conn.execute(select(rows.c.key)).scalars())
        finally:
            engine.dispose()

    def idle_in_transaction(self) -> int:
        engine = create_engine(PG_URL)
        try:
            with engine.connect() as conn:
                return int(
                    conn.execute(
                        text(
                            "select count(*) from pg_stat_activity where application_name = :name"
                            " and state like 'idle in transaction%'"
                        ),
                        {"name": self.app_name},
                    ).scalar_one()
                )
        finally:
            engine.dispose()


@pytest.fixture
def database(pg_schema: str) -> Iterator[CeleryDatabase]:
    app_name = f"ss-celery-{uuid.uuid4().hex[:8]}"
    url = f"{PG_URL}?options=-csearch_path%3D{pg_schema}&application_name={app_name}"
    engine = create_engine(url)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    db = CeleryDatabase(pg_schema, app_name, url)
    with engine.begin() as conn:
        for n in range(SEEDS):
            key = f"seed-{n}"
            db.seed_ids[
                conn.execute(insert(rows).values(key=key).returning(rows.c.id)).scalar_one()
            ] = key
    engine.dispose()
    yield db


@contextlib.contextmanager
def celery_worker(
    pool: str, broker: str, queue: str, db: CeleryDatabase, log_path: Path, *, mode: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A ``celery worker`` subprocess (its own process group) until the block ends."""
    concurrency = {"prefork": 2, "threads": 4, "solo": 1}.get(pool, 20)
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",
        "SS_CELERY_BROKER": broker,
        "SS_CELERY_BACKEND": RESULTS,
        "SS_CELERY_QUEUE": queue,
        "SS_CELERY_DB": db.url,
        "SS_CELERY_MODE": mode,
        "SS_CELERY_PARENT_QUERY": "1",
    }
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.servers.celery_app",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--queues",
        queue,
        "--loglevel",
        "warning",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--hostname",
        f"{queue}@localhost",
    ]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown, then kill: the worker's own process group (it and its pool's children).

    The tasks are done by then; the ``threads`` pool's warm shutdown alone takes 10 s, hence the
    short wait before the kill.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(3)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(10)


def plan(count: int, seed_ids: dict[int, str]) -> list[tuple[str, Any]]:
    """``count`` tasks, the four kinds interleaved: (task name, argument)."""
    ids = sorted(seed_ids)
    kinds = ("t.insert", "t.fail", "t.load", "t.retry_once")
    tasks: list[tuple[str, Any]] = []
    for n in range(count):
        kind = kinds[n % 4]
        argument: Any = ids[n % len(ids)] if kind == "t.load" else f"{kind[2]}-{n}"
        tasks.append((kind, argument))
    return tasks


@dataclass
class Outcome:
    name: str
    argument: Any
    state: str
    value: Any


def run_tasks(
    broker: str,
    queue: str,
    tasks: list[tuple[str, Any]],
    worker: subprocess.Popen[bytes],
    log: Path,
    *,
    deadline: float = 150,
    late_fails: bool = True,
) -> list[Outcome]:
    """Send ``tasks`` and wait for each result. Past ``deadline`` seconds the test fails, or
    (``late_fails=False``) the tasks not done are reported in the state ``LATE``."""
    client = Celery("sessionscope_client", broker=broker, backend=RESULTS)
    try:
        sent = [
            (name, argument, client.send_task(name, [argument], queue=queue))
            for name, argument in tasks
        ]
        stop_at = time.monotonic() + deadline
        outcomes: list[Outcome] = []
        for name, argument, result in sent:
            while not result.ready() and (late_fails or time.monotonic() < stop_at):
                if worker.poll() is not None:
                    pytest.fail(
                        f"the worker exited ({worker.returncode}):\n{log.read_text()[-4000:]}"
                    )
                if time.monotonic() > stop_at:
                    pytest.fail(f"tasks still running at the deadline:\n{log.read_text()[-4000:]}")
                time.sleep(0.02)
            if not result.ready():
                outcomes.append(Outcome(name, argument, "LATE", None))
                continue
            value = result.get(propagate=False)
            outcomes.append(Outcome(name, argument, result.state, value))
            result.forget()
        return outcomes
    finally:
        client.close()


def problems(db: CeleryDatabase, outcomes: list[Outcome]) -> list[str]:
    """Everything that went wrong, as sentences (empty when the data is right)."""
    found: list[str] = []
    keys = db.stored_keys()
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    for outcome in outcomes:
        where = f"{outcome.name}({outcome.argument!r})"
        if outcome.name == "t.fail":
            if outcome.state != "FAILURE" or not isinstance(outcome.value, ValueError):
                found.append(f"{where}: {outcome.state} {outcome.value!r}, expected its ValueError")
            if counts.get(outcome.argument):
                found.append(f"{where}: the failed task's row was committed")
            continue
        if outcome.state != "SUCCESS":
            found.append(f"{where}: {outcome.state} {outcome.value!r}")
            continue
        value = outcome.value
        if value["pending"] or value["inherited_txid"] is not None:
            found.append(f"{where} started inside another task's work: {value}")
        if outcome.name == "t.insert" and counts.get(outcome.argument) != 1:
            found.append(f"{where}: {counts.get(outcome.argument, 0)} rows, expected 1")
        if outcome.name == "t.retry_once":
            if counts.get(f"{outcome.argument}@0"):
                found.append(f"{where}: the retried attempt's row was committed")
            if counts.get(f"{outcome.argument}@1") != 1:
                found.append(f"{where}: {counts.get(f'{outcome.argument}@1', 0)} rows of its retry")
        if outcome.name == "t.load" and value["key"] != db.seed_ids[outcome.argument]:
            found.append(
                f"{where} returned {value['key']!r}, not {db.seed_ids[outcome.argument]!r}"
            )
    idle = db.idle_in_transaction()
    if idle:
        found.append(f"{idle} backends of the worker idle in transaction")
    return found


def check_pool(pool: str, broker_name: str, count: int, db: CeleryDatabase, tmp_path: Path) -> None:
    broker = BROKERS[broker_name]
    require_brokers(5672 if broker_name == "rabbitmq" else 6379, 6379)
    queue = f"ss-{pool}-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    with celery_worker(pool, broker, queue, db, log, mode="sessionscope") as worker:
        outcomes = run_tasks(broker, queue, plan(count, db.seed_ids), worker, log)
        found = problems(db, outcomes)  # while the worker runs: its backends are still there
        found += shipping_problems(broker, queue, count // 4, db)
    assert len(outcomes) == count
    assert found == []


def shipping_problems(broker: str, queue: str, count: int, db: CeleryDatabase) -> list[str]:
    """``count`` ORM rows through ``.delay()`` and back (every 10th planted to fail after
    flushing); what went wrong, as sentences."""
    engine = create_engine(db.url)
    keys = [f"fail-ship-{n}" if n % 10 == 3 else f"ship-{n}" for n in range(count)]
    with engine.begin() as conn:
        conn.execute(insert(rows), [{"key": key} for key in keys])
    engine.dispose()
    app, registry = make_app(broker, RESULTS, queue, db.url, "sessionscope")
    found: list[str] = []
    try:
        sent = list(registry.scalars(select(Row).where(Row.key.in_(keys)).order_by(Row.id)))
        results = [app.tasks["t.ship_touch"].delay(row) for row in sent]
        for row, result in zip(sent, results, strict=True):
            value = result.get(timeout=120, propagate=False)
            if row.key.startswith("fail"):
                if not isinstance(value, ValueError):
                    found.append(f"ship_touch({row.key}) returned {value!r}, not its ValueError")
            elif value is not row or row.key != f"{row.key.rstrip('+')}+":
                found.append(f"ship_touch({row.key}) came back as {value!r}")
        registry.remove()
    finally:
        app.close()
    stored = set(db.stored_keys())
    for key in keys:
        expected = key if key.startswith("fail") else f"{key}+"
        if expected not in stored or ({key, f"{key}+"} - {expected}) & stored:
            found.append(f"shipped row {key}: stored {sorted({key, f'{key}+'} & stored)}")
    return found


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_each_task_commits_exactly_its_rows_and_leaves_nothing_behind(
    pool: str, database: CeleryDatabase, tmp_path: Path
) -> None:
    check_pool(pool, "rabbitmq", 100, database, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("broker_name", ["rabbitmq", "redis"])
@pytest.mark.parametrize("pool", ["prefork", "threads", "solo", "gevent", "eventlet"])
def test_every_pool_and_broker_under_400_tasks(
    pool: str, broker_name: str, database: CeleryDatabase, tmp_path: Path
) -> None:
    check_pool(pool, broker_name, 400, database, tmp_path)


def test_sqlalchemy_scoped_session_in_the_same_app_fails_the_checks(
    database: CeleryDatabase, tmp_path: Path
) -> None:
    """Without ``install()``: a failed task's flushed row stays in the thread's session, and the
    next task on that thread commits it with its own."""
    require_brokers(5672, 6379)
    queue = f"ss-plain-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    with celery_worker("threads", AMQP, queue, database, log, mode="plain") as worker:
        outcomes = run_tasks(AMQP, queue, plan(100, database.seed_ids), worker, log)
        found = problems(database, outcomes)
    assert any("the failed task's row was committed" in problem for problem in found), found


@pytest.mark.slow
def test_sqlalchemy_scoped_session_under_prefork_shares_the_parents_connection(
    database: CeleryDatabase, tmp_path: Path
) -> None:
    """The worker's main process queried before forking: without sessionscope's pools disposal
    the children speak on its pooled connection (duplicate prepared statements, other tasks'
    replies, tasks that never finish)."""
    require_brokers(5672, 6379)
    queue = f"ss-plain-prefork-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    with celery_worker("prefork", AMQP, queue, database, log, mode="plain") as worker:
        tasks = plan(200, database.seed_ids)
        outcomes = run_tasks(AMQP, queue, tasks, worker, log, deadline=30, late_fails=False)
        found = problems(database, outcomes)
    shared = ("ResourceClosedError", "DuplicatePreparedStatement", "ProtocolViolation", "returned")
    assert any(sign in problem for problem in found for sign in shared), found


# -- in-process: eager mode and apply() ------------------------------------------------------


@pytest.fixture
def eager_app(database: CeleryDatabase) -> Iterator[tuple[Celery, Any]]:
    app, registry = make_app("memory://", "cache+memory://", "eager", database.url, "sessionscope")
    app.conf.task_always_eager = True
    yield app, registry
    registry.remove()


def test_eager_and_apply_run_each_task_in_its_own_scope(
    eager_app: tuple[Celery, Any], database: CeleryDatabase
) -> None:
    app, _ = eager_app
    tasks = app.tasks
    assert tasks["t.insert"].delay("e-insert").get() == {"pending": 0, "inherited_txid": None}
    assert tasks["t.insert"].apply(("a-insert",)).get()["inherited_txid"] is None
    failed = tasks["t.fail"].delay("e-fail")
    assert failed.failed() and isinstance(failed.result, ValueError)
    assert tasks["t.fail"].apply(("a-fail",)).failed()
    retried = tasks["t.retry_once"].apply(("e-retry",))
    assert retried.successful(), retried.result
    seed_id, seed_key = next(iter(database.seed_ids.items()))
    assert tasks["t.load"].apply((seed_id,)).get()["key"] == seed_key
    keys = set(database.stored_keys())
    assert {"e-insert", "a-insert", "e-retry@1"} <= keys
    assert not {"e-fail", "a-fail", "e-retry@0"} & keys
    assert database.idle_in_transaction() == 0


def test_an_eager_task_does_not_touch_the_callers_scope(
    eager_app: tuple[Celery, Any], database: CeleryDatabase
) -> None:
    app, registry = eager_app
    with registry.scope(commit=False) as outer:
        outer.add(Row("caller"))
        outer.flush()
        app.tasks["t.insert"].delay("inside-caller").get()
        assert outer.in_transaction() and not outer.new
    keys = set(database.stored_keys())
    assert "inside-caller" in keys and "caller" not in keys


def test_a_task_called_as_a_function_uses_the_callers_session(
    eager_app: tuple[Celery, Any], database: CeleryDatabase
) -> None:
    app, registry = eager_app
    with registry.scope(commit=False) as outer:
        app.tasks["t.insert"]("direct")
        assert [row.key for row in outer.new] == [] and outer.in_transaction()
        assert outer.execute(select(rows.c.key).where(rows.c.key == "direct")).all()
    assert "direct" not in database.stored_keys()


@pytest.fixture
def bare_app(database: CeleryDatabase) -> Iterator[tuple[Celery, Any]]:
    """An eager app with no tasks and no install() yet, and a registry on the test's schema."""
    app = Celery("sessionscope_bare", broker="memory://", backend="cache+memory://")
    app.conf.task_always_eager = True
    engine = create_engine(database.url)
    yield app, sessionscope.scoped_session(sessionmaker(engine))
    engine.dispose()


def test_commit_false_rolls_back_what_the_task_did_not_commit(
    bare_app: tuple[Celery, Any], database: CeleryDatabase
) -> None:
    app, Session = bare_app

    @app.task(name="t.flush_only", shared=False)
    def flush_only(key: str) -> None:
        Session().add(Row(key))
        Session().flush()

    @app.task(name="t.commits", shared=False)
    def commits(key: str) -> None:
        Session().add(Row(key))
        Session().commit()

    install(app, Session)
    flush_only.delay("flushed")
    commits.delay("committed")
    keys = database.stored_keys()
    assert "committed" in keys and "flushed" not in keys


def test_a_commit_that_fails_is_the_tasks_failure(
    bare_app: tuple[Celery, Any], database: CeleryDatabase
) -> None:
    """The commit runs before Celery records the outcome: a row too long for its column, added
    but not flushed by the body, fails at the commit, and the task is a FAILURE."""
    app, Session = bare_app

    @app.task(name="t.too_long", shared=False)
    def too_long(key: str) -> str:
        Session().add(Row(key * 100))
        return "returned"

    install(app, Session, commit=True)
    result = too_long.apply(("x",))
    assert result.failed() and isinstance(result.result, sa_exc.DataError), result.result
    assert database.idle_in_transaction() == 0


def test_tasks_registered_before_install_are_covered(
    bare_app: tuple[Celery, Any], database: CeleryDatabase
) -> None:
    app, Session = bare_app

    @app.task(name="t.early", shared=False)
    def early(key: str) -> None:
        Session().add(Row(key))
        raise ValueError(key)

    app.finalize()
    assert app.tasks["t.early"] is not None
    install(app, Session, commit=True)
    with Session.scope(commit=False) as outer:
        early.delay("early")
        assert not outer.new
    assert "early" not in database.stored_keys()


def test_install_refuses_what_is_not_an_app_or_a_registry() -> None:
    app = Celery("sessionscope_refuse", broker="memory://")
    with pytest.raises(TypeError, match="celery_app"):
        install(object(), sessionscope.scoped_session(sessionmaker()))
    with pytest.raises(sa_exc.ArgumentError, match="scoped_session"):
        install(app, sa_scoped_session(sessionmaker()))
    with pytest.raises(TypeError, match="commit"):
        install(app, sessionscope.scoped_session(sessionmaker()), commit="yes")


# -- ORM objects through the broker: the sessionscope serializer, fan_out --------------------


@contextlib.contextmanager
def shipping_worker(
    db: CeleryDatabase, tmp_path: Path, pool: str = "threads"
) -> Iterator[tuple[Celery, Any]]:
    """A worker, and an in-process client app with its registry (the caller's side)."""
    require_brokers(5672, 6379)
    queue = f"ss-ship-{pool}-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.log"
    with celery_worker(pool, AMQP, queue, db, log, mode="sessionscope"):
        app, registry = make_app(AMQP, RESULTS, queue, db.url, "sessionscope")
        try:
            yield app, registry
        finally:
            registry.remove()
            app.close()


def seeded_rows(registry: Any) -> list[Row]:
    return list(registry.scalars(select(Row).where(Row.key.like("seed-%")).order_by(Row.id)))


def test_orm_objects_go_through_delay_and_come_back_as_results(
    database: CeleryDatabase, tmp_path: Path
) -> None:
    with shipping_worker(database, tmp_path) as (app, registry):
        rows_sent = seeded_rows(registry)
        results = [app.tasks["t.ship_touch"].delay(row) for row in rows_sent]
        returned = [result.get(timeout=60) for result in results]
        caller = registry()
        # received into the caller's session: its own copies, taking the committed state
        assert returned == rows_sent and all(row in caller for row in returned)
        assert all(row.key.endswith("+") and not row.key.endswith("++") for row in rows_sent)
        keys = sorted(database.stored_keys())
        assert keys == sorted(f"seed-{n}+" for n in range(SEEDS))
        registry.remove()  # the caller's own transaction (it loaded the rows)
        assert database.idle_in_transaction() == 0  # the worker's: none


@pytest.mark.parametrize("count", [200, pytest.param(1000, marks=pytest.mark.slow)])
def test_fan_out_through_a_celery_worker_merges_back(
    count: int, database: CeleryDatabase, tmp_path: Path
) -> None:
    engine = create_engine(database.url)
    with engine.begin() as conn:
        conn.execute(insert(rows), [{"key": f"item-{n}"} for n in range(count)])
    engine.dispose()
    with shipping_worker(database, tmp_path) as (app, registry):
        task = app.tasks["t.ship_touch"]
        items = list(registry.scalars(select(Row).where(Row.key.like("item-%")).order_by(Row.id)))
        returned = sessionscope.fan_out(task, items, via=task, limit=50)
        assert returned == items and all(row.key.endswith("+") for row in items)
        registry.remove()
        assert database.idle_in_transaction() == 0
    keys = database.stored_keys()
    assert sorted(k for k in keys if k.startswith("item-")) == sorted(
        f"item-{n}+" for n in range(count)
    )
    assert database.idle_in_transaction() == 0


def test_fan_out_through_celery_stops_at_the_first_failure(
    database: CeleryDatabase, tmp_path: Path
) -> None:
    engine = create_engine(database.url)
    with engine.begin() as conn:
        conn.execute(insert(rows), [{"key": "fail-item"}])
        conn.execute(insert(rows), [{"key": f"late-{n}"} for n in range(300)])
    engine.dispose()
    with shipping_worker(database, tmp_path, pool="solo") as (app, registry):
        task = app.tasks["t.ship_touch"]
        items = list(registry.scalars(select(Row).where(Row.key.like("%-%")).order_by(Row.id)))
        items = [row for row in items if not row.key.startswith("seed-")]
        with pytest.raises(ValueError, match="fail-item\\+ failed after flushing"):
            sessionscope.fan_out(task, items, via=task, limit=2)
        registry.remove()
        assert database.idle_in_transaction() == 0
    keys = database.stored_keys()
    assert "fail-item" in keys and "fail-item+" not in keys  # its flushed change never landed
    done = [k for k in keys if k.startswith("late-") and k.endswith("+")]
    assert len(done) < 10  # the rest were never sent, or revoked before they started
    assert database.idle_in_transaction() == 0


def test_eager_tasks_copy_orm_arguments_and_results_the_same_way(
    eager_app: tuple[Celery, Any], database: CeleryDatabase
) -> None:
    app, registry = eager_app
    row = seeded_rows(registry)[0]
    returned = app.tasks["t.ship_touch"].apply((row,)).get()
    assert returned is row and row.key == "seed-0+" and row in registry()
    assert "seed-0+" in database.stored_keys()


def test_an_uncommitted_orm_result_is_the_tasks_failure(
    bare_app: tuple[Celery, Any], database: CeleryDatabase
) -> None:
    app, Session = bare_app

    @app.task(name="t.flushed_row", shared=False)
    def flushed_row(key: str) -> Row:
        row = Row(key)
        Session().add(row)
        Session().flush()
        return row

    install(app, Session)  # commit=False: the task's flushed row is rolled back
    result = flushed_row.apply(("never",))
    assert result.failed() and isinstance(result.result, sessionscope.NotShippableError)
    assert "never" not in database.stored_keys()


def test_the_serializer_leaves_plain_json_as_kombu_writes_it() -> None:
    from kombu import serialization

    app = Celery("sessionscope_serializer", broker="memory://")
    install(app, sessionscope.scoped_session(sessionmaker()))
    assert app.conf.task_serializer == "sessionscope"
    assert "json" in app.conf.accept_content
    value = {"a": [1, 2.5, None, "x"], "when": datetime.datetime(2024, 1, 2, 3, 4, 5)}
    _, _, ours = serialization.dumps(value, serializer="sessionscope")
    _, _, kombus = serialization.dumps(value, serializer="json")
    assert ours == kombus
    content_type = "application/x-sessionscope+json"
    assert serialization.loads(ours, content_type, "utf-8") == value


def test_install_without_the_serializer_leaves_the_apps_serializers() -> None:
    app = Celery("sessionscope_no_serializer", broker="memory://")
    install(app, sessionscope.scoped_session(sessionmaker()), serializer=False)
    assert app.conf.task_serializer == "json" and app.conf.result_serializer == "json"
