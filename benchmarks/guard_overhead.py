"""What the share-nothing guard costs: ``guard="raise"`` against ``guard="off"``, side by side.

The contenders are three registries over the same kind of database: sessionscope's
``scoped_session(maker, guard="raise")`` (the default), the same with ``guard="off"``, and
SQLAlchemy's own thread-local ``scoped_session(maker)``, each with a sessionmaker of its own on one
shared in-memory SQLite database (separate databases made the first one built ~1% faster than
the others). Every case times an operation (a statement over ``S``) on all three in interleaved
rounds, inside one fresh thread:

- a unit of work: new session, add, flush, get (identity-map hit and miss), lazy loads both ways,
  attribute writes (scalar and collection append), a select, commit, ``remove()``;
- single calls with no I/O, where the guard's share is largest: ``session.get()`` answered from
  the identity map, a write to an attribute of an attached object, ``Session()`` + ``remove()``;
- the handles a session gives out, per call: a 1,000-row result iterated (ns per row, the
  statement included) and fetched row by row with ``fetchone()`` (a check per row), and
  ``session.connection().execute(select 1)`` (ns per call).

The checks on writes to mapped attributes are process-wide: once any session has been guarded,
every write to a mapped attribute is checked where SQLAlchemy's attribute implementations make it,
and for objects of unguarded sessions (``"off"``, SQLAlchemy's) the check returns after a dict
lookup. So in this process the ``"off"`` and SQLAlchemy contenders pay for them too. The *listener
cases* (named for the attribute events that did this before) show that share: ``guard="off"`` in
a worker process where the guard was never used (no write checks) against a worker where it was,
interleaved the same way.

Before a contender is timed it is checked: one unit of work is counted through engine and session
events (statements, lazy loads, commits, rows added), its session is used from another thread
(only ``"raise"`` may refuse), and whether writes to ``Book.title`` are checked is looked at. A
contender that did not do the work, or a guard that is not on (or not off), stops the benchmark.

Run as ``python guard_overhead.py --worker never|used`` it is such a worker: it answers requests
on stdin (one JSON object a line) with one JSON line on stdout.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from _envs import in_thread
from _timing import Comparison, Settings, _timed, calibrate, compile_loop
from sqlalchemy import ForeignKey, String, create_engine, event, func, select, text
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    scoped_session,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool

import sessionscope

# -- the models and the database -----------------------------------------------------------------


class Base(DeclarativeBase):
    """The benchmark's own models, apart from the tests' (``tests/models.py``)."""


class Author(Base):
    __tablename__ = "bench_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    books: Mapped[list[Book]] = relationship(back_populates="author")


class Book(Base):
    __tablename__ = "bench_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    author_id: Mapped[int] = mapped_column(ForeignKey("bench_authors.id"), index=True)
    author: Mapped[Author] = relationship(back_populates="books")


SEED_AUTHORS = 50
BOOKS_PER_AUTHOR = 4
SEED_BOOKS = SEED_AUTHORS * BOOKS_PER_AUTHOR


class Database:
    """An in-memory SQLite database (one connection, used from any thread), seeded."""

    def __init__(self) -> None:
        self.engine = create_engine(
            "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
        Base.metadata.create_all(self.engine)
        with Session(self.engine) as session:
            session.add_all(
                Author(
                    name=f"author {a}",
                    books=[Book(title=f"book {a}.{b}") for b in range(BOOKS_PER_AUTHOR)],
                )
                for a in range(SEED_AUTHORS)
            )
            session.commit()

    def new_maker(self) -> sessionmaker[Session]:
        """A sessionmaker of its own, for one contender."""
        return sessionmaker(self.engine)

    def rows(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                table.name: conn.scalar(select(func.count()).select_from(table)) or 0
                for table in Base.metadata.sorted_tables
            }


# -- what is timed -------------------------------------------------------------------------------


class UnitOfWork:
    """One request's worth of ORM work through a registry; each call runs one, in a new session.

    The values written are new every time (one counter for all contenders, which share the
    database), so every unit flushes the same UPDATEs; the seed row it reads changes too, and is
    never in the (new) session's identity map.
    """

    numbers = itertools.count(1)

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def __call__(self) -> None:
        n = next(self.numbers)
        session = self.registry()
        author = Author(name=f"new {n}", books=[Book(title=f"new {n}.{b}") for b in range(3)])
        session.add(author)  # its books cascade
        session.flush()  # INSERT the author, then its books
        session.get(Author, author.id)  # identity-map hit: no SQL
        book = session.get(Book, n % SEED_BOOKS + 1)  # a miss: SELECT
        seed_author = book.author  # lazy many-to-one: SELECT
        # lazy one-to-many: SELECT; then a lazy many-to-one answered from the identity map
        assert seed_author.books[-1].author is seed_author
        author.name = f"renamed {n}"  # attribute writes on attached objects
        book.title = f"title {n}"
        author.books.append(Book(title=f"new {n}.3"))  # collection append (and backref set)
        # autoflush (INSERT the new book, UPDATE author and book), then SELECT
        session.scalars(select(Book).where(Book.author_id == author.id)).all()
        session.commit()
        self.registry.remove()


@dataclass(frozen=True)
class Subject:
    """What ``S`` is bound to in a case's loop, and what must stay alive meanwhile."""

    value: Any
    keep: tuple[Any, ...] = ()  # the identity map holds objects weakly


