"""``with Session.scope():`` against a hand-written ``with sessionmaker() as s:``, per request.

    python benchmarks/per_request.py            # full run (about 30 s)
    python benchmarks/per_request.py --quick    # noisier
    python benchmarks/per_request.py --smoke    # only checks the code works
    python benchmarks/per_request.py --json out.json
    python benchmarks/per_request.py -k sqlite  # only the cases whose label has "sqlite"
    python benchmarks/per_request.py --cpu      # the benchmark thread's CPU time, not wall time

One operation is one light ORM request, the same on every side: a fresh session, ``get()`` of an
item by primary key (a fresh session always reaches the database), a small ``select`` (5 rows),
a commit, the session closed. Three contenders, each with a sessionmaker of its own on one
shared engine, timed in one fresh thread in interleaved rounds (the order rotates: A B C, B C A,
C A B), ns per request the median of rounds, ratios the medians of per-round ratios:

- ``by hand``: ``with plain() as s: s.get(...); s.scalars(...).all(); s.commit()``;
- ``scope``: ``with Scoped.scope() as s: s.get(...); s.scalars(...).all()`` (the scope commits
  and closes), ``Scoped = sessionscope.scoped_session(sessionmaker(engine))``: the guard on;
- ``scope, guard=off``: the same registry made with ``guard="off"``.

The bar (issue 14): ``scope`` at most 1.03x ``by hand``, on a SQLite file and on PostgreSQL
(``BENCH_PG_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``, in a schema of its
own, dropped at the end; the case is skipped when the server is not reachable).

``--cpu`` times with the thread's CPU clock (``time.thread_time_ns``): steadier on a loaded
machine, and it leaves out the time spent waiting for the server (so on PostgreSQL it is the
stricter ratio: the client's own work only).

Checked before timing: one request of each contender is counted through engine events
(statements, commits), and all must count the same; the guarded contender's session must refuse
another thread.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from _envs import in_thread
from _timing import FULL, QUICK, SMOKE, Comparison, Settings, _timed, calibrate, compile_loop
from sqlalchemy import Engine, String, create_engine, event, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

import sessionscope

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ITEMS = 100
SELECTED = 5
SAMPLE_SCALE = 5
"""A request takes tens of µs: samples are this many times longer than the lookup cases'."""

BY_HAND, SCOPE, SCOPE_OFF = "by hand", "scope", "scope, guard=off"
PAIRS = ((SCOPE, BY_HAND), (SCOPE_OFF, BY_HAND), (SCOPE, SCOPE_OFF))
TARGET = 1.03


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_request_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


def _seed(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(Item(id=n, name=f"item {n}") for n in range(1, ITEMS + 1))


@contextmanager
def sqlite_file() -> Iterator[Engine]:
    with tempfile.TemporaryDirectory() as directory:
        engine = create_engine(f"sqlite:///{directory}/per_request.db")
        try:
            _seed(engine)
            yield engine
        finally:
            engine.dispose()


@contextmanager
def postgresql() -> Iterator[Engine]:
    schema = f"bench_request_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, poolclass=NullPool)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    engine = create_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")
    try:
        _seed(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'drop schema "{schema}" cascade'))
        admin.dispose()


def postgres_reachable() -> str | None:
    """None if PostgreSQL answers at ``PG_URL``, else why not."""
    try:
        engine = create_engine(PG_URL, poolclass=NullPool)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as error:  # no server, no driver
        return f"{type(error).__name__}: {error}"
    return None


DATABASES: dict[str, Callable[[], Any]] = {"SQLite file": sqlite_file, "PostgreSQL": postgresql}


# -- what is timed -------------------------------------------------------------------------------

_numbers = itertools.count()
_SMALL_SELECT = select(Item).where(Item.id <= SELECTED).order_by(Item.id)


def _read(session: Session) -> None:
    item = session.get(Item, next(_numbers) % ITEMS + 1)
    assert item is not None
    assert len(session.scalars(_SMALL_SELECT).all()) == SELECTED


def contenders(engine: Engine) -> dict[str, Callable[[], None]]:
    """One request of each contender, by name; each has a sessionmaker of its own."""
    plain = sessionmaker(engine)
    guarded = sessionscope.scoped_session(sessionmaker(engine))
    unguarded = sessionscope.scoped_session(sessionmaker(engine), guard="off")

    def by_hand() -> None:
        with plain() as session:
            _read(session)
            session.commit()

    def scope() -> None:
        with guarded.scope() as session:
            _read(session)

    def scope_off() -> None:
        with unguarded.scope() as session:
            _read(session)

    by_hand.maker = plain  # type: ignore[attr-defined]
    scope.maker = guarded.session_factory  # type: ignore[attr-defined]
    scope.registry = guarded  # type: ignore[attr-defined]
    scope_off.maker = unguarded.session_factory  # type: ignore[attr-defined]
    return {BY_HAND: by_hand, SCOPE: scope, SCOPE_OFF: scope_off}


@dataclass(frozen=True)
class Counted:
    """One request, counted by engine events."""

    statements: int
    commits: int


def count(engine: Engine, request: Callable[[], None]) -> Counted:
    statements: list[str] = []
    commits: list[bool] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    def on_commit(conn: Any) -> None:
        commits.append(True)

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine, "commit", on_commit)
    try:
        request()
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine, "commit", on_commit)
    return Counted(len(statements), len(commits))


