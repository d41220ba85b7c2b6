"""Property: whatever the owner does, another unit's operations are refused and change nothing.

hypothesis generates sequences of session operations (add, flush, a Core insert through the
connection, commit, rollback, a savepoint committed or rolled back, iterating a result, writing an
attribute, ``flag_modified``, reading ``session.new``), each done by the owner (the test's thread)
or by a foreign unit: a second real thread, kept alive for the whole module and fed operations
through a queue. For a foreign operation the owner first prepares what it needs without changing
the database (the connection, the transaction, a result, a loaded object), then the foreign thread
attempts it while the owner waits.

Asserted for every sequence:

- every foreign operation raises ``CrossUnitError``, reaches nothing (no statement, commit or
  rollback while it runs) and changes nothing the owner can see (in a transaction or not, the
  pending, dirty and deleted objects);
- no owner operation raises;
- the database ends exactly as the owner's operations alone leave it: they are replayed on a plain
  SQLAlchemy ``Session`` against a twin database with the same seed rows, and both databases hold
  the same rows, ids included (a refused insert would have taken an id).

On SQLite files (with SQLAlchemy's SAVEPOINT recipe), and on PostgreSQL with fewer examples.
``fast`` hides trio from ``sys.modules`` (see ``tests/test_guard_handles.py``), so that the owner's
calls take the guard's fast path as in an application.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, insert, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import flag_modified
from sqlalchemy.pool import NullPool, QueuePool

import sessionscope
from tests.conftest import PG_URL, sqlite_file_url
from tests.guard_handle_cases import (
    EngineEvents,
    Outcome,
    attempt,
    reset_tables,
)
from tests.models import Base, Row
from tests.test_guard_handles import fast_path
from tests.test_nested_scopes import savepoints_on_sqlite

OPERATIONS = (
    "add",
    "flush",
    "core insert",
    "commit",
    "rollback",
    "savepoint",
    "savepoint rolled back",
    "iterate a result",
    "write an attribute",
    "flag_modified",
    "read session.new",
)
VIA = ("session", "connection", "transaction")
"""How a foreign commit or rollback is attempted: ``session.commit()``, the session's
``connection().commit()``, or its ``get_transaction().commit()`` (the same for rollback)."""
EXAMPLES = {"sqlite": 250, "postgresql": 60}


@dataclass(frozen=True)
class Step:
    operation: str
    foreign: bool
    via: str

    def __str__(self) -> str:
        return f"{'foreign' if self.foreign else 'owner'} {self.operation} (via {self.via})"


steps = st.lists(
    st.builds(Step, st.sampled_from(OPERATIONS), st.booleans(), st.sampled_from(VIA)),
    max_size=14,
)


# -- the operations ------------------------------------------------------------------------------


def seed_row(session: Session) -> Row:
    row = session.get(Row, 1)
    assert row is not None
    return row


def do(session: Session, operation: str, k: int) -> None:
    """The owner's operation ``k`` (its rows carry ``n=k``); the same on either database."""
    if operation == "add":
        session.add(Row(owner="orm", n=k))
    elif operation == "flush":
        session.flush()
    elif operation == "core insert":
        session.connection().execute(insert(Row).values(owner="core", n=k))
    elif operation == "commit":
        session.commit()
    elif operation == "rollback":
        session.rollback()
    elif operation == "savepoint":
        with session.begin_nested():
            session.connection().execute(insert(Row).values(owner="savepoint", n=k))
    elif operation == "savepoint rolled back":
        savepoint = session.begin_nested()
        session.connection().execute(insert(Row).values(owner="rolled back", n=k))
        savepoint.rollback()
    elif operation == "iterate a result":
        list(session.execute(select(Row).order_by(Row.id)))
    elif operation == "write an attribute":
        seed_row(session).n = k
    elif operation == "flag_modified":
        flag_modified(seed_row(session), "n")
    else:
        assert operation == "read session.new"
        len(session.new)


def prepare_foreign(session: Session, step: Step, k: int) -> tuple[Callable[[], Any], Any]:
    """What the foreign unit attempts, prepared by the owner without touching the data.

    Returns the attempt and a result to close afterwards (or None). The preparation may begin the
    session's transaction or load the seed row; neither changes what ends up committed.
    """
    operation, via = step.operation, step.via
    if operation == "add":
        return lambda: session.add(Row(owner="foreign", n=k)), None
    if operation == "flush":
        return session.flush, None
    if operation == "core insert":
        connection = session.connection()
        return lambda: connection.execute(insert(Row).values(owner="foreign", n=k)), None
    if operation in ("commit", "rollback"):
        if via == "session":
            return getattr(session, operation), None
        connection = session.connection()
        handle = connection if via == "connection" else session.get_transaction()
        return getattr(handle, operation), None
    if operation in ("savepoint", "savepoint rolled back"):
        return session.begin_nested, None
    if operation == "iterate a result":
        result = session.execute(
            select(Row).order_by(Row.id), execution_options={"autoflush": False}
        )
        return lambda: list(result), result
    if operation in ("write an attribute", "flag_modified"):
        with session.no_autoflush:
            row = seed_row(session)
        if operation == "flag_modified":
            return lambda: flag_modified(row, "n"), None
        return lambda: setattr(row, "n", k), None
    assert operation == "read session.new"
    return lambda: session.new, None


