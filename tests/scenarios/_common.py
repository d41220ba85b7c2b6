"""What the gevent and eventlet scenarios share: the model, the database, the workloads, the report.

Importing this imports SQLAlchemy and sessionscope, so a scenario imports it only once it has
monkey-patched (``--patch before``) or deliberately hasn't yet (``after``, ``never``).

A green framework is reached through :class:`Green` (spawn, sleep, join, kill), so the two
workloads below are literally the same code under gevent and under eventlet:

- :func:`run_race`: 30 greenlets, each a "request" that adds its own rows, yields, and commits
  through the scoped session; one request fails and rolls back. What a shared session does to the
  data shows up in the rows the table ends up with.
- :func:`run_kill`: greenlets killed between ``add`` and ``commit`` (asleep, or blocked in a query
  when the driver's I/O is cooperative); then survivors write normally.

Every fact is measured in the scenario process and printed as one JSON line (the last line of
stdout); the pytest side only reads it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, String, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.pool import NullPool, QueuePool

import sessionscope

UNITS = 30
ROWS_PER_UNIT = 3
FAILING_UNIT = 7
"""The request that fails. It fails before it ever yields, so with a shared session its rollback
throws away exactly the pending rows of requests 0..6, which are all asleep between add and commit
at that moment: 21 rows lost, every run, whatever the database."""

APP_NAME = f"ss_green_{os.getpid()}"
"""PostgreSQL application_name of this scenario's connections, to find (and end) its backends."""


class Base(DeclarativeBase):
    pass


class GreenRow(Base):
    """One row written by one greenlet: ``owner`` is its name, ``n`` which of its rows."""

    __tablename__ = "green_rows"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(50))
    n: Mapped[int]


class RequestFailed(Exception):
    """The failure of the one request that fails on purpose."""


@dataclass
class Green:
    """The few operations of a green framework the workloads need."""

    name: str
    spawn: Callable[..., Any]
    sleep: Callable[[float], None]
    join_all: Callable[[list[Any]], None]
    kill: Callable[[Any], None]


# ---------------------------------------------------------------------------------------------
# capturing what would otherwise only be printed


class LogCapture(logging.Handler):
    """Warnings and errors logged, as "logger: message [exception]" lines."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text_ = f"{record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            text_ += f" [{record.exc_info[1]!r}]"
        self.records.append(text_)


_log_capture = LogCapture()
_warnings_seen: list[str] = []


def capture_diagnostics() -> None:
    """Record SQLAlchemy/sessionscope warnings and logged errors, so the report can include them.

    Deprecation noise (eventlet announces its own deprecation) and gevent's "patching after
    threading was imported" warning are not what the tests are about and are dropped.
    """
    for name in ("sqlalchemy", "sessionscope"):
        logger = logging.getLogger(name)
        logger.addHandler(_log_capture)
        logger.propagate = False
    warnings.simplefilter("always")

    def showwarning(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, DeprecationWarning) or "monkey" in str(message).lower():
            return
        _warnings_seen.append(f"{category.__name__}: {message}")

    warnings.showwarning = showwarning


# ---------------------------------------------------------------------------------------------
# engine, registry, table


def is_postgresql(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def make_engine(url: str) -> Engine:
    """The application's engine: a real QueuePool big enough for every greenlet at once."""
    kw: dict[str, Any] = {
        "poolclass": QueuePool,
        "pool_size": 5,
        "max_overflow": 45,
        "pool_timeout": 10,
    }
    if is_postgresql(url):
        kw["connect_args"] = {"application_name": APP_NAME}
    else:
        kw["connect_args"] = {"timeout": 5, "check_same_thread": False}
    return create_engine(url, **kw)


def make_registry(kind: str) -> Any:
    """The scoped session registry under test, unbound: ``Session.configure(bind=engine)`` later.

    Apps often create ``Session`` at import and bind it once configured; it is the registry's
    creation (SQLAlchemy captures ``threading.local()`` there) that matters for monkey-patching.
    """
    factory = sessionmaker()
    if kind == "sessionscope":
        return sessionscope.scoped_session(factory)
    return sa_scoped_session(factory)


def _side_engine(url: str) -> Engine:
    """An engine of its own (no pool) for setup and for reading the results."""
    connect_args = {"application_name": APP_NAME + "_side"} if is_postgresql(url) else {}
    return create_engine(url, poolclass=NullPool, connect_args=connect_args)


def reset_table(url: str) -> None:
    engine = _side_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    engine.dispose()


def rows_by_owner(url: str) -> dict[str, int]:
    """What was committed, read through a fresh engine: owner -> number of rows."""
    engine = _side_engine(url)
    with engine.connect() as conn:
        found = dict(
            conn.execute(
                select(GreenRow.owner, func.count())
                .group_by(GreenRow.owner)
                .order_by(GreenRow.owner)
            ).all()
        )
    engine.dispose()
    return {owner: int(n) for owner, n in found.items()}


