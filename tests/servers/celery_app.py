"""A Celery application for the worker tests, configured by environment variables.

``celery -A tests.servers.celery_app worker`` imports this module; :func:`make_app` is also called
in-process by the eager and ``apply()`` tests. Variables (all set by ``tests/test_celery.py``):

- ``SS_CELERY_BROKER``, ``SS_CELERY_BACKEND``, ``SS_CELERY_QUEUE``: where tasks and results go;
- ``SS_CELERY_DB``: the database URL (a PostgreSQL schema of the test's own, an application name
  that identifies this worker's backends in ``pg_stat_activity``);
- ``SS_CELERY_MODE``: ``sessionscope`` (``install(app, Session, commit=True)``) or ``plain``
  (SQLAlchemy's own ``scoped_session``, the tasks committing themselves and never calling
  ``remove()``: the code the integration replaces);
- ``SS_CELERY_PARENT_QUERY=1``: the worker's main process queries the database at import, so a
  pooled connection exists before the pool forks its children.

``t.ship_touch`` takes and returns an ORM ``Row`` (the ``sessionscope`` serializer ships it).

Every task first reports whether it starts inside a transaction that already wrote
(``txid_current_if_assigned()``) or with objects pending in its session: another task's leftovers.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select, text
from sqlalchemy.orm import Session as SessionType
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.orm import sessionmaker

import sessionscope
from sessionscope.celery import install

metadata = MetaData()
rows = Table(
    "celery_rows",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("key", String(80), nullable=False),  # not unique: a row twice must be seen
)


class Row:
    """Mapped imperatively below, so that a flush is a real ORM flush."""

    id: int
    key: str

    def __init__(self, key: str) -> None:
        self.key = key


def _map() -> None:
    from sqlalchemy.orm import registry

    registry().map_imperatively(Row, rows)


_map()


def leftovers(session: SessionType) -> dict[str, Any]:
    """What a task found in its session as it started (all empty/None when nothing leaked)."""
    pending = len(session.new) + len(session.dirty)
    txid = session.execute(text("select txid_current_if_assigned()")).scalar()
    return {"pending": pending, "inherited_txid": txid}


def make_app(
    broker: str, backend: str, queue: str, db_url: str, mode: str, parent_query: bool = False
) -> tuple[Celery, Any]:
    """The application and its registry (see the module's docstring)."""
    app = Celery("sessionscope_tests", broker=broker, backend=backend)
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=False,
        worker_prefetch_multiplier=4,
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    pool: dict[str, Any] = {}
    if not db_url.startswith("sqlite"):
        pool = {"pool_size": 5, "max_overflow": 20, "pool_timeout": 30}
    engine = create_engine(db_url, **pool)
    maker = sessionmaker(engine)
    plain = mode == "plain"
    Session: Any = sa_scoped_session(maker) if plain else sessionscope.scoped_session(maker)

    @app.task(name="t.insert", shared=False)
    def insert_row(key: str) -> dict[str, Any]:
        session = Session()
        found = leftovers(session)
        session.add(Row(key))
        session.flush()
        if plain:
            session.commit()
        return found

    @app.task(name="t.fail", shared=False)
    def fail_after_flush(key: str) -> None:
        session = Session()
        session.add(Row(key))
        session.flush()
        raise ValueError(f"failed after flushing {key}")

    @app.task(name="t.load", shared=False)
    def load(row_id: int) -> dict[str, Any]:
        session = Session()
        found = leftovers(session)
        row = session.get(Row, row_id)
        found["key"] = None if row is None else row.key
        return found

    @app.task(name="t.retry_once", shared=False, bind=True, max_retries=3, default_retry_delay=0)
    def retry_once(self: Any, key: str) -> dict[str, Any]:
        session = Session()
        found = leftovers(session)
        attempt = self.request.retries
        session.add(Row(f"{key}@{attempt}"))
        session.flush()
        if attempt == 0:
            raise self.retry(countdown=0)
        if plain:
            session.commit()
        return found

    @app.task(name="t.ship_touch", shared=False)
    def ship_touch(row: Row) -> Row:
        """Receives a shipped row (its own session's), renames it, returns it (shipped back)."""
        session = Session()
        if row not in session or len(session.identity_map) != 1:
            raise RuntimeError("the shipped row did not arrive alone in the task's own session")
        row.key += "+"
        if row.key.startswith("fail"):
            session.flush()
            raise ValueError(f"{row.key} failed after flushing")
        return row

    if not plain:
        install(app, Session, commit=True)
    if parent_query:
        with maker() as session:
            session.execute(select(rows.c.id).limit(1)).all()
    return app, Session


def _from_env() -> tuple[Celery, Any]:
    env = os.environ
    return make_app(
        env.get("SS_CELERY_BROKER", "memory://"),
        env.get("SS_CELERY_BACKEND", "cache+memory://"),
        env.get("SS_CELERY_QUEUE", "sessionscope-tests"),
        env.get("SS_CELERY_DB", "sqlite://"),
        env.get("SS_CELERY_MODE", "sessionscope"),
        env.get("SS_CELERY_PARENT_QUERY") == "1",
    )


app, Session = _from_env()
