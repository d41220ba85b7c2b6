"""The workload: the same small "request" run by every unit, whatever runs the units.

A request is written once, as a generator. Each ``yield`` is a point where a real request would wait
for something (a payment service, a mail server) and let other units run; the runner of each
concurrency model decides what waiting means (``time.sleep``, ``gevent.sleep(0)``,
``await asyncio.sleep(0)``). That keeps the three models honest: they run literally the same code.

The request follows what a web framework does around a handler: the handler uses ``Session()``;
the framework commits when it returns, rolls back when it raises, and (optionally) calls
``Session.remove()`` when the request ends. The outcome of each request is recorded for
:mod:`sessionscope.demo.measure`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

TABLE_NAME = "sessionscope_demo_rows"

ScopedSession = Any
"""A ``scoped_session`` (SQLAlchemy's or sessionscope's); both proxy the same Session API."""


class DemoBase(DeclarativeBase):
    """The demo's own metadata, so it never touches an application's tables."""


class DemoRow(DemoBase):
    """One row written by one request: ``owner`` names the request, ``n`` numbers its rows."""

    __tablename__ = TABLE_NAME
    id: Mapped[int] = mapped_column(primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    n: Mapped[int]


class RecordingSession(Session):
    """A plain Session that remembers whether anyone closed it (SQLAlchemy has no close event)."""

    was_closed = False

    def close(self) -> None:
        self.was_closed = True
        super().close()


class DeliberateFailure(Exception):
    """Raised by the one request that is meant to fail (think: the payment was declined)."""


@dataclass(frozen=True)
class Plan:
    """How many requests run at once, how many rows each writes, and which one fails."""

    units: int
    rows_per_unit: int

    @property
    def failing_unit(self) -> int:
        """The request in the middle fails: others have pending rows both before and after it."""
        return self.units // 2

    def owner(self, unit: int) -> str:
        return f"request-{unit:02d}"

    def expected_rows(self, unit: int) -> int:
        return 0 if unit == self.failing_unit else self.rows_per_unit


@dataclass
class Outcome:
    """What one request saw while it ran."""

    session: RecordingSession | None = None
    """The Session its handler got from ``Session()``; kept alive so identities stay unique."""
    errors: list[str] = field(default_factory=list)
    """Unexpected exceptions (the deliberate failure is not one), as ``"Type: message"``."""
    others_rows_discarded: int = 0
    """For the failing request: pending rows of *other* requests its rollback threw away."""
    committed_another_session: bool = False
    """Its commit went to a different Session than the one its rows were added to."""


def handle(Session: ScopedSession, plan: Plan, unit: int, outcome: Outcome) -> Iterator[None]:
    """The application's handler: write this request's rows, wait twice, maybe fail in between."""
    session = Session()
    outcome.session = session
    session.add_all([DemoRow(owner=plan.owner(unit), n=n) for n in range(plan.rows_per_unit)])
    yield  # waiting for the payment service
    if unit == plan.failing_unit:
        raise DeliberateFailure(f"{plan.owner(unit)}: payment declined")
    yield  # waiting for the mail server


def serve(
    Session: ScopedSession, plan: Plan, unit: int, outcome: Outcome, *, remove_at_end: bool
) -> Iterator[None]:
    """The framework around :func:`handle`: commit, or roll back on error; maybe remove at the end.

    ``remove_at_end`` is what a typical SQLAlchemy application does (a teardown hook calling
    ``Session.remove()``); sessionscope's column runs without it to show that the session of a unit
    is closed when the unit ends anyway.
    """
    try:
        yield from handle(Session, plan, unit, outcome)
        outcome.committed_another_session = Session() is not outcome.session
        Session.commit()
    except DeliberateFailure:
        outcome.others_rows_discarded = _pending_rows_of_others(Session(), plan.owner(unit))
        _record_errors(outcome, Session.rollback)
    except Exception as exc:  # noqa: BLE001 - every unexpected error is a finding of the demo
        outcome.errors.append(_describe(exc))
        _record_errors(outcome, Session.rollback)
    finally:
        if remove_at_end:
            _record_errors(outcome, Session.remove)


def _pending_rows_of_others(session: Session, owner: str) -> int:
    return sum(1 for obj in session.new if isinstance(obj, DemoRow) and obj.owner != owner)


def _record_errors(outcome: Outcome, action: Callable[[], object]) -> None:
    """Run a cleanup step; if it fails, that is a finding too, not a reason to crash the unit."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001
        outcome.errors.append(_describe(exc))


def _describe(exc: BaseException) -> str:
    """``"Type: first line of the message"``, without SQLAlchemy's background link."""
    lines = str(exc).strip().splitlines()
    message = _BACKGROUND_LINK.sub("", lines[0]).strip() if lines else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


_BACKGROUND_LINK = re.compile(r"\s*\(Background on this error at: [^)]*\)")