def postgres_backends(url: str) -> dict[str, int]:
    """This scenario's application backends on the server, by state ('idle', 'active', ...)."""
    engine = _side_engine(url)
    with engine.connect() as conn:
        found: dict[str, int] = dict(
            conn.execute(
                text(
                    "select coalesce(state, '?'), count(*) from pg_stat_activity "
                    "where application_name = :app group by 1"
                ),
                {"app": APP_NAME},
            ).all()
        )
    engine.dispose()
    return {state: int(n) for state, n in found.items()}


def end_postgres_backends(url: str) -> None:
    """Terminate what is left of this scenario's backends (a killed ``pg_sleep`` runs on)."""
    engine = _side_engine(url)
    with engine.connect() as conn:
        conn.execute(
            text(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where application_name = :app"
            ),
            {"app": APP_NAME},
        )
    engine.dispose()


def probe_cooperative_io(green: Green, url: str) -> bool | None:
    """Does a PostgreSQL query let other greenlets run while it waits on the server?

    One greenlet runs ``pg_sleep(0.3)`` while another ticks every 10 ms. Cooperative I/O gives ~30
    ticks; a driver that blocks the hub gives at most one or two. None for SQLite, whose C library
    never yields.
    """
    if not is_postgresql(url):
        return None
    engine = _side_engine(url)
    with engine.connect() as conn:  # connect first: only the query's wait is measured
        ticks = 0
        done = False

        def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                green.sleep(0.01)

        def query() -> None:
            nonlocal done
            try:
                conn.exec_driver_sql("select pg_sleep(0.3)")
            finally:
                done = True

        runners = [green.spawn(ticker), green.spawn(query)]
        green.join_all(runners)
    engine.dispose()
    return ticks >= 10


def psycopg_wait_function() -> str | None:
    """The name of the wait function psycopg chose at import (``wait_c`` blocks a gevent hub)."""
    waiting = sys.modules.get("psycopg.waiting")
    return None if waiting is None else waiting.wait.__name__


def _distinct(objects: list[Any]) -> list[Any]:
    """Distinct by identity (``is``), not by ``id()``; the list keeps every object alive."""
    distinct: list[Any] = []
    for obj in objects:
        if not any(obj is seen for seen in distinct):
            distinct.append(obj)
    return distinct


def _holds_state(session: OrmSession) -> bool:
    """A session not closed: in a transaction, or holding pending or loaded objects.

    Read from outside the session's unit (sessionscope's guard refuses ``session.new`` there):
    through SQLAlchemy's own, unchecked property.
    """
    pending = OrmSession.new.fget(session)  # type: ignore[attr-defined]
    return bool(session.in_transaction() or pending or len(session.identity_map))


def registry_len(Session: Any) -> int | None:
    """``len(Session.registry)``: units holding an implicit session (sessionscope only)."""
    if not isinstance(Session, sessionscope.scoped_session):
        return None
    return len(Session.registry)  # type: ignore[arg-type]  # sized without a scopefunc


def checked_out(engine: Engine) -> int:
    """Connections of the application's pool that are checked out right now."""
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


def _settle(green: Green) -> None:
    """Give the hub a moment for end-of-greenlet cleanup (gevent runs link callbacks in the hub)."""
    green.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# workloads


def run_race(green: Green, Session: Any, engine: Engine, url: str) -> dict[str, Any]:
    """30 concurrent requests through one scoped session registry; see the module docstring."""
    handed_out: list[tuple[str, OrmSession]] = []  # (greenlet name, the session it got)
    saw_foreign: list[str] = []
    errors: list[str] = []
    readback: dict[str, int] = {}
    failed_as_planned: list[str] = []

    def check_pending(session: OrmSession, me: str) -> None:
        if any(getattr(obj, "owner", me) != me for obj in session.new):
            saw_foreign.append(me)

    def request(i: int, me: str) -> None:
        s = Session()
        handed_out.append((me, s))
        s.add_all([GreenRow(owner=me, n=k) for k in range(ROWS_PER_UNIT)])
        if i == FAILING_UNIT:
            check_pending(s, me)
            raise RequestFailed(me)  # e.g. validation fails before any I/O
        green.sleep(0)  # every other request runs here, between our add and our commit
        check_pending(s, me)
        Session.commit()
        # Read back through the registry: this opens a new transaction that holds a connection,
        # and the greenlet ends without close() or remove(): only the registry can give it back.
        readback[me] = Session.scalar(
            select(func.count()).select_from(GreenRow).where(GreenRow.owner == me)
        )

    def unit(i: int) -> None:
        me = f"g{i:02d}"
        try:
            request(i, me)
        except RequestFailed:
            Session.rollback()
            failed_as_planned.append(me)
        except Exception as exc:  # noqa: BLE001 - reported, asserted on by the tests
            errors.append(f"{me}: {exc!r}")

    greenlets = [green.spawn(unit, i) for i in range(UNITS)]
    green.join_all(greenlets)
    _settle(green)

    sessions = [s for _, s in handed_out]
    distinct = _distinct(sessions)
    shared_units = sum(1 for s in sessions if sum(1 for t in sessions if t is s) > 1)
    return {
        "units": UNITS,
        "failing_owner": f"g{FAILING_UNIT:02d}",
        "failed_as_planned": failed_as_planned,
        "rows_expected": (UNITS - 1) * ROWS_PER_UNIT,
        "rows_found": rows_by_owner(url),
        "foreign_pending_seen": len(saw_foreign),
        "distinct_sessions": len(distinct),
        "units_sharing_a_session": shared_units,
        "readback_wrong": sorted(me for me, n in readback.items() if n != ROWS_PER_UNIT),
        "errors": errors,
        "pool_checkedout": checked_out(engine),
        "registry_len": registry_len(Session),
        "sessions_not_closed": sum(1 for s in distinct if _holds_state(s)),
    }