def unit_of_work(registry: Any) -> Subject:
    return Subject(UnitOfWork(registry))


def identity_hit(registry: Any) -> Subject:
    session = registry()
    return Subject(session, keep=(session.get(Author, 1),))


def attached_object(registry: Any) -> Subject:
    session = registry()
    return Subject(session.get(Author, 1), keep=(session,))


def no_session(registry: Any) -> Subject:
    registry.remove()
    return Subject(registry)


def own_session(registry: Any) -> Subject:
    return Subject(registry())


RESULT_ROWS = 1_000
NAMES = {
    "Author": Author,
    "Book": Book,
    # RESULT_ROWS rows computed by SQLite itself: the statement is cheap, the rows are the cost
    "ROWS": text(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c"
        f" WHERE x < {RESULT_ROWS}) SELECT x FROM c"
    ),
    "SELECT_1": text("SELECT 1"),
}
"""The names the cases' statements use."""


@dataclass(frozen=True)
class GuardCase:
    """A statement over ``S`` and how to bind ``S`` from a registry.

    ``listener`` cases compare ``guard="off"`` in two worker processes (the guard never used /
    used) instead of the three registries in this process.
    """

    op: str
    expr: str
    subject: Callable[[Any], Subject]
    per: str = "call"
    rows: int = 1  # what one statement does RESULT_ROWS times: ns are per row
    listener: bool = False
    target: float | None = None  # from the issue: the highest acceptable raise / off ratio
    aim: float | None = None

    @property
    def label(self) -> str:
        return f"guard listener: {self.op}" if self.listener else f"guard: {self.op}"

    @property
    def is_workload(self) -> bool:
        return self.per == "unit of work"


WORKLOAD_OP = "unit of work (ORM, SQLite)"
CASES = (
    GuardCase(WORKLOAD_OP, "S()", unit_of_work, per="unit of work", target=1.10, aim=1.03),
    GuardCase("session.get(), identity-map hit", "S.get(Author, 1)", identity_hit),
    GuardCase("attribute write, attached object", "S.name = 'x'", attached_object),
    GuardCase("Session() then remove()", "S(); S.remove()", no_session),
    GuardCase(
        "result iteration, 1,000 rows",
        "for _ in S.execute(ROWS): pass",
        own_session,
        per="row",
        rows=RESULT_ROWS,
    ),
    GuardCase(
        "result fetchone(), 1,000 rows",
        "for _ in iter(S.execute(ROWS).fetchone, None): pass",
        own_session,
        per="row",
        rows=RESULT_ROWS,
    ),
    GuardCase("connection().execute(select 1)", "S.connection().execute(SELECT_1)", own_session),
    GuardCase("unit of work, guard='off'", "S()", unit_of_work, "unit of work", listener=True),
    GuardCase("attribute write, guard='off'", "S.name = 'x'", attached_object, listener=True),
)

# The contenders of the cases in this process, and of the listener cases (worker processes).
RAISE, OFF, SQLALCHEMY = "raise", "off", "sqlalchemy"
NEVER, USED = "never guarded", "guard used"
MakeRegistry = Callable[[sessionmaker[Session]], Any]
REGISTRIES: dict[str, MakeRegistry] = {
    RAISE: lambda maker: sessionscope.scoped_session(maker, guard="raise"),
    OFF: lambda maker: sessionscope.scoped_session(maker, guard="off"),
    SQLALCHEMY: scoped_session,
}
WORKERS = {NEVER: "never", USED: "used"}
# (candidate, anchor) ratios reported, the headline first
PAIRS = ((RAISE, OFF), (RAISE, SQLALCHEMY), (OFF, SQLALCHEMY))
LISTENER_PAIRS = ((USED, NEVER),)

WORKLOAD_SAMPLE_SCALE = 5
"""A unit of work takes milliseconds: its samples are this many times longer, not unrolled."""


def settings_for(case: GuardCase, settings: Settings) -> Settings:
    if case.is_workload:
        return replace(settings, unroll=1, sample_ns=settings.sample_ns * WORKLOAD_SAMPLE_SCALE)
    return settings


