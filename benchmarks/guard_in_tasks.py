"""What the guard costs a call made by the asyncio task that owns the session: raise against off.

    python benchmarks/guard_in_tasks.py            # about 20 s
    python benchmarks/guard_in_tasks.py --smoke    # only checks the code works
    python benchmarks/guard_in_tasks.py --json out.json

``guard_overhead.py`` times the guard in a thread. In a task the owner's check has one more step
(the running task must be the one that opened the unit of work), and until this round it ran in
Python (``SessionGuard.admit()``) while a thread's ran in C. Each case here runs inside one
asyncio task that owns its sessions, on two registries side by side (``guard="raise"``, the
default, and ``guard="off"``), in interleaved rounds (A B, B A, ...); ns per call is the median
of rounds, the ratio the median of per-round ratios:

- ``session.get()`` answered from the identity map, on a ``Session`` used in the task;
- a write to an attribute of an object attached to it;
- ``await session.get()`` answered from the identity map, on an ``AsyncSession`` (aiosqlite).

Before timing, each guarded session is checked to refuse a task made before it (not a borrower).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import String, create_engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

import sessionscope

MODES = ("raise", "off")


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_task_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


Timed = Callable[[int], Awaitable[float]]
"""``timed(n)``: run the operation ``n`` times in the running task; ns per call."""


async def sync_cases(mode: str) -> tuple[dict[str, Timed], Callable[[], None]]:
    engine = create_engine(
        "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
    )
    Base.metadata.create_all(engine)
    registry = sessionscope.scoped_session(sessionmaker(engine), guard=mode)
    session = registry()
    item = Item(id=1, name="item")
    session.add(item)
    session.flush()

    async def get(n: int) -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            session.get(Item, 1)
        return (time.perf_counter_ns() - start) / n

    async def write(n: int) -> float:
        start = time.perf_counter_ns()
        for i in range(n):
            item.name = "renamed" if i % 2 else "item"
        return (time.perf_counter_ns() - start) / n

    def close() -> None:
        registry.remove()
        engine.dispose()

    return {"session.get(), identity-map hit": get, "attribute write": write}, close


async def async_cases(mode: str) -> tuple[dict[str, Timed], Callable[[], Awaitable[None]]]:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=StaticPool)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    registry = sessionscope.async_scoped_session(async_sessionmaker(engine), guard=mode)
    session = registry()
    session.add(Item(id=1, name="item"))
    await session.flush()
    item = await session.get(Item, 1)

    async def get(n: int) -> float:
        assert item is not None  # (kept alive here: the identity map holds it weakly)
        start = time.perf_counter_ns()
        for _ in range(n):
            await session.get(Item, 1)
        return (time.perf_counter_ns() - start) / n

    async def close() -> None:
        await registry.remove()
        await engine.dispose()

    return {"await AsyncSession.get(), identity-map hit": get}, close


async def verify(mode: str) -> None:
    """The guarded contender's sessions refuse a task made before them (its context predates
    the session: not a borrower); ``off`` ones do not."""
    engine = create_engine("sqlite://")
    registry = sessionscope.scoped_session(sessionmaker(engine), guard=mode)
    handed: list[Any] = []
    gate = asyncio.Event()
    outcome: list[bool] = []

    async def earlier() -> None:
        await gate.wait()
        try:
            handed[0].connection()
            outcome.append(False)
        except sessionscope.CrossUnitError:
            outcome.append(True)

    task = asyncio.create_task(earlier())
    handed.append(registry())
    gate.set()
    await task
    refused = outcome == [True]
    registry.remove()
    engine.dispose()
    if refused != (mode == "raise"):
        raise RuntimeError(f"guard={mode!r}: a task made before the session was refused={refused}")


async def measure(calls: int, rounds: int) -> list[dict[str, Any]]:
    for mode in MODES:
        await verify(mode)
    made = {mode: await sync_cases(mode) for mode in MODES}
    made_async = {mode: await async_cases(mode) for mode in MODES}
    cases: dict[str, dict[str, Timed]] = {}
    for mode in MODES:
        for name, timed in {**made[mode][0], **made_async[mode][0]}.items():
            cases.setdefault(name, {})[mode] = timed
    rows = []
    for name, timers in cases.items():
        for timed in timers.values():  # warm up
            await timed(max(calls // 10, 1))
        samples: dict[str, list[float]] = {mode: [] for mode in MODES}
        for i in range(rounds):
            for mode in MODES if i % 2 == 0 else tuple(reversed(MODES)):
                samples[mode].append(await timers[mode](calls))
        ratio = statistics.median(
            r / o for r, o in zip(samples["raise"], samples["off"], strict=True)
        )
        rows.append(
            {
                "case": name,
                "ns_per_call": {mode: statistics.median(v) for mode, v in samples.items()},
                "ratio": ratio,
            }
        )
    for mode in MODES:
        made[mode][1]()
        await made_async[mode][1]()
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    out = [
        '| Call, in the owning task | `guard="raise"` ns | `guard="off"` ns | raise / off |',
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        ns = row["ns_per_call"]
        out.append(
            f"| {row['case']} | {ns['raise']:,.0f} | {ns['off']:,.0f} | {row['ratio']:.3f} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run: only checks the code works")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    calls, rounds = (20, 2) if args.smoke else (20_000, 15)
    print(f"ns per call in the task owning the session; {rounds} interleaved rounds\n")
    rows = asyncio.run(measure(calls, rounds))
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"results": rows, "markdown": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