def run_kill(
    green: Green, Session: Any, engine: Engine, url: str, *, cooperative_io: bool
) -> dict[str, Any]:
    """Greenlets killed between add and commit leave nothing behind; survivors then write."""
    postgresql = is_postgresql(url)
    victims = 8
    # SQLite takes one write lock per database: only one victim can hold an open write
    # transaction (the others hold a checked-out connection with pending rows).
    flushing = set(range(victims)) if postgresql else {0}
    # Killing a greenlet blocked inside a query needs a driver that yields while it waits.
    in_query = {6, 7} if postgresql and cooperative_io else set()

    ready: list[str] = []
    reached_commit: list[str] = []
    errors: list[str] = []
    victim_sessions: list[OrmSession] = []

    def victim(i: int) -> None:
        me = f"v{i}"
        try:
            s = Session()
            victim_sessions.append(s)
            s.add_all([GreenRow(owner=me, n=k) for k in range(ROWS_PER_UNIT)])
            s.connection()  # transaction begun, connection checked out
            if i in flushing:
                s.flush()  # the rows are on the server, uncommitted
            ready.append(me)
            if i in in_query:
                Session.execute(text("select pg_sleep(5)"))
            else:
                green.sleep(30)
            reached_commit.append(me)
            Session.commit()
        except Exception as exc:  # noqa: BLE001 - GreenletExit is a BaseException and passes
            errors.append(f"{me}: {exc!r}")

    killed = [green.spawn(victim, i) for i in range(victims)]
    deadline = time.monotonic() + 10
    while len(ready) < victims and time.monotonic() < deadline and not errors:
        green.sleep(0.01)
    green.sleep(0.05)  # let the in-query victims get into their query
    before = {
        "ready": len(ready),
        "pool_checkedout": checked_out(engine),
        "registry_len": registry_len(Session),
    }
    for g in killed:
        green.kill(g)
    green.join_all(killed)
    _settle(green)
    after: dict[str, Any] = {
        "pool_checkedout": checked_out(engine),
        "registry_len": registry_len(Session),
        "victim_sessions_not_closed": sum(1 for s in victim_sessions if _holds_state(s)),
    }
    if postgresql:
        after["server_backends"] = postgres_backends(url)

    # The database and the pool must be fully usable again (SQLite: the write lock is free).
    survivors = [green.spawn(_survivor, green, Session, f"s{i}", errors) for i in range(5)]
    green.join_all(survivors)
    _settle(green)
    found = rows_by_owner(url)
    if postgresql:
        end_postgres_backends(url)
    return {
        "victims": victims,
        "flushing_victims": len(flushing),
        "in_query_victims": len(in_query),
        "before_kill": before,
        "after_kill": after,
        "reached_commit": reached_commit,
        "errors": errors,
        "rows_found": found,
        "pool_checkedout_at_end": checked_out(engine),
        "registry_len_at_end": registry_len(Session),
    }


def _survivor(green: Green, Session: Any, me: str, errors: list[str]) -> None:
    try:
        Session.add_all([GreenRow(owner=me, n=k) for k in range(ROWS_PER_UNIT)])
        green.sleep(0)
        Session.commit()
    except Exception as exc:  # noqa: BLE001
        errors.append(f"{me}: {exc!r}")


# ---------------------------------------------------------------------------------------------


def report(facts: dict[str, Any]) -> None:
    """Print the facts as the last line of stdout, with what was captured on the way."""
    facts["warnings"] = sorted(set(_warnings_seen))
    facts["logged"] = _log_capture.records
    sys.stdout.write(json.dumps(facts, sort_keys=True) + "\n")
    sys.stdout.flush()


def versions(*modules: str) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in ("sqlalchemy", "psycopg", *modules):
        module = sys.modules.get(name)
        found[name] = getattr(module, "__version__", None) if module else None
    return found
