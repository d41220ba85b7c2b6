"""Sessions born as their guarded class, and writes checked in SQLAlchemy's attribute code.

The registries and scopes make a sessionmaker's sessions as the guarded class from the start
(``_install.born_guarded``), running the maker's own ``__call__`` on its ``kw``; their event
dispatch is a plain attribute; writes to mapped attributes are checked where SQLAlchemy's
attribute implementations make them. What a user could see of that is tested here: the maker's
configuration still applies, listeners still fire, a maker with its own ``__call__`` is still
guarded, and a write-only collection (its own attribute implementation) is still checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, ForeignKey, String, event, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    WriteOnlyMapped,
    mapped_column,
    relationship,
    sessionmaker,
)

import sessionscope
from sessionscope._guard._guarded_class import is_guarded_class
from sessionscope._guard._install import guard_of
from tests.conftest import in_new_thread
from tests.models import Row


class _Base(DeclarativeBase):
    pass


class Shelf(_Base):
    __tablename__ = "ss_born_shelves"
    id: Mapped[int] = mapped_column(primary_key=True)
    books: WriteOnlyMapped[Book] = relationship()


class Book(_Base):
    __tablename__ = "ss_born_books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    shelf_id: Mapped[int | None] = mapped_column(ForeignKey("ss_born_shelves.id"))


@pytest.fixture
def shelves(engine: Engine) -> Iterator[Engine]:
    _Base.metadata.create_all(engine)
    try:
        yield engine
    finally:
        _Base.metadata.drop_all(engine)


def in_thread(fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn`` in a new thread (another unit); the exception it raised, if any."""
    outcome = in_new_thread(fn)
    return outcome if isinstance(outcome, BaseException) else None


def test_a_makers_sessions_are_born_guarded_and_configure_still_applies(engine: Engine) -> None:
    made_as: list[type] = []

    class RecordingSession(Session):
        def __init__(self, **kw: Any) -> None:
            made_as.append(type(self))  # the class the session is made as, before any install
            super().__init__(**kw)

    maker = sessionmaker(engine, class_=RecordingSession)
    Scoped = sessionscope.scoped_session(maker)
    Scoped.configure(expire_on_commit=False, info={"configured": True})
    with Scoped.scope(info={"scope": 1}) as session:
        assert made_as == [type(session)] and is_guarded_class(type(session))  # born, not switched
        assert issubclass(type(session), maker.class_)
        assert session.expire_on_commit is False
        assert session.info == {"configured": True, "scope": 1}  # merged as the maker merges
        assert isinstance(in_thread(lambda: session.get(Row, 1)), sessionscope.CrossUnitError)
    implicit = Scoped()
    assert is_guarded_class(type(implicit)) and guard_of(implicit) is not None
    assert implicit.expire_on_commit is False
    Scoped.remove()


def test_a_maker_changed_between_sessions_makes_the_next_one_as_it_is_now(engine: Engine) -> None:
    """The guarded view of a maker is reused from session to session: one whose options are
    configured in place, whose ``kw`` is replaced or whose class is replaced is followed."""

    class Other(Session):
        pass

    maker = sessionmaker(engine)
    Scoped = sessionscope.scoped_session(maker)
    with Scoped.scope() as first:
        assert first.autoflush is True and not isinstance(first, Other)
    maker.configure(autoflush=False)  # in place
    with Scoped.scope() as second:
        assert second.autoflush is False
    maker.kw = {**maker.kw, "expire_on_commit": False}  # replaced
    with Scoped.scope() as third:
        assert third.autoflush is False and third.expire_on_commit is False
    maker.class_ = Other
    with Scoped.scope() as fourth:
        assert isinstance(fourth, Other) and is_guarded_class(type(fourth))
        assert isinstance(in_thread(lambda: fourth.get(Row, 1)), sessionscope.CrossUnitError)