def visible_state(session: Session) -> tuple[Any, ...]:
    """What the owner sees of its session's work in flight."""
    return (
        session.in_transaction(),
        sorted(map(id, session.new)),
        sorted(map(id, session.dirty)),
        sorted(map(id, session.deleted)),
    )


def committed(engine: Engine) -> list[tuple[str, int]]:
    """The committed rows, as (owner, n) in that order: not by id, since the owner's preparation
    of a foreign step may change when pending rows are flushed, hence which ids they get (a seed
    row loaded under ``no_autoflush`` is found in the identity map later, where the replay loads
    it with an autoflush), not which rows are committed."""
    with engine.connect() as conn:
        return sorted((r.owner, r.n) for r in conn.execute(select(Row.owner, Row.n)))


# -- the foreign unit and the databases ----------------------------------------------------------


class ForeignThread:
    """A real thread, started by hand (it shares no context with the owner), running what it is
    sent through a queue while the sender waits."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self.outbox: queue.Queue[Outcome] = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name="foreign", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (action := self.inbox.get()) is not None:
            self.outbox.put(attempt(action))

    def __call__(self, action: Callable[[], Any]) -> Outcome:
        self.inbox.put(action)
        return self.outbox.get(timeout=30)

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(30)


@pytest.fixture(scope="module")
def foreign() -> Iterator[ForeignThread]:
    unit = ForeignThread()
    yield unit
    unit.stop()


@dataclass
class Databases:
    guarded: Engine  # the engine of the guarded sessions
    model: Engine  # the twin the owner's operations alone are replayed on


def _engine(url: str) -> Engine:
    kw: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kw["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, poolclass=QueuePool, **kw)
    savepoints_on_sqlite(engine)
    Base.metadata.create_all(engine)
    return engine


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def databases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Databases]:
    schemas: list[str] = []
    urls = []
    for twin in ("guarded", "model"):
        if request.param == "sqlite":
            urls.append(sqlite_file_url(tmp_path_factory.mktemp(f"properties-{twin}")))
            continue
        schema = f"{request.getfixturevalue('pg_schema')}_properties_{twin}"
        with create_engine(PG_URL, poolclass=NullPool).begin() as conn:
            conn.execute(text(f'create schema "{schema}"'))
        schemas.append(schema)
        urls.append(f"{PG_URL}?options=-csearch_path%3D{schema}")
    found = Databases(*(_engine(url) for url in urls))
    yield found
    found.guarded.dispose()
    found.model.dispose()
    if schemas:
        with create_engine(PG_URL, poolclass=NullPool).begin() as conn:
            for schema in schemas:
                conn.execute(text(f'drop schema "{schema}" cascade'))


# -- the property --------------------------------------------------------------------------------


def run_guarded(
    sequence: list[Step], engine: Engine, foreign: ForeignThread
) -> list[tuple[int, str]]:
    """The sequence on a guarded session; asserts the foreign steps. Returns the owner's steps."""
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    events = EngineEvents(engine)
    session = Scoped()
    owners_steps: list[tuple[int, str]] = []
    try:
        for k, step in enumerate(sequence):
            if not step.foreign:
                do(session, step.operation, k)  # must not raise
                owners_steps.append((k, step.operation))
                continue
            action, result = prepare_foreign(session, step, k)
            before, mark = visible_state(session), len(events.log)
            outcome = foreign(action)
            assert type(outcome.error) is sessionscope.CrossUnitError, (str(step), outcome)
            assert events.since(mark) == [], str(step)
            assert visible_state(session) == before, str(step)
            if result is not None:
                result.close()
    finally:
        events.detach()
        Scoped.remove()
    return owners_steps


def replay(owners_steps: list[tuple[int, str]], engine: Engine) -> None:
    with Session(engine) as session:
        for k, operation in owners_steps:
            do(session, operation, k)


@pytest.mark.parametrize("fast", [False, True], ids=["slow path", "fast path"])
def test_foreign_operations_are_refused_and_the_data_is_what_the_owner_alone_makes(
    fast: bool, databases: Databases, foreign: ForeignThread, request: pytest.FixtureRequest
) -> None:
    db = request.node.callspec.params["databases"]

    @settings(
        max_examples=EXAMPLES[db],
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(sequence=steps)
    def check(sequence: list[Step]) -> None:
        reset_tables(databases.guarded)
        reset_tables(databases.model)
        with fast_path(fast):
            owners_steps = run_guarded(sequence, databases.guarded, foreign)
        replay(owners_steps, databases.model)
        assert committed(databases.guarded) == committed(databases.model)
        assert databases.guarded.pool.checkedout() == 0  # type: ignore[attr-defined]

    check()
