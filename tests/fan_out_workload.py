"""The work ``fan_out`` tests give each item, and the facts they check afterwards.

Shared by the in-process tests (threads, asyncio tasks) and the gevent scenario, which runs in a
fresh, monkey-patched interpreter (``tests/scenarios/fan_out_green.py``).

Each item is a ``Parent`` loaded in the caller's session. In its own unit, the item's function
finds the parent attached to its own session (received, without a SELECT), adds a ``Child``,
renames the parent (``+``), flushes, and commits unless the parent is one planted to fail (then it
raises after the flush). It returns the child (an ORM result shipped back) and how many objects
of *other* items its session holds (always 0 when units share nothing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy import Engine, event, func, insert, inspect, select, text

from tests.models import Base, Child, Parent

FAIL = "fail"


def seed(engine: Engine, count: int, fail_at: tuple[int, ...] = ()) -> None:
    """``count`` parents (ids 1..count), those at the positions ``fail_at`` planted to fail."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    names = [f"{FAIL}-{n}" if n - 1 in fail_at else f"p-{n}" for n in range(1, count + 1)]
    with engine.begin() as conn:
        conn.execute(insert(Parent), [{"id": n, "name": name} for n, name in enumerate(names, 1)])


def _others(session: Any, parent: Parent) -> int:
    mine = inspect(parent).key
    return sum(1 for key in session.identity_map if key != mine)


def sync_work(
    registry: Any, started: list[int] | None = None
) -> Callable[[Parent], tuple[Child, int]]:
    """``started``: as for :func:`async_work` (``list.append`` is atomic across threads)."""

    def work(parent: Parent) -> tuple[Child, int]:
        if started is not None:
            started.append(parent.id)
        session = registry()
        if parent not in session:
            raise AssertionError("the item did not arrive in the unit's own session")
        others = _others(session, parent)
        child = Child(name=f"child-of-{parent.id}", parent=parent)
        session.add(child)
        parent.name += "+"
        session.flush()
        if parent.name.startswith(FAIL):
            if started is not None:
                started.append(-len(started))
            raise ValueError(f"item {parent.id} failed after flushing")
        session.commit()
        return child, others

    return work


def async_work(
    registry: Any,
    hold: asyncio.Event | None = None,
    committed: list[int] | None = None,
    started: list[int] | None = None,
) -> Callable[[Parent], Coroutine[Any, Any, tuple[Child, int]]]:
    """``started``: the ids of the items as they start, in order; a planted failure appends
    ``-len(started)`` (how many had started when it failed) before it raises."""

    async def work(parent: Parent) -> tuple[Child, int]:
        if started is not None:
            started.append(parent.id)
        session = registry()
        if parent not in session:
            raise AssertionError("the item did not arrive in the task's own session")
        others = _others(session, parent)
        child = Child(name=f"child-of-{parent.id}", parent=parent)
        session.add(child)
        parent.name += "+"
        held = hold is not None and parent.id % 2 == 0
        # SQLite has one writer at a time: an item holding a flush would lock the others out
        flush_first = session.bind.dialect.name != "sqlite"
        if held and not flush_first:
            await hold.wait()  # cancelled here: its pending child must not land
        await session.flush()
        if held and flush_first:
            await hold.wait()  # cancelled here: its flushed child must not land
        if parent.name.startswith(FAIL):
            if started is not None:
                started.append(-len(started))
            raise ValueError(f"item {parent.id} failed after flushing")
        await session.commit()
        if committed is not None:
            committed.append(parent.id)
        return child, others

    return work


class Selects:
    """Counts SELECTs an engine sends while the block runs (shipping in and back sends none)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.count = 0

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            self.count += 1

    def __enter__(self) -> Selects:
        event.listen(self.engine, "before_cursor_execute", self._seen)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


def stored(engine: Engine) -> dict[str, Any]:
    """What landed: children per parent, renamed parents, idle-in-transaction backends."""
    with engine.connect() as conn:
        per_parent = dict(
            conn.execute(select(Child.parent_id, func.count()).group_by(Child.parent_id)).all()  # type: ignore[arg-type]
        )
        renamed = set(conn.execute(select(Parent.id).where(Parent.name.like("%+"))).scalars())
        idle = 0
        if engine.dialect.name == "postgresql":
            idle = conn.execute(
                text(
                    "select count(*) from pg_stat_activity where pid <> pg_backend_pid() "
                    "and application_name = current_setting('application_name') "
                    "and state like 'idle in transaction%'"
                )
            ).scalar_one()
    return {"children": per_parent, "renamed": renamed, "idle_in_transaction": idle}
