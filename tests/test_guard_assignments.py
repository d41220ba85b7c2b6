"""Assigning a guarded session's ``info``, ``autoflush`` and ``expire_on_commit``, and its new
identity maps.

A guarded session class checks those three assignments with a descriptor per name (the C
module's ``CheckedAttribute``, or ``_handles._CheckedAttributeInPython``), keeping the value in
another instance attribute, so that every other assignment of the session stays an ordinary one
(CPython specializes attribute stores only on a class whose ``__setattr__`` is ``object``'s). A
session class with a ``__setattr__`` of its own is checked by a guarded ``__setattr__`` instead.
A new identity map (``close()``, ``expunge_all()``) has its flagging checked as the first did.
What a user can see of that is tested here, on both descriptors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import flag_dirty

import sessionscope
from sessionscope._guard import _handles
from sessionscope._guard._guarded_class import guarded_class, is_guarded_class
from sessionscope._guard._install import guard_of
from tests.conftest import in_new_thread
from tests.models import Row

CHECKED = ("info", "autoflush", "expire_on_commit")

DESCRIPTORS = [
    pytest.param(_handles._CheckedAttributeInPython, id="python"),
    pytest.param(
        getattr(_handles.speedups, "CheckedAttribute", None),
        id="c",
        marks=pytest.mark.skipif(_handles.speedups is None, reason="the C module is not in use"),
    ),
]


@pytest.fixture(params=DESCRIPTORS)
def session_class(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type[Any]:
    """A Session subclass of its own (its guarded class is made anew) with the given descriptor."""
    monkeypatch.setattr(_handles, "_CheckedAttribute", request.param)

    class OwnSession(Session):
        pass

    assert type(guarded_class(OwnSession).__dict__["autoflush"]) is request.param
    return OwnSession


@pytest.fixture
def rows(engine: Engine) -> Iterator[Engine]:
    with Session(engine) as session:
        session.add_all([Row(id=1, owner="a", n=0), Row(id=2, owner="a", n=1)])
        session.commit()
    yield engine


@pytest.fixture
def scoped(rows: Engine, session_class: type) -> Iterator[Any]:
    """A registry of ``session_class`` sessions, its session removed after the test (also a
    failed one: a PostgreSQL session left open would hold the schema the teardown drops)."""
    Scoped = sessionscope.scoped_session(sessionmaker(rows, class_=session_class))
    try:
        yield Scoped
    finally:
        Scoped.remove()


def test_the_checked_names_are_descriptors_and_no_setattr_is_added(session_class: type) -> None:
    guarded = guarded_class(session_class)
    assert "__setattr__" not in guarded.__dict__
    assert guarded.__setattr__ is object.__setattr__
    for name in CHECKED:
        assert type(guarded.__dict__[name]) is _handles._CheckedAttribute
    assert guarded.__dict__[_handles.SHADOWED] == CHECKED


def test_another_unit_is_refused_each_assignment_and_the_owner_is_not(
    scoped: Any, session_class: type
) -> None:
    session = scoped()
    assert is_guarded_class(type(session)) and isinstance(session, session_class)  # born so
    mine = {"mine": True}
    values = {"info": mine, "autoflush": False, "expire_on_commit": False}
    for name, value in values.items():
        outcome = in_new_thread(lambda name=name, value=value: setattr(session, name, value))
        assert isinstance(outcome, sessionscope.CrossUnitError), name
        assert f"assigned {session_class.__name__}.{name}" in str(outcome)
    assert session.info == {} and session.autoflush is True and session.expire_on_commit is True
    for name, value in values.items():  # the owner's assignments pass, and read back
        setattr(session, name, value)
    assert session.info is mine and session.autoflush is False
    assert session.expire_on_commit is False
    # reads are free for anyone, and other assignments are not checked
    assert in_new_thread(lambda: (session.info, session.autoflush)) == (mine, False)
    assert in_new_thread(lambda: setattr(session, "application_note", 1)) is None
    # what the settings do still happens: no autoflush, no expiry on commit
    row = session.get(Row, 1)
    assert row is not None
    row.n = 10
    assert session.scalar(select(Row.n).where(Row.id == 1)) == 0  # not flushed first
    session.commit()
    assert "n" in row.__dict__  # not expired


def test_info_is_made_on_first_read_kept_and_deleted_as_sqlalchemys(
    engine: Engine, session_class: type
) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine, class_=session_class))
    session = Scoped()
    info = session.info
    assert info == {} and session.info is info
    info["key"] = "value"
    del session.info
    assert session.info == {} and session.info is not info
    del session.autoflush
    with pytest.raises(AttributeError, match="has no attribute 'autoflush'"):
        session.autoflush  # noqa: B018 - the read is the test
    with pytest.raises(AttributeError, match="has no attribute 'autoflush'"):
        del session.autoflush
    session.autoflush = True
    Scoped.remove()
    made = sessionscope.scoped_session(
        sessionmaker(engine, class_=session_class, info={"from": "maker"})
    )
    assert made().info == {"from": "maker"}
    made.remove()


def test_a_session_switched_to_its_guarded_class_and_back_keeps_its_settings(
    engine: Engine, session_class: type
) -> None:
    session = session_class(engine, autoflush=False, expire_on_commit=False, info={"a": 1})
    sessionscope.guard(session, "raise")
    assert type(session) is guarded_class(session_class) and guard_of(session) is not None
    assert (session.autoflush, session.expire_on_commit, session.info) == (False, False, {"a": 1})
    assert "autoflush" not in session.__dict__
    refused = in_new_thread(lambda: setattr(session, "autoflush", True))
    assert isinstance(refused, sessionscope.CrossUnitError)
    session.info["b"] = 2
    sessionscope.guard(session, "off")
    assert type(session) is session_class and guard_of(session) is None
    assert (session.autoflush, session.expire_on_commit) == (False, False)
    assert session.info == {"a": 1, "b": 2} and session.__dict__["info"] is session.info
    assert in_new_thread(lambda: setattr(session, "autoflush", True)) is None
    assert session.autoflush is True
    session.close()


@pytest.mark.parametrize("new_map", ["close", "expunge_all", "reset"])
def test_flagging_an_object_is_checked_in_every_new_identity_map(scoped: Any, new_map: str) -> None:
    session = scoped()
    first = session.identity_map
    getattr(session, new_map)()
    assert session.identity_map is not first
    row = session.get(Row, 2)  # in the new map
    assert row is not None
    refused = in_new_thread(lambda: flag_dirty(row))
    assert isinstance(refused, sessionscope.CrossUnitError)
    assert "flagged a Row attached to it as modified" in str(refused)
    assert not session.dirty
    flag_dirty(row)  # the owner's passes
    assert row in session.dirty


def test_a_class_with_its_own_setattr_is_checked_through_it(rows: Engine) -> None:
    seen: list[str] = []

    class NotingSession(Session):
        def __setattr__(self, name: str, value: Any) -> None:
            seen.append(name)
            super().__setattr__(name, value)

    guarded = guarded_class(NotingSession)
    assert "__setattr__" in guarded.__dict__ and guarded.__dict__[_handles.SHADOWED] == ()
    Scoped = sessionscope.scoped_session(sessionmaker(rows, class_=NotingSession))
    try:
        session = Scoped()
        assert "autoflush" in seen  # its __init__'s assignments went through its __setattr__
        refused = in_new_thread(lambda: setattr(session, "expire_on_commit", False))
        assert isinstance(refused, sessionscope.CrossUnitError)
        session.expire_on_commit = False
        assert session.expire_on_commit is False and seen[-1] == "expire_on_commit"
        session.close()  # a new map, assigned through __setattr__: watched there
        row = session.get(Row, 1)
        assert isinstance(in_new_thread(lambda: flag_dirty(row)), sessionscope.CrossUnitError)
    finally:
        Scoped.remove()
