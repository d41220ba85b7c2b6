"""sessionscope.scoped_session is a drop-in for sqlalchemy.orm.scoped_session."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest
from sqlalchemy import create_engine, exc, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.orm import scoped_session as sa_scoped_session

import sessionscope
from tests.models import Base, Row

BOTH = pytest.mark.parametrize(
    "registry_class", [sa_scoped_session, sessionscope.scoped_session], ids=["sqlalchemy", "ours"]
)


@pytest.fixture
def sqlite_engine(tmp_path: Any) -> Any:
    engine = create_engine(f"sqlite:///{tmp_path}/dropin.db")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_it_is_a_sqlalchemy_scoped_session_with_the_very_same_proxies() -> None:
    assert issubclass(sessionscope.scoped_session, sa_scoped_session)
    proxied = [
        name
        for name, value in vars(sa_scoped_session).items()
        if not name.startswith("_") and name not in {"remove", "configure"}
    ]
    assert {"add", "execute", "get", "merge", "info", "query_property", "identity_key"} <= set(
        proxied
    )
    for name in proxied:
        # inherited, not re-implemented: arguments are forwarded exactly as SQLAlchemy does
        ours = inspect.getattr_static(sessionscope.scoped_session, name)
        assert ours is inspect.getattr_static(sa_scoped_session, name), name


@BOTH
def test_an_application_keeps_working_when_only_the_import_changes(
    registry_class: Any, sqlite_engine: Any
) -> None:
    Session = registry_class(sessionmaker(sqlite_engine, expire_on_commit=False))

    Session.add(Row(owner="a", n=1))
    Session.add_all([Row(owner="a", n=2), Row(owner="b", n=1)])
    Session.flush()
    assert len(Session.new) == 0 and Session.is_active
    Session.commit()
    row = Session.scalars(select(Row).where(Row.owner == "b")).one()
    assert Session.get(Row, row.id) is row
    assert Session.object_session(row) is Session()
    assert Session.identity_key(Row, row.id)[1] == (row.id,)
    row.n = 5
    assert row in Session.dirty
    Session.commit()
    Session.delete(row)
    Session.commit()
    assert Session.execute(select(Row.n).order_by(Row.n)).scalars().all() == [1, 2]
    Session.info["k"] = "v"
    assert Session().info == {"k": "v"}
    Session.remove()
    assert Session().info == {}
    Session.remove()


@BOTH
def test_query_property_and_configure_behave_as_in_sqlalchemy(
    registry_class: Any, sqlite_engine: Any
) -> None:
    factory = sessionmaker()
    Session = registry_class(factory)
    Session.configure(bind=sqlite_engine)  # no session yet: no warning

    class LocalBase(DeclarativeBase):
        pass

    class Item(LocalBase):
        __tablename__ = "dropin_items"
        id: Mapped[int] = mapped_column(primary_key=True)
        query = Session.query_property()

    LocalBase.metadata.create_all(sqlite_engine)
    Session.add(Item(id=7))
    Session.commit()
    assert [item.id for item in Item.query.all()] == [7]
    assert Item.query.session is Session()
    with pytest.warns(exc.SAWarning, match="At least one scoped session is already present"):
        Session.configure(bind=sqlite_engine)
    Session.remove()


@BOTH
def test_arguments_when_a_session_exists_raise_sqlalchemys_error(
    registry_class: Any, sqlite_engine: Any
) -> None:
    Session = registry_class(sessionmaker(sqlite_engine))
    custom = Session(info={"x": 1})
    assert Session() is custom and custom.info == {"x": 1}
    with pytest.raises(
        exc.InvalidRequestError,
        match="Scoped session is already present; no new arguments may be specified.",
    ):
        Session(info={"y": 2})
    Session.remove()


@BOTH
def test_any_callable_works_as_session_factory(registry_class: Any, sqlite_engine: Any) -> None:
    made: list[Session] = []

    def factory(**kw: Any) -> Session:
        made.append(Session(sqlite_engine, **kw))
        return made[-1]

    Session_ = registry_class(factory)
    assert Session_() is made[0] and Session_() is made[0]
    Session_.remove()
    assert Session_() is made[1]
    Session_.remove()


@BOTH
def test_an_explicit_scopefunc_keys_sessions_like_sqlalchemy(
    registry_class: Any, sqlite_engine: Any
) -> None:
    token = ["a"]
    Session = registry_class(sessionmaker(sqlite_engine), lambda: token[0])
    first = Session()
    token[0] = "b"
    second = Session()
    token[0] = "a"
    assert Session() is first and first is not second
    Session.remove()
    assert Session() is not first
    Session.remove()


@BOTH
def test_using_an_async_session_class_warns_as_sqlalchemy_does(registry_class: Any) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    Session = registry_class(sessionmaker(class_=AsyncSession))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Session()
    assert any("async_scoped_session" in str(w.message) for w in caught)
    Session.registry.clear()


def _asyncio_warnings(registry_class: Any, factory: Any, scopefunc: Any) -> list[int]:
    """How many asyncio deprecation warnings each step of one sequence of calls gives."""
    Session = registry_class(factory, scopefunc)
    steps = [
        lambda: Session(),  # makes the session
        lambda: Session(),  # returns it again
        lambda: Session.info,  # a proxy: SQLAlchemy does not check here
        lambda: Session.registry.clear(),
        lambda: Session(info={"k": 1}),  # made with arguments
        lambda: Session(),
        lambda: Session.registry.clear(),
        lambda: Session.info,  # a proxy making the session
        lambda: Session(),
    ]
    counts = []
    for step in steps:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
        counts.append(sum("async_scoped_session" in str(w.message) for w in caught))
    Session.registry.clear()
    return counts


def _mock_async_factory(**kw: Any) -> Any:
    from unittest import mock

    session = mock.Mock(name="session")
    session._is_asyncio = True
    return session


@pytest.mark.parametrize("scopefunc", [None, lambda: "key"], ids=["unit", "scopefunc"])
@pytest.mark.parametrize("factory_kind", ["AsyncSession", "mock"])
def test_the_asyncio_deprecation_warns_exactly_when_sqlalchemys_does(
    factory_kind: str, scopefunc: Any
) -> None:
    """On every Session() call returning an async session, never through proxies or at creation."""
    from sqlalchemy.ext.asyncio import AsyncSession

    if factory_kind == "mock":
        factory: Any = _mock_async_factory
    else:
        factory = sessionmaker(class_=AsyncSession)
    theirs = _asyncio_warnings(sa_scoped_session, factory, scopefunc)
    ours = _asyncio_warnings(sessionscope.scoped_session, factory, scopefunc)
    assert theirs == [1, 1, 0, 0, 1, 1, 0, 0, 1]
    assert ours == theirs


@BOTH
def test_a_sync_session_gets_no_asyncio_warning(registry_class: Any, sqlite_engine: Any) -> None:
    Session = registry_class(sessionmaker(sqlite_engine))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Session()
        Session(), Session.info
    Session.remove()
