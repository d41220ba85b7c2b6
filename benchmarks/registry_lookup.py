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
from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker, create_async_engine
from sqlalchemy.orm import scoped_session, sessionmaker

import sessionscope

# Sessions never touch the database here: only the registry lookup and the proxy are measured.
SESSION_FACTORY = sessionmaker(create_engine("sqlite://"))
ASYNC_SESSION_FACTORY = async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))


@dataclass(frozen=True)
class Registries:
    """SQLAlchemy's registry class, sessionscope's drop-in for it, the factory both are given."""

    sqlalchemy: Callable[..., Any]
    sessionscope: Callable[..., Any]
    factory: Callable[[], Any]
    target: float  # from the issue: the highest acceptable ratio sessionscope / SQLAlchemy


SYNC = Registries(scoped_session, sessionscope.scoped_session, SESSION_FACTORY, 1.5)
ASYNC = Registries(
    async_scoped_session, sessionscope.async_scoped_session, ASYNC_SESSION_FACTORY, 1.25
)


@dataclass(frozen=True)
class Contest:
    """The anchor (SQLAlchemy as people use it for this unit) against sessionscope's default."""

    anchor: str
    registries: Registries
    scopefunc: Callable[[], Any] | None

    def make_anchor(self) -> Any:
        return self.registries.sqlalchemy(self.registries.factory, scopefunc=self.scopefunc)

    def make_candidate(self) -> Any:
        return self.registries.sessionscope(self.registries.factory)


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


THREAD_LOCAL = Contest("scoped_session (thread-local)", SYNC, None)
GREENLET = Contest("scopefunc=greenlet.getcurrent", SYNC, greenlet.getcurrent)
TASK = Contest("scopefunc=asyncio.current_task", SYNC, asyncio.current_task)
ASYNC_TASK = Contest("async_scoped_session(scopefunc=current_task)", ASYNC, asyncio.current_task)

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
    live = [
        ("Session()", "asyncio task", TASK),
        ("AsyncSession()", "asyncio task", ASYNC_TASK),
        ("Session()", "greenlet", GREENLET),
    ]
    cases += [
        Case(op, "S()", unit, contest, n) for op, unit, contest in live for n in live_unit_counts
    ]
    return cases


def run_case(case: Case, settings: Settings) -> Comparison:
    """Measure ``case`` inside a fresh unit while ``case.peers`` others hold sessions of both."""
    anchor, candidate = case.contest.make_anchor(), case.contest.make_candidate()

    def hold() -> None:
        anchor()
        candidate()

    def body() -> Comparison:
        return compare(anchor, candidate, case.expr, settings)

    result: Comparison = ENVS[case.unit](body, hold, case.peers)
    return result
