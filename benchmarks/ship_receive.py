"""``ship`` + ``receive`` against re-querying by primary key in the receiver, on PostgreSQL.

    python benchmarks/ship_receive.py            # full run (about 10 s)
    python benchmarks/ship_receive.py --quick    # noisier
    python benchmarks/ship_receive.py --smoke    # only checks the code works
    python benchmarks/ship_receive.py --json out.json

A receiver (a unit of work in another process, say) needs objects the sender has loaded. It can
be sent their ids and query them again, or be sent the objects themselves. One operation, timed
per object, is what the receiver's unit of work does with a fresh ``Session``, closed after:

- ``re-query``: the sender's ids in, ``session.get()`` per object (one object), or one
  ``select ... where id in (...)`` (with ``selectinload`` of the books when the graph is wanted);
- ``ship+receive``: ``json.loads(json.dumps(ship(objects)))`` (the sender's side and the wire
  format included), then ``receive(session, shipped)``: no SQL;
- ``ship+receive(check_version)``: the same with ``check_version=True`` (one SELECT of the version
  column per mapper).

Each pair is timed side by side in interleaved rounds (``_timing.compare``): ns per object is the
median over rounds, the ratio the median of per-round ratios. Before timing, each contender's
statements are counted once and checked (0 for ``ship+receive``), and its objects compared with
the rows. PostgreSQL at ``BENCH_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/
test``), in a schema of its own, dropped at the end.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from _pg_bench import PG_URL, fresh_schema, parser, settings_of, write_report
from _timing import Comparison, Settings, compare
from sqlalchemy import Engine, ForeignKey, String, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.orm import selectinload as _selectinload

from sessionscope import receive, ship

REQUERY = "re-query"
SHIP = "ship+receive"
SHIP_CHECKED = "ship+receive(check_version)"


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "bench_ship_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    email: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(nullable=False)
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")
    __mapper_args__ = {"version_id_col": version}


class Book(Base):
    __tablename__ = "bench_ship_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("bench_ship_authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


AUTHORS = 100
BOOKS_PER_AUTHOR = 3


@dataclass(frozen=True)
class Case:
    label: str
    authors: int
    graph: bool  # the authors' books too (loaded on the sender, wanted by the receiver)

    @property
    def objects(self) -> int:
        return self.authors * (1 + BOOKS_PER_AUTHOR if self.graph else 1)


CASES = (
    Case("1 author", 1, False),
    Case("100 authors", 100, False),
    Case("10 authors + their 30 books", 10, True),
)


@contextmanager
def database() -> Iterator[Engine]:
    """An engine on a fresh PostgreSQL schema with the seed rows; the schema is dropped after."""
    with fresh_schema("bench_ship") as url:
        engine = create_engine(url)
        try:
            Base.metadata.create_all(engine)
            with Session(engine) as session, session.begin():
                for a in range(1, AUTHORS + 1):
                    books = [
                        Book(id=a * 10 + b, title=f"book {a}.{b}") for b in range(BOOKS_PER_AUTHOR)
                    ]
                    session.add(Author(id=a, name=f"author {a}", email=f"a{a}@x", books=books))
            yield engine
        finally:
            engine.dispose()


def contenders(engine: Engine, case: Case) -> dict[str, Callable[[], list[Author]]]:
    """The receiver's unit of work, three ways; each returns the authors it got."""
    ids = list(range(1, case.authors + 1))
    with Session(engine) as sender:  # loaded once; shipped from detached, loaded state
        stmt = select(Author).where(Author.id.in_(ids)).order_by(Author.id)
        if case.graph:
            stmt = stmt.options(_selectinload(Author.books))
        sent = list(sender.scalars(stmt))

    def requery() -> list[Author]:
        with Session(engine) as session:
            if len(ids) == 1:
                return [session.get_one(Author, ids[0])]
            return list(session.scalars(stmt))

    def shipped(check_version: bool) -> Callable[[], list[Author]]:
        def run() -> list[Author]:
            data = json.loads(json.dumps(ship(sent)))
            with Session(engine) as session:
                got: list[Author] = receive(session, data, check_version=check_version)
                return got

        return run

    return {REQUERY: requery, SHIP: shipped(False), SHIP_CHECKED: shipped(True)}