def refuses_other_threads(registry: Any) -> bool:
    """Whether a session of ``registry``'s scope is refused to another thread."""
    refused: list[bool] = []
    with registry.scope(commit=False) as session:

        def other() -> None:
            try:
                session.get(Item, 1)
            except sessionscope.CrossUnitError:
                refused.append(True)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    return bool(refused)


def verify(label: str, engine: Engine, requests: dict[str, Callable[[], None]]) -> None:
    counted = {name: count(engine, request) for name, request in requests.items()}
    if len(set(counted.values())) != 1 or counted[BY_HAND] != Counted(2, 1):
        raise RuntimeError(f"{label}: the contenders did different work: {counted}")
    if not refuses_other_threads(requests[SCOPE].registry):  # type: ignore[attr-defined]
        raise RuntimeError(f"{label}: the guarded scope's session is not guarded")


@dataclass(frozen=True)
class Result:
    label: str
    rounds: dict[str, list[float]]  # contender -> ns per request, each round

    def comparison(self, candidate: str, anchor: str) -> Comparison:
        return Comparison(anchor=self.rounds[anchor], candidate=self.rounds[candidate])

    def median(self, contender: str) -> float:
        return statistics.median(self.rounds[contender])

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.label,
            "target_ratio": TARGET,
            "ns_per_request": {name: self.median(name) for name in self.rounds},
            "ratios": {
                f"{candidate}/{anchor}": self.comparison(candidate, anchor).as_dict()
                for candidate, anchor in PAIRS
            },
            "ns_rounds": self.rounds,
        }


def interleave(
    requests: dict[str, Callable[[], None]], settings: Settings, clock: Callable[[], int]
) -> dict[str, list[float]]:
    """ns per request of each contender per round; the order rotates each round."""
    loops = {name: compile_loop("S()", 1) for name in requests}  # a loop each: own bytecode
    for loop in loops.values():
        loop.__globals__["_clock"] = clock
    for name, request in requests.items():
        calibrate(loops[name], request, settings.warmup_ns)
    n = max(
        calibrate(loops[name], request, settings.sample_ns) for name, request in requests.items()
    )
    names = list(requests)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(settings.rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            rounds[name].append(_timed(loops[name], requests[name], n) / n)
    return rounds


def run_case(
    label: str, settings: Settings, clock: Callable[[], int] = time.perf_counter_ns
) -> Result:
    with DATABASES[label]() as engine:
        requests = contenders(engine)

        def body() -> dict[str, list[float]]:
            verify(label, engine, requests)
            longer = replace(settings, sample_ns=settings.sample_ns * SAMPLE_SCALE)
            return interleave(requests, longer, clock)

        return Result(label, in_thread(body, lambda: None, 0))


def line(result: Result) -> str:
    ns = "  ".join(f"{name} {result.median(name):8,.0f} ns" for name in result.rounds)
    ratios = "  ".join(
        f"{candidate}/{anchor} {c.ratio:.3f} (min/min {c.ratio_min:.3f})"
        for candidate, anchor in PAIRS
        for c in [result.comparison(candidate, anchor)]
    )
    flag = f"  > {TARGET:.2f} target" if result.comparison(SCOPE, BY_HAND).ratio > TARGET else ""
    return f"{result.label:<12} {ns}  {ratios}{flag}"


def markdown(results: Sequence[Result]) -> str:
    rows = [
        "| Database | by hand ns/request | scope ns/request | scope, guard=off ns/request "
        "| scope / by hand | guard=off / by hand |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.label} | {r.median(BY_HAND):,.0f} | {r.median(SCOPE):,.0f} "
            f"| {r.median(SCOPE_OFF):,.0f} | {r.comparison(SCOPE, BY_HAND).ratio:.3f} "
            f"| {r.comparison(SCOPE_OFF, BY_HAND).ratio:.3f} |"
        )
    return "\n".join(rows)


def guard_checks_in_c() -> bool:
    """Whether sessionscope's guard checks run in its C module (built, and not turned off)."""
    from sessionscope._guard import _checks

    return _checks.IN_C


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, shorter samples (noisier)")
    size.add_argument("--smoke", action="store_true", help="tiny run: only checks the code works")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    parser.add_argument("-k", metavar="TEXT", help="only databases whose label contains TEXT")
    parser.add_argument("--cpu", action="store_true", help="time with the thread's CPU clock")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    clock = time.thread_time_ns if args.cpu else time.perf_counter_ns
    print(
        f"One light ORM request (get, select of {SELECTED} rows, commit) per operation;"
        f" {settings.rounds} interleaved rounds; ns per request = median of rounds"
        f" ({'thread CPU time' if args.cpu else 'wall time'}); ratio = median of per-round"
        f" ratios; the guard's checks in {'C' if guard_checks_in_c() else 'Python'}\n"
    )
    results = []
    for label in DATABASES:
        if args.k and args.k.lower() not in label.lower():
            continue
        if label == "PostgreSQL":
            reason = postgres_reachable()
            if reason:
                print(f"{label:<12} skipped: {reason}")
                continue
        results.append(run_case(label, settings, clock))
        print(line(results[-1]), flush=True)
    table = markdown(results)
    print(f"\n{table}")
    if args.json:
        report = {
            "clock": "cpu" if args.cpu else "wall",
            "results": [r.as_dict() for r in results],
            "markdown": table,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
