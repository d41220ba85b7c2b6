"""The registry-lookup cases: SQLAlchemy's usual ``scoped_session`` for a unit vs sessionscope's.

A case is an operation (an expression over ``S``), a kind of unit to run it in, how many other
units of that kind are alive holding sessions, and a contest: how to build the two contenders.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import greenlet
from _envs import ENVS
from _timing import Comparison, Settings, compare
from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

import sessionscope

# Sessions never touch the database here: only the registry lookup and the proxy are measured.
SESSION_FACTORY = sessionmaker(create_engine("sqlite://"))


@dataclass(frozen=True)
class Contest:
    """The anchor (SQLAlchemy as people use it for this unit) against sessionscope's default."""

    anchor: str
    make: Callable[[], tuple[Any, Any]]
    missing: str | None = None  # why sessionscope cannot take part (yet), if it cannot


@dataclass(frozen=True)
class Case:
    op: str
    expr: str
    unit: str
    contest: Contest
    peers: int = 0

    @property
    def where(self) -> str:
        return f"{self.unit}, {self.peers:,} live" if self.peers else self.unit


def _scopefunc_contest(label: str, scopefunc: Callable[[], Any] | None) -> Contest:
    def make() -> tuple[Any, Any]:
        anchor = scoped_session(SESSION_FACTORY, scopefunc=scopefunc)
        return anchor, sessionscope.scoped_session(SESSION_FACTORY)

    return Contest(label, make)


def _async_contest() -> Contest:
    label = "async_scoped_session(scopefunc=current_task)"
    candidate = getattr(sessionscope, "async_scoped_session", None)
    if candidate is None:
        return Contest(label, lambda: (None, None), "sessionscope.async_scoped_session not found")

    def make() -> tuple[Any, Any]:
        from sqlalchemy.ext.asyncio import (
            async_scoped_session,
            async_sessionmaker,
            create_async_engine,
        )

        factory = async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))
        anchor = async_scoped_session(factory, scopefunc=asyncio.current_task)
        return anchor, candidate(factory)

    return Contest(label, make)


THREAD_LOCAL = _scopefunc_contest("scoped_session (thread-local)", None)
GREENLET = _scopefunc_contest("scopefunc=greenlet.getcurrent", greenlet.getcurrent)
TASK = _scopefunc_contest("scopefunc=asyncio.current_task", asyncio.current_task)
ASYNC_TASK = _async_contest()

SYNC_OPS = (
    ("Session()", "S()"),
    ("Session.info", "S.info"),
    ("Session.get_bind()", "S.get_bind()"),
)
ASYNC_OPS = (("AsyncSession()", "S()"), ("AsyncSession.info", "S.info"))
LIVE_UNIT_COUNTS = (10, 1_000, 10_000)


def build_cases(live_unit_counts: Sequence[int] = LIVE_UNIT_COUNTS) -> list[Case]:
    """Every case, in report order; ``live_unit_counts`` sizes the lookup-vs-live-units cases."""
    per_unit = [
        ("thread", 0, THREAD_LOCAL, SYNC_OPS),
        ("thread", 8, THREAD_LOCAL, SYNC_OPS),
        ("greenlet", 0, GREENLET, SYNC_OPS),
        ("gevent", 0, GREENLET, SYNC_OPS),
        ("asyncio task", 0, TASK, SYNC_OPS),
        ("asyncio task", 0, ASYNC_TASK, ASYNC_OPS),
    ]
    cases = [
        Case(op, expr, unit, contest, peers)
        for unit, peers, contest, ops in per_unit
        for op, expr in ops
    ]
    for unit, contest in (("asyncio task", TASK), ("greenlet", GREENLET)):
        cases += [Case("Session()", "S()", unit, contest, n) for n in live_unit_counts]
    return cases


def run_case(case: Case, settings: Settings) -> Comparison:
    """Measure ``case`` inside a fresh unit while ``case.peers`` others hold sessions of both."""
    if case.contest.missing:
        raise LookupError(case.contest.missing)
    anchor, candidate = case.contest.make()

    def hold() -> None:
        anchor()
        candidate()

    def body() -> Comparison:
        return compare(anchor, candidate, case.expr, settings)

    result: Comparison = ENVS[case.unit](body, hold, case.peers)
    return result