# -- checks before timing ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkDone:
    """One unit of work, counted by events: SQL statements by verb, lazy loads, rows added."""

    statements: dict[str, int]
    relationship_loads: int
    commits: int
    rows_added: dict[str, int]


# what every unit of work does: lazy loads that reach the database, commits, rows added
EXPECTED_WORK = (2, 1, {"bench_authors": 1, "bench_books": 4})


def count_work(work: UnitOfWork, database: Database, maker: sessionmaker[Session]) -> WorkDone:
    """Run ``work`` once with listeners on the engine and its sessionmaker, then remove them."""
    statements: Counter[str] = Counter()
    loads: list[bool] = []
    commits: list[object] = []

    def on_statement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements[statement.split(None, 1)[0].upper()] += 1

    listeners: list[tuple[Any, str, Callable[..., None]]] = [
        (database.engine, "before_cursor_execute", on_statement),
        (database.engine, "commit", commits.append),
        (maker, "do_orm_execute", lambda state: loads.append(state.is_relationship_load)),
    ]
    before = database.rows()
    for target, name, fn in listeners:
        event.listen(target, name, fn)
    try:
        work()
    finally:
        for target, name, fn in listeners:
            event.remove(target, name, fn)
    after = database.rows()
    return WorkDone(
        statements=dict(sorted(statements.items())),
        relationship_loads=sum(loads),
        commits=len(commits),
        rows_added={table: after[table] - before[table] for table in after},
    )


def refuses_other_threads(registry: Any) -> bool:
    """Whether the running unit's session refuses a call from another thread (it is guarded)."""
    session = registry()
    refused: list[bool] = []

    def other() -> None:
        try:
            session.expire_all()
        except sessionscope.CrossUnitError:
            refused.append(True)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    return bool(refused)


def write_checks() -> int:
    """1 if writes to ``Book.title`` are checked (the guard was used in the process), else 0."""
    return int(getattr(type(Book.title.impl).set, "_sessionscope_checked", False))


@dataclass(frozen=True)
class Check:
    """What a contender was seen to do before it was timed."""

    guarded: bool  # its session refused another thread
    write_checks: int
    work: WorkDone | None  # the unit of work cases only

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Check:
        work = d["work"] and WorkDone(**d["work"])
        return cls(d["guarded"], d["write_checks"], work)


def verify(case: GuardCase, checks: Mapping[str, Check]) -> None:
    """Stop the benchmark if a contender did not do the work, or is not guarded as it should."""
    problems = []
    works = {name: check.work for name, check in checks.items()}
    if case.is_workload:
        first = next(iter(works.values()))
        if first is None or any(work != first for work in works.values()):
            problems.append(f"the contenders did different work: {works}")
        elif (first.relationship_loads, first.commits, first.rows_added) != EXPECTED_WORK:
            problems.append(f"a unit of work did not do what it should: {first}")
    guarded = {name: check.guarded for name, check in checks.items()}
    if guarded != {name: name == RAISE for name in checks}:
        problems.append(f"only guard='raise' should refuse another thread: {guarded}")
    listeners = {name: check.write_checks for name, check in checks.items()}
    if any(bool(n) != (name != NEVER) for name, n in listeners.items()):
        problems.append(f"write checks in all but the {NEVER!r} worker expected: {listeners}")
    if problems:
        raise RuntimeError(f"{case.label}: " + "; ".join(problems))


# -- samplers and interleaved rounds -------------------------------------------------------------


class Sampler(Protocol):
    def calibrate(self, target_ns: int) -> int: ...

    def sample(self, n: int) -> float:
        """ns per operation over ``n`` iterations of the loop."""
        ...


class LocalSampler:
    """A case's loop over one registry, in the running unit (which owns the sessions made)."""

    def __init__(
        self, case: GuardCase, make_registry: MakeRegistry, database: Database, unroll: int
    ) -> None:
        maker = database.new_maker()
        registry = make_registry(maker)
        guarded = refuses_other_threads(registry)
        self.subject = case.subject(registry)
        work = None
        if isinstance(self.subject.value, UnitOfWork):
            work = count_work(self.subject.value, database, maker)
        self.check = Check(guarded, write_checks(), work)
        # A loop of its own, so that its specialised bytecode only ever sees this contender.
        self.loop = compile_loop(case.expr, unroll)
        self.loop.__globals__.update(NAMES)
        self.unroll = unroll
        self.ops = unroll * case.rows  # per sample iteration

    def calibrate(self, target_ns: int) -> int:
        return calibrate(self.loop, self.subject.value, target_ns)

    def sample(self, n: int) -> float:
        return _timed(self.loop, self.subject.value, n) / (n * self.ops)


