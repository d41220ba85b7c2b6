"""``fan_out`` against a hand-written ThreadPoolExecutor with a session per item, on PostgreSQL.

    python benchmarks/fan_out.py            # full run (about 1 min)
    python benchmarks/fan_out.py --quick    # noisier
    python benchmarks/fan_out.py --smoke    # only checks the code works
    python benchmarks/fan_out.py --json out.json

The work per item is the same on both sides: load (or receive) one author, rename it, add a book,
commit, in a session of the item's own, 8 items at a time on a thread pool. One operation is a
whole fan-out over ``ITEMS`` items; the figure is ns per item and the ratio fan_out / by hand
(the issue's bar: at most 1.1x).

- ``ids``: both sides get ids. By hand: ``with Session(engine) as s: s.get(...) ... s.commit()``
  in ``ThreadPoolExecutor.map``. fan_out: ``fan_out(fn, ids, session=Session, limit=8)``, ``fn``
  doing the same through ``Session()``: the difference is fan_out's unit of work, scope and
  guard per item.
- ``objects``: the caller holds the authors (loaded) and wants the new books back as objects in
  its session. By hand: ids in, ``s.get`` per item, book ids back, one ``IN`` query for the books
  in the caller. fan_out: the authors themselves in (shipped: no SELECT in the unit), the books
  back (received into the caller's session: no query).

Each pair is timed side by side in interleaved rounds (``_timing.compare``), one fan-out per
contender per round: a fan-out takes a quarter of a second, so unrolling it (as the
sub-microsecond benchmarks do) would only make fewer, longer rounds. Its figure is noisy (8 threads
and the database server share the machine's cores): a round's ratio varies by several per cent, so
the figure is the median of many rounds' ratios.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from _pg_bench import PG_URL, fresh_schema, parser, write_report
from _timing import Comparison, Settings, compare
from sqlalchemy import Engine, ForeignKey, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sessionscope

ITEMS = 200
LIMIT = 8
ROUNDS = {"full": 61, "quick": 21, "smoke": 2}
"""Rounds of one fan-out per contender (``sample_ns=0``: each sample is a single call)."""


def settings_for(size: str) -> Settings:
    return Settings(sample_ns=0, rounds=ROUNDS[size], unroll=1, warmup_ns=0)


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "bench_fan_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


class Book(Base):
    __tablename__ = "bench_fan_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("bench_fan_authors.id"))


@contextmanager
def database() -> Iterator[Engine]:
    """An engine on a fresh PostgreSQL schema with the authors; the schema is dropped after."""
    with fresh_schema("bench_fan") as url:
        engine = create_engine(url, pool_size=LIMIT + 2, max_overflow=0)
        try:
            Base.metadata.create_all(engine)
            with Session(engine) as session, session.begin():
                session.add_all(Author(id=n, name=f"author {n}") for n in range(1, ITEMS + 1))
            yield engine
        finally:
            engine.dispose()


def _touch(session: Session, author: Author) -> Book:
    author.name = "renamed" if author.name != "renamed" else "again"
    book = Book(title=f"by {author.id}", author_id=author.id)
    session.add(book)
    session.commit()
    return book


def contenders(engine: Engine, case: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(by hand, fan_out) for ``case``; each runs one fan-out over ``ITEMS`` items."""
    ids = list(range(1, ITEMS + 1))
    plain = sessionmaker(engine, expire_on_commit=False)
    Scoped = sessionscope.scoped_session(sessionmaker(engine))

    def by_hand_item(author_id: int) -> int:
        with plain() as session:
            author = session.get(Author, author_id)
            assert author is not None
            return _touch(session, author).id

    def by_hand() -> Any:
        with ThreadPoolExecutor(LIMIT) as pool:
            book_ids = list(pool.map(by_hand_item, ids))
        if case == "ids":
            return book_ids
        with plain() as caller:  # the caller wants the books as objects
            return list(caller.scalars(select(Book).where(Book.id.in_(book_ids))))

    def fan_out_ids_item(author_id: int) -> int:
        session = Scoped()
        author = session.get(Author, author_id)
        assert author is not None
        return _touch(session, author).id

    def fan_out_objects_item(author: Author) -> Book:
        return _touch(Scoped(), author)

    def with_fan_out() -> Any:
        if case == "ids":
            return sessionscope.fan_out(fan_out_ids_item, ids, session=Scoped, limit=LIMIT)
        with Scoped.scope(commit=False):  # the caller's session, holding the authors
            authors = list(Scoped.scalars(select(Author).order_by(Author.id)))
            books: list[Book] = sessionscope.fan_out(
                fan_out_objects_item, authors, session=Scoped, limit=LIMIT
            )
            assert len(books) == ITEMS and all(b in Scoped() for b in books)
            return books

    return by_hand, with_fan_out


@dataclass(frozen=True)
class Result:
    case: str
    comparison: Comparison

    def as_dict(self) -> dict[str, Any]:
        c = self.comparison
        return {
            "case": self.case,
            "items": ITEMS,
            "ns_per_item": {"by hand": c.anchor_median, "fan_out": c.candidate_median},
            "ratio": c.ratio,
            "rounds": c.as_dict(),
        }


def run_case(engine: Engine, case: str, settings: Settings) -> Result:
    by_hand, with_fan_out = contenders(engine, case)
    assert len(by_hand()) == len(with_fan_out()) == ITEMS
    c = compare(by_hand, with_fan_out, "S()", settings)
    per_item = Comparison([ns / ITEMS for ns in c.anchor], [ns / ITEMS for ns in c.candidate])
    return Result(case, per_item)


def line(result: Result) -> str:
    d = result.as_dict()
    ns = "  ".join(f"{k} {v:9,.0f} ns" for k, v in d["ns_per_item"].items())
    flag = "  > 1.10 target" if result.comparison.ratio > 1.10 else ""
    return f"{result.case:<8} per item: {ns}  fan_out/by hand {result.comparison.ratio:.3f}{flag}"


def markdown(results: Sequence[Result]) -> str:
    rows = [
        "| Items passed as | by hand ns/item | fan_out ns/item | fan_out / by hand |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        c = r.comparison
        rows.append(
            f"| {r.case} | {c.anchor_median:,.0f} | {c.candidate_median:,.0f} | {c.ratio:.3f} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    settings = settings_for("smoke" if args.smoke else "quick" if args.quick else "full")
    print(
        f"PostgreSQL {PG_URL}; {ITEMS} items, {LIMIT} threads; {settings.rounds} interleaved"
        " rounds; ns per item = median of rounds; ratio = median of per-round ratios\n"
    )
    results = []
    with database() as engine:
        for case in ("ids", "objects"):
            results.append(run_case(engine, case, settings))
            print(line(results[-1]), flush=True)
    table = markdown(results)
    print(f"\n{table}")
    write_report(args.json, {"results": [r.as_dict() for r in results], "markdown": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
