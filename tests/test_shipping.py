"""ship / receive: clean ORM objects as JSON-safe data, into another unit's session, no SELECT."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import threading
import uuid
import zoneinfo
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    ForeignKey,
    LargeBinary,
    Numeric,
    String,
    event,
    inspect,
    select,
    update,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.orm.exc import StaleDataError, UnmappedInstanceError

import sessionscope
from sessionscope import NotShippableError, ShippedVersionError, receive, ship


class Base(DeclarativeBase):
    pass


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Author(Base):
    __tablename__ = "ship_authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    bio: Mapped[str | None] = mapped_column(String(200), deferred=True)
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "ship_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    author_id: Mapped[int] = mapped_column(ForeignKey("ship_authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")


class Typed(Base):
    __tablename__ = "ship_typed"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    day: Mapped[dt.date]
    price: Mapped[decimal.Decimal] = mapped_column(Numeric(12, 4))
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    color: Mapped[Color] = mapped_column(SAEnum(Color))
    doc: Mapped[dict[str, Any]] = mapped_column(JSON)


class Versioned(Base):
    __tablename__ = "ship_versioned"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(nullable=False)
    __mapper_args__ = {"version_id_col": version}


@pytest.fixture
def db(engine: Engine) -> Iterator[Engine]:
    """The engine, with this module's tables made empty and two authors with three books."""
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(
            [
                Author(
                    id=1,
                    name="Ann",
                    bio="long",
                    books=[Book(id=1, title="a"), Book(id=2, title="b")],
                ),
                Author(id=2, name="Bob", books=[Book(id=3, title="c")]),
                Versioned(id=1, name="v"),
            ]
        )
    yield engine
    Base.metadata.drop_all(engine)