def test_listeners_on_the_maker_and_on_the_session_fire(engine: Engine) -> None:
    maker = sessionmaker(engine)
    Scoped = sessionscope.scoped_session(maker)
    fired: list[str] = []
    event.listen(maker, "after_commit", lambda s: fired.append("maker"))
    with Scoped.scope() as session:
        event.listen(session, "after_commit", lambda s: fired.append("session"))
        session.add(Row(owner="listeners", n=1))
    assert sorted(fired) == ["maker", "session"]
    with Scoped.scope() as other:  # a session's own listener stays its own
        other.add(Row(owner="listeners", n=2))
    assert sorted(fired) == ["maker", "maker", "session"]


def test_a_maker_with_its_own_call_is_still_guarded(engine: Engine) -> None:
    class CountingMaker(sessionmaker[Session]):
        made = 0

        def __call__(self, **kw: Any) -> Session:
            CountingMaker.made += 1
            return super().__call__(**kw)

    Scoped = sessionscope.scoped_session(CountingMaker(engine))
    with Scoped.scope() as session:
        assert CountingMaker.made == 1  # its __call__ ran: the session was switched, not born
        assert guard_of(session) is not None
        assert isinstance(in_thread(lambda: session.get(Row, 1)), sessionscope.CrossUnitError)


def test_guard_off_on_a_born_guarded_session_makes_it_the_makers_again(engine: Engine) -> None:
    maker = sessionmaker(engine)
    Scoped = sessionscope.scoped_session(maker)
    session = Scoped()
    sessionscope.guard(session, "off")
    assert type(session) is maker.class_ and guard_of(session) is None
    assert in_thread(lambda: session.scalars(select(Row)).all()) is None
    Scoped.remove()


def test_a_write_only_collection_is_checked_where_it_writes(shelves: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(shelves))
    with Scoped.scope() as session:
        shelf = Shelf()
        session.add(shelf)
        session.flush()
        refused = in_thread(lambda: shelf.books.add(Book(title="from another unit")))
        assert isinstance(refused, sessionscope.CrossUnitError)
        shelf.books.add(Book(title="the owner's"))  # the owner writes freely
    with Scoped.scope() as session:
        titles = session.scalars(select(Book.title)).all()
    assert titles == ["the owner's"]  # the refused write changed nothing


def test_an_async_makers_sync_session_class_is_kept_and_guarded() -> None:

    class MySession(Session):
        pass

    async def main() -> None:
        engine = create_async_engine("sqlite+aiosqlite://")
        try:
            Scoped = sessionscope.async_scoped_session(
                async_sessionmaker(engine, sync_session_class=MySession)
            )
            async with Scoped.scope() as session:
                assert isinstance(session, AsyncSession)
                assert isinstance(session.sync_session, MySession)
                assert is_guarded_class(type(session.sync_session))
                assert guard_of(session) is not None
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_an_async_maker_changed_between_sessions_makes_the_next_one_as_it_is_now() -> None:
    """The guarded view of an async maker is a copy of its options, reused while they stay
    equal: options configured in place, a replaced ``kw``, a new ``sync_session_class`` or
    ``class_`` are all followed by the next session."""

    class MySession(Session):
        pass

    class MyAsyncSession(AsyncSession):
        pass

    async def main() -> None:
        engine = create_async_engine("sqlite+aiosqlite://")
        maker = async_sessionmaker(engine)
        Scoped = sessionscope.async_scoped_session(maker)
        try:
            async with Scoped.scope() as first:
                assert first.sync_session.autoflush is True
            async with Scoped.scope() as again:  # (the view reused)
                assert again.sync_session.autoflush is True and guard_of(again) is not None
            maker.configure(autoflush=False)  # in place
            async with Scoped.scope() as second:
                assert second.sync_session.autoflush is False
            maker.kw = {**maker.kw, "expire_on_commit": False}  # replaced
            async with Scoped.scope() as third:
                assert third.sync_session.autoflush is False
                assert third.sync_session.expire_on_commit is False
            maker.configure(sync_session_class=MySession)
            async with Scoped.scope() as fourth:
                assert isinstance(fourth.sync_session, MySession)
                assert is_guarded_class(type(fourth.sync_session))
            maker.class_ = MyAsyncSession
            async with Scoped.scope() as fifth:
                assert isinstance(fifth, MyAsyncSession)
                assert isinstance(fifth.sync_session, MySession) and guard_of(fifth) is not None
        finally:
            await engine.dispose()

    asyncio.run(main())
