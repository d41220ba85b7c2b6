"""The race sessionscope exists for, in-process: raw greenlets and asyncio tasks on one thread.

Thirty units each add their own rows, yield to the others between add and commit, and commit; one
of them fails and rolls back, as a failing request does. With SQLAlchemy's thread-local registry
they all share one Session: some see the others' pending objects and the failing one's rollback
throws away work that other units then believe committed. With sessionscope every row lands
exactly once. (gevent and eventlet, with monkey-patching, run in tests/test_green_frameworks.py.)
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import greenlet
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.orm import sessionmaker

import sessionscope
from tests.models import Row

UNITS, ROWS, FAILING = 30, 3, 7


@dataclass
class Outcome:
    sessions: list[Any] = field(default_factory=list)
    saw_foreign_pending: int = 0
    errors: list[str] = field(default_factory=list)


def request(Scoped: Any, name: str, outcome: Outcome) -> Iterator[None]:
    """One unit of work; each ``yield`` is where it waits and others run."""
    session = Scoped()
    outcome.sessions.append(session)
    Scoped.add_all([Row(owner=name, n=n) for n in range(ROWS)])
    yield
    if any(obj.owner != name for obj in Scoped.new):
        outcome.saw_foreign_pending += 1
    try:
        if name == f"u{FAILING}":
            raise RuntimeError("this request fails")
        yield
        Scoped.commit()
    except RuntimeError:
        Scoped.rollback()
    except Exception as error:  # noqa: BLE001 - a shared session fails in many ways
        outcome.errors.append(repr(error))


def run_greenlets(Scoped: Any, outcome: Outcome) -> None:
    """Round-robin scheduler: every greenlet runs up to its next yield, in turn."""

    def body(name: str) -> None:
        for _ in request(Scoped, name, outcome):
            greenlet.getcurrent().parent.switch()

    units = [greenlet.greenlet(body, None) for _ in range(UNITS)]
    names = {unit: f"u{i}" for i, unit in enumerate(units)}
    pending = [(unit, (names[unit],)) for unit in units]
    while pending:
        unit, args = pending.pop(0)
        unit.switch(*args)
        if not unit.dead:
            pending.append((unit, ()))


def run_tasks(Scoped: Any, outcome: Outcome) -> None:
    async def body(name: str) -> None:
        for _ in request(Scoped, name, outcome):
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(*(body(f"u{i}") for i in range(UNITS)))

    asyncio.run(main())


def committed_rows(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.scalars(select(Row.owner)).all())


EXPECTED = Counter({f"u{i}": ROWS for i in range(UNITS) if i != FAILING})
RUNNERS = pytest.mark.parametrize("run", [run_greenlets, run_tasks], ids=["greenlets", "asyncio"])


@RUNNERS
def test_sessionscope_every_row_lands_exactly_once(run: Any, engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    outcome = Outcome()
    run(Scoped, outcome)
    assert len({id(s) for s in outcome.sessions}) == UNITS  # all alive in the list: ids are sound
    assert outcome.saw_foreign_pending == 0 and outcome.errors == []
    assert committed_rows(engine) == EXPECTED
    assert len(Scoped.registry) == 0  # nobody called remove()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@RUNNERS
def test_sqlalchemy_thread_local_registry_shares_one_session_and_loses_rows(
    run: Any, engine: Engine
) -> None:
    Scoped = sa_scoped_session(sessionmaker(engine))
    outcome = Outcome()
    run(Scoped, outcome)
    Scoped.remove()
    rows = committed_rows(engine)
    assert len({id(s) for s in outcome.sessions}) == 1
    assert outcome.saw_foreign_pending > 0
    lost = sum((EXPECTED - rows).values())
    assert lost > 0, "the failing unit's rollback discarded others' pending rows"
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
