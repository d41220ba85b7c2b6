"""Run the workload under one model with one ``scoped_session`` and measure what went wrong.

Everything reported is observed, not inferred: session identities each request was handed, rows
found by a fresh query after all units ended, exceptions the requests caught, and connections the
pool still counts as checked out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sized
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, create_engine, delete, func, select
from sqlalchemy.orm import scoped_session as sqlalchemy_scoped_session
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import QueuePool

import sessionscope

from .runners import Model
from .workload import DemoRow, Outcome, Plan, RecordingSession, ScopedSession, serve


@dataclass(frozen=True)
class Contender:
    """One column of the report: a ``scoped_session`` and how the application cleans up after it."""

    key: str
    title: str
    make: Callable[[sessionmaker[Any]], ScopedSession]
    remove_at_end: bool
    """SQLAlchemy apps call ``Session.remove()`` at request end; sessionscope needs no call."""


CONTENDERS = (
    Contender("sqlalchemy", "SQLAlchemy scoped_session", sqlalchemy_scoped_session, True),
    Contender("sessionscope", "sessionscope.scoped_session", sessionscope.scoped_session, False),
)

METRIC_LABELS = {
    "sessions_shared": "sessions shared between units",
    "rows_lost": "rows lost",
    "rows_duplicated": "rows duplicated",
    "failed_rows_kept": "rows kept from the failed request",
    "errors": "errors",
    "connections_leaked": "connections leaked",
}
"""The table's rows, in order: fields of :class:`Metrics` that are 0 when all is well."""


@dataclass
class Metrics:
    """What one contender did under one model."""

    sessions_shared: int
    """Requests whose Session object was also handed to another request."""
    rows_lost: int
    """Rows of successful requests that are missing from the table."""
    rows_duplicated: int
    """Extra copies of a successful request's rows."""
    failed_rows_kept: int
    """Rows of the failed request found in the table although it rolled back."""
    errors: int
    """Unexpected exceptions caught in the requests (the deliberate failure is not counted)."""
    connections_leaked: int
    """Connections still checked out of the pool after every unit had ended."""
    distinct_sessions: int
    """Session objects handed out to the requests (one per request when nothing is shared)."""
    others_rows_discarded: int
    """Rows of other requests that the failing request's rollback discarded."""
    commits_to_another_session: int
    """Requests whose commit went to a Session other than the one their rows were added to."""
    error_messages: list[str]
    """The distinct unexpected errors, for the explanation."""
    sessions_never_closed: int
    """Sessions handed to requests that nobody closed (neither ``remove()`` nor the unit's end)."""
    sessions_still_registered: int | None
    """sessionscope only: ``len(Session.registry)`` after every unit ended (implicit sessions)."""

    def failures(self) -> dict[str, int]:
        """Everything measured that should be zero and is not: the table's rows and the checks
        behind "closed when its unit ended"."""
        checked = [*METRIC_LABELS, "sessions_never_closed", "sessions_still_registered"]
        return {key: getattr(self, key) for key in checked if getattr(self, key)}

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def make_engine(url: str, plan: Plan) -> Engine:
    """A real pool, big enough that no request waits for a connection: leaks are then visible."""
    kwargs: dict[str, Any] = {
        "poolclass": QueuePool,
        "pool_size": 5,
        "max_overflow": plan.units + 5,
        "pool_timeout": 30,
    }
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    return create_engine(url, **kwargs)


def run_trial(url: str, model: Model, contender: Contender, plan: Plan) -> Metrics:
    """Empty the table, run ``plan`` under ``model`` with ``contender``, and measure."""
    engine = make_engine(url, plan)
    try:
        with engine.begin() as conn:
            conn.execute(delete(DemoRow))
        Session = contender.make(sessionmaker(engine, class_=RecordingSession))
        outcomes = [Outcome() for _ in range(plan.units)]

        def start_request(unit: int) -> Iterator[None]:
            return serve(Session, plan, unit, outcomes[unit], remove_at_end=contender.remove_at_end)

        model.run(plan.units, start_request)
        leaked = engine.pool.checkedout()  # type: ignore[attr-defined]
        registry = Session.registry  # sessionscope's counts its units; SQLAlchemy's can't
        still_registered = len(registry) if isinstance(registry, Sized) else None
        return _measure(engine, plan, outcomes, leaked, still_registered)
    finally:
        engine.dispose()


def _measure(
    engine: Engine,
    plan: Plan,
    outcomes: list[Outcome],
    leaked: int,
    still_registered: int | None,
) -> Metrics:
    sessions = [o.session for o in outcomes if o.session is not None]
    holders = Counter(id(session) for session in sessions)  # all alive: ids are unique
    shared = sum(1 for session in sessions if holders[id(session)] > 1)
    never_closed = {id(session) for session in sessions if not session.was_closed}
    found = _rows_found(engine)
    lost = duplicated = 0
    for unit in range(plan.units):
        for n in range(plan.expected_rows(unit)):
            copies = found.get((plan.owner(unit), n), 0)
            lost += copies == 0
            duplicated += max(0, copies - 1)
    failed_owner = plan.owner(plan.failing_unit)
    errors = [message for o in outcomes for message in o.errors]
    return Metrics(
        sessions_shared=shared,
        rows_lost=lost,
        rows_duplicated=duplicated,
        failed_rows_kept=sum(c for (owner, _), c in found.items() if owner == failed_owner),
        errors=len(errors),
        connections_leaked=leaked,
        distinct_sessions=len(holders),
        others_rows_discarded=sum(o.others_rows_discarded for o in outcomes),
        commits_to_another_session=sum(o.committed_another_session for o in outcomes),
        error_messages=sorted(set(errors)),
        sessions_never_closed=len(never_closed),
        sessions_still_registered=still_registered,
    )


def _rows_found(engine: Engine) -> dict[tuple[str, int], int]:
    """How many copies of each (owner, n) the table holds, read on a fresh connection."""
    query = select(DemoRow.owner, DemoRow.n, func.count()).group_by(DemoRow.owner, DemoRow.n)
    with engine.connect() as conn:
        return {(owner, n): count for owner, n, count in conn.execute(query)}