def count_selects(engine: Engine) -> list[str]:
    seen: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def count(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    return seen


def in_other_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return out[0]


def test_round_trip_through_json_into_another_unit_with_no_select(db: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(db))
    authors = Scoped.scalars(
        select(Author).options(selectinload(Author.books)).order_by(Author.id)
    ).all()
    payload = json.dumps(ship(authors))  # in the owning unit: the guard lets it through
    statements = count_selects(db)

    def elsewhere() -> dict[str, Any]:
        target = Scoped()
        ann, bob = receive(target, json.loads(payload))
        facts = {
            "own session": inspect(ann).session is target,
            "persistent": inspect(ann).persistent and inspect(ann.books[0]).persistent,
            "names": [ann.name, bob.name],
            "one-to-many": [b.title for b in ann.books] + [b.title for b in bob.books],
            "many-to-one is the same object": ann.books[0].author is ann,  # a cycle: one object
            "identity map": target.get(Author, 1) is ann and target.get(Book, 3) is bob.books[0],
            "clean": not target.dirty and not target.new,
            "statements": len(statements),
        }
        Scoped.remove()
        return facts

    assert in_other_thread(elsewhere) == {
        "own session": True,
        "persistent": True,
        "names": ["Ann", "Bob"],
        "one-to-many": ["a", "b", "c"],
        "many-to-one is the same object": True,
        "identity map": True,
        "clean": True,
        "statements": 0,
    }
    Scoped.remove()


def test_a_single_object_comes_back_as_one_and_a_many_to_one_follows(db: Engine) -> None:
    with Session(db) as source:
        book = source.get(Book, 3)
        assert book is not None
        _ = book.author  # loaded many-to-one
        shipped = ship(book)
    statements = count_selects(db)
    with Session(db) as target:
        copy = receive(target, json.loads(json.dumps(shipped)))
        assert isinstance(copy, Book) and copy.author.name == "Bob"
        assert "books" not in inspect(copy.author).dict  # not loaded on the source: unloaded
        assert statements == []
        assert [b.title for b in copy.author.books] == ["c"]  # lazy loads now
        assert len(statements) == 1
        assert receive(target, ship([])) == []


def test_unloaded_attributes_arrive_expired_and_load_on_access(db: Engine) -> None:
    with Session(db) as source:
        author = source.get(Author, 1)  # bio is deferred, books not loaded
        statements = count_selects(db)
        shipped = ship(author)  # reads only what is loaded: no SQL, no lazy load
        assert statements == [] and set(inspect(author).unloaded) == {"bio", "books"}
    assert "bio" not in shipped["objects"][0]["columns"]
    with Session(db) as target:
        copy = receive(target, shipped)
        assert {"bio"} <= inspect(copy).expired_attributes and statements == []
        assert copy.bio == "long" and len(statements) == 1
        assert [b.title for b in copy.books] == ["a", "b"]


def test_the_sessions_own_copy_wins(db: Engine) -> None:
    with Session(db) as source:
        shipped = ship(source.get(Author, 1))
    with Session(db) as target:
        mine = target.get(Author, 1)
        assert mine is not None
        mine.name = "changed here"
        assert receive(target, shipped) is mine and mine.name == "changed here"
        assert target.is_modified(mine)  # pending change kept


def test_a_version_conflict_is_refused_naming_both_versions(db: Engine) -> None:
    with Session(db) as source:
        shipped = ship(source.get(Versioned, 1))
    assert shipped["objects"][0]["version"] == 1
    with Session(db) as target:
        same = receive(target, shipped, check_version=True)  # unchanged: accepted
        assert same.version == 1
    with Session(db) as writer, writer.begin():
        row = writer.get(Versioned, 1)
        assert row is not None
        row.name = "changed"  # version 2
    statements = count_selects(db)
    with Session(db) as target:
        with pytest.raises(ShippedVersionError, match=r"version 1.*now version 2") as caught:
            receive(target, shipped, check_version=True)
        assert isinstance(caught.value, StaleDataError) and "Versioned (1,)" in str(caught.value)
        assert len(statements) == 1 and len(target.identity_map) == 0  # nothing attached
        stale = receive(target, shipped)  # without the check: trusted as shipped
        assert stale.version == 1
        stale.name = "lost update"
        with pytest.raises(StaleDataError):  # ... and caught at flush, by its shipped version
            target.flush()
    with Session(db) as writer, writer.begin():
        writer.execute(update(Versioned).values(id=5))
    with Session(db) as target, pytest.raises(ShippedVersionError, match="now deleted"):
        receive(target, shipped, check_version=True)


def test_types_round_trip_exactly(db: Engine) -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    values = {
        "id": uuid.uuid4(),
        "at": dt.datetime(2024, 3, 31, 2, 30, 0, 123456, tzinfo=dt.timezone.utc),
        "day": dt.date(2024, 2, 29),
        "price": decimal.Decimal("12.3400"),
        "blob": b"\x00\xffbytes",
        "color": Color.BLUE,
        "doc": {"$t": "not a tag", "n": [1, 2.5, None, True], "s": "x"},
    }
    with Session(db) as session, session.begin():
        session.add(Typed(**values))
    with Session(db) as source:
        loaded = source.get(Typed, values["id"])
        assert loaded is not None
        shipped = json.loads(json.dumps(ship(loaded)))
        originals = {k: getattr(loaded, k) for k in values}
    with Session(db) as target:
        copy = receive(target, shipped)
        for key, value in originals.items():
            got = getattr(copy, key)
            assert got == value and type(got) is type(value), key
            if isinstance(value, dt.datetime):
                assert got.utcoffset() == value.utcoffset()
    from sessionscope._shipping import decode, encode

    samples: list[Any] = [
        dt.datetime(2024, 7, 1, 12, tzinfo=paris),
        dt.datetime(2024, 7, 1, 12),
        dt.time(1, 2, 3, 4),
        dt.timedelta(days=-1, seconds=5, microseconds=6),
        float("inf"),
        (1, "a"),
    ]
    for value in samples:
        back = decode(json.loads(json.dumps(encode(value))))
        assert back == value and type(back) is type(value)
        if isinstance(value, dt.datetime):
            assert back.tzinfo == value.tzinfo


def test_refusals(db: Engine) -> None:
    with Session(db) as session:
        with pytest.raises(NotShippableError, match=r"transient or pending.*Flush and commit"):
            ship(Author(id=9, name="new"))
        pending = Author(id=9, name="new")
        session.add(pending)
        with pytest.raises(NotShippableError, match="errors.md#ship-state"):
            ship([pending])
        session.expunge(pending)
        author = session.get(Author, 1)
        assert author is not None
        author.name = "dirty"
        with pytest.raises(NotShippableError, match=r"not yet flushed.*\(name\).*ship-dirty"):
            ship(author)
        author.name = "Ann"  # back as loaded: no real change, shippable
        assert ship(author)["objects"][0]["columns"]["name"] == "Ann"
        book = session.get(Book, 3)
        session.delete(book)
        with pytest.raises(NotShippableError, match="deleted"):
            ship(book)
        session.flush()
        with pytest.raises(NotShippableError, match="deleted"):
            ship(book)
        session.rollback()
        typed_like = session.get(Author, 2)
        assert typed_like is not None
        inspect(typed_like).dict["name"] = object()  # a value with no JSON form
        with pytest.raises(NotShippableError, match="ship-value"):
            ship(typed_like)
        for bad in ("not an object", 42, [object()]):
            with pytest.raises(UnmappedInstanceError):
                ship(bad)
        good = ship(session.get(Author, 1))
        with pytest.raises(sa_exc.ArgumentError, match="receive-payload"):
            receive(session, {"format": 99})
        broken = json.loads(json.dumps(good))
        broken["objects"][0]["relationships"] = {"books": [7]}  # refers to no shipped object
        with pytest.raises(sa_exc.ArgumentError, match=r"IndexError.*receive-payload"):
            receive(session, broken)
        with pytest.raises(sa_exc.ArgumentError, match="a registry|Session"):
            receive(sessionmaker(db), good)  # type: ignore[call-overload]
        with pytest.raises(TypeError, match="check_version"):
            receive(session, good, check_version=None)  # type: ignore[call-overload]
        unknown = json.loads(json.dumps(good))
        unknown["objects"][0]["mapper"] = "nowhere:Nothing"
        with pytest.raises(sa_exc.ArgumentError, match="receive-unknown-mapper"):
            receive(session, unknown)


def test_receive_into_an_async_session_of_another_task(tmp_path: Any) -> None:
    pytest.importorskip("aiosqlite")
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/ship.db")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with AsyncSession(engine) as session, session.begin():
            session.add(Versioned(id=1, name="v"))
        async with AsyncSession(engine) as session:
            shipped = ship(await session.get(Versioned, 1))
        Scoped = sessionscope.async_scoped_session(lambda: AsyncSession(engine))

        async def other_task() -> Any:
            copy = await receive(Scoped, shipped, check_version=True)
            return copy.name, inspect(copy).session is Scoped().sync_session

        assert await asyncio.create_task(other_task()) == ("v", True)
        await engine.dispose()

    asyncio.run(main())