def statements(engine: Engine, work: Callable[[], list[Author]], case: Case) -> int:
    """Run ``work`` once, check what it returned against the rows; the statements it sent."""
    sent: list[str] = []

    def count(*_: Any) -> None:
        sent.append("")

    event.listen(engine, "before_cursor_execute", count)
    try:
        authors = work()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    names = [a.__dict__.get("name") for a in authors]
    assert names == [f"author {i}" for i in range(1, case.authors + 1)], names
    if case.graph:
        assert all(len(a.__dict__["books"]) == BOOKS_PER_AUTHOR for a in authors)
    return len(sent)


@dataclass(frozen=True)
class Result:
    case: Case
    statements: dict[str, int]
    against_requery: dict[str, Comparison]  # contender -> (re-query ns, contender ns) per object

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.label,
            "objects": self.case.objects,
            "statements": self.statements,
            "ns_per_object": {
                REQUERY: next(iter(self.against_requery.values())).anchor_median,
                **{k: c.candidate_median for k, c in self.against_requery.items()},
            },
            "ratio_to_requery": {k: c.ratio for k, c in self.against_requery.items()},
            "rounds": {k: c.as_dict() for k, c in self.against_requery.items()},
        }


def run_case(engine: Engine, case: Case, settings: Settings) -> Result:
    ops = contenders(engine, case)
    counted = {name: statements(engine, op, case) for name, op in ops.items()}
    if counted[SHIP] != 0 or counted[REQUERY] < 1 or counted[SHIP_CHECKED] != 1:
        raise RuntimeError(f"{case.label}: unexpected statements per unit of work: {counted}")
    per_object = case.objects
    comparisons = {}
    for name in (SHIP, SHIP_CHECKED):
        c = compare(ops[REQUERY], ops[name], "S()", settings)
        comparisons[name] = Comparison(
            [ns / per_object for ns in c.anchor], [ns / per_object for ns in c.candidate]
        )
    return Result(case, counted, comparisons)


def line(result: Result) -> str:
    d = result.as_dict()
    ns = "  ".join(f"{k} {v:9,.0f} ns" for k, v in d["ns_per_object"].items())
    ratios = "  ".join(f"{k}/re-query {v:.2f}" for k, v in d["ratio_to_requery"].items())
    return f"{result.case.label:<30} per object: {ns}  {ratios}"


def markdown(results: Sequence[Result]) -> str:
    rows = [
        "| Case | Objects | re-query ns/object | ship+receive ns/object | with check_version"
        " ns/object | ship+receive / re-query | checked / re-query |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        d = r.as_dict()
        ns, ratio = d["ns_per_object"], d["ratio_to_requery"]
        rows.append(
            f"| {r.case.label} | {r.case.objects} | {ns[REQUERY]:,.0f} | {ns[SHIP]:,.0f}"
            f" | {ns[SHIP_CHECKED]:,.0f} | {ratio[SHIP]:.2f} | {ratio[SHIP_CHECKED]:.2f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    settings = settings_of(args)
    print(
        f"PostgreSQL {PG_URL}; {settings.rounds} interleaved rounds of samples >="
        f" {settings.sample_ns / 1e6:g} ms; ns per object = median of rounds;"
        " ratio = median of per-round ratios\n"
    )
    results = []
    with database() as engine:
        for case in CASES:
            results.append(run_case(engine, case, settings))
            print(line(results[-1]), flush=True)
    table = markdown(results)
    print(f"\n{table}")
    write_report(args.json, {"results": [r.as_dict() for r in results], "markdown": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