def interleave(samplers: Mapping[str, Sampler], settings: Settings) -> dict[str, list[float]]:
    """ns/op of each sampler per round; the order rotates each round (A B C, B C A, C A B)."""
    for sampler in samplers.values():  # calibrate() runs the loop once at least: warms up
        sampler.calibrate(settings.warmup_ns)
    n = max(sampler.calibrate(settings.sample_ns) for sampler in samplers.values())
    names = list(samplers)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(settings.rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            rounds[name].append(samplers[name].sample(n))
    return rounds


@dataclass(frozen=True)
class GuardResult:
    case: GuardCase
    rounds: dict[str, list[float]]  # contender -> ns/op of each round
    checks: dict[str, Check]

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return LISTENER_PAIRS if self.case.listener else PAIRS

    def comparison(self, candidate: str, anchor: str) -> Comparison:
        return Comparison(anchor=self.rounds[anchor], candidate=self.rounds[candidate])

    def median(self, contender: str) -> float:
        return statistics.median(self.rounds[contender])

    @property
    def headline(self) -> Comparison:
        return self.comparison(*self.pairs[0])

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.label,
            "per": self.case.per,
            "target_ratio": self.case.target,
            "aim_ratio": self.case.aim,
            "ns_median": {name: self.median(name) for name in self.rounds},
            "ratios": {
                f"{candidate}/{anchor}": self.comparison(candidate, anchor).as_dict()
                for candidate, anchor in self.pairs
            },
            "checks": {name: asdict(check) for name, check in self.checks.items()},
            "ns_rounds": self.rounds,
        }


def run_local(case: GuardCase, settings: Settings) -> GuardResult:
    """The three registries over one database, in one fresh thread."""
    settings = settings_for(case, settings)

    def body() -> GuardResult:
        database = Database()
        samplers = {
            name: LocalSampler(case, make_registry, database, settings.unroll)
            for name, make_registry in REGISTRIES.items()
        }
        checks = {name: sampler.check for name, sampler in samplers.items()}
        verify(case, checks)
        return GuardResult(case, interleave(samplers, settings), checks)

    return in_thread(body, lambda: None, 0)


# -- worker processes: the listener cases --------------------------------------------------------


class Worker:
    """A ``python guard_overhead.py --worker ...`` process, asked one JSON line at a time."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", variant],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},  # the two differ by their listeners only
        )

    def ask(self, **request: Any) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker {self.variant!r} ended (its traceback is above)")
        return json.loads(line)["answer"]

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class WorkerSampler:
    def __init__(self, worker: Worker, case: GuardCase, unroll: int) -> None:
        self.worker, self.key = worker, {"case": case.op, "unroll": unroll}
        self.check = Check.from_dict(worker.ask(prepare=True, **self.key))

    def calibrate(self, target_ns: int) -> int:
        n: int = self.worker.ask(calibrate=target_ns, **self.key)
        return n

    def sample(self, n: int) -> float:
        ns: float = self.worker.ask(sample=n, **self.key)
        return ns


def run_in_workers(
    case: GuardCase, settings: Settings, workers: Mapping[str, Worker]
) -> GuardResult:
    settings = settings_for(case, settings)
    samplers = {name: WorkerSampler(w, case, settings.unroll) for name, w in workers.items()}
    checks = {name: sampler.check for name, sampler in samplers.items()}
    verify(case, checks)
    return GuardResult(case, interleave(samplers, settings), checks)


def run_cases(cases: Sequence[GuardCase], settings: Settings) -> Iterator[GuardResult]:
    """Each case's result as it comes; the workers start with the first listener case."""
    workers: dict[str, Worker] = {}
    try:
        for case in cases:
            if not case.listener:
                yield run_local(case, settings)
                continue
            if not workers:
                workers = {name: Worker(variant) for name, variant in WORKERS.items()}
            yield run_in_workers(case, settings, workers)
    finally:
        for worker in workers.values():
            worker.close()


def serve(variant: str) -> None:
    """The worker: ``guard="off"`` sessions, in a process where the guard was used or never."""
    if variant == WORKERS[USED]:
        sessionscope.guard(Session(), "raise").close()  # installs the write checks for good
    cases = {case.op: case for case in CASES if case.listener}
    samplers: dict[tuple[str, int], LocalSampler] = {}
    for line in sys.stdin:
        request = json.loads(line)
        key = (request["case"], request["unroll"])
        if "prepare" in request:
            samplers[key] = LocalSampler(cases[key[0]], REGISTRIES[OFF], Database(), key[1])
            answer: Any = asdict(samplers[key].check)
        elif "calibrate" in request:
            answer = samplers[key].calibrate(request["calibrate"])
        else:
            answer = samplers[key].sample(request["sample"])
        print(json.dumps({"answer": answer}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker" or sys.argv[2] not in WORKERS.values():
        sys.exit(f"usage: {sys.argv[0]} --worker {'|'.join(WORKERS.values())} (run.py runs it)")
    serve(sys.argv[2])
