"""What a guarded session hands out, guarded in C (``_speedups.guard_handle``) and in Python.

``_handles.guard_handle`` stays the reference: the C function does a result's usual case (a
``Result``, or a ``ScalarResult``/``MappingResult`` over one, whose class has its checked subclass
already) and hands everything else back to it. Each test below guards twin handles both ways and
compares what they became: their classes, the result under a filter, the guard each holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import IteratorResult, Result
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.orm import Session, sessionmaker

import sessionscope
from sessionscope._guard import _handles, _state
from sessionscope._guard._guarded_class import GUARD_ATTRIBUTE, is_guarded_class
from sessionscope._guard._install import guard_of
from tests.conftest import require_built

NO_EXTENSIONS = bool(os.environ.get(_state.NO_EXTENSIONS_VARIABLE))
IN_PYTHON = _handles.guard_handle
IN_C: Callable[[Any, Any], None] | None = (
    None if _state.speedups is None else _state.speedups.guard_handle
)


class Guard:
    """Stands for a SessionGuard where only results are guarded (guard_handle only stores it)."""


def _in_c() -> Callable[[Any, Any], None]:
    if NO_EXTENSIONS:
        pytest.skip("SESSIONSCOPE_NO_EXTENSIONS is set: guard_handle runs in Python")
    require_built("_speedups", IN_C is not None, "guard_handle runs in Python")
    assert IN_C is not None
    return IN_C


def rows() -> IteratorResult[Any]:
    return IteratorResult(SimpleResultMetaData(["n"]), iter([(1,), (2,)]))


def fresh_result_class() -> type[IteratorResult[Any]]:
    """A Result class no guarded session has handed out yet (no checked subclass made)."""

    class Fresh(IteratorResult):  # type: ignore[type-arg]
        pass

    return Fresh


def what_it_became(handle: Any) -> dict[str, Any]:
    """The classes of a handle (and of the result under a filter) and the guards they hold."""
    became: dict[str, Any] = {"class": type(handle), "guarded": is_guarded_class(type(handle))}
    real = getattr(handle, "_real_result", None)
    if real is not None:
        became.update(real_class=type(real), real_guard=real.__dict__.get(GUARD_ATTRIBUTE))
    if isinstance(handle, Result):
        became["guard"] = handle.__dict__.get(GUARD_ATTRIBUTE)
    return became


@pytest.fixture
def session_and_guard() -> Iterator[tuple[Session, Any]]:
    """A plain session, and the real guard of a guarded one of this unit: the plain session's
    handles are guarded with it, and its checked connection and transaction then close in the
    unit that owns it."""
    engine = create_engine("sqlite://")
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    with Scoped.scope() as owner, Session(engine) as plain:
        yield plain, guard_of(owner)
    engine.dispose()


@pytest.fixture
def session(session_and_guard: tuple[Session, Any]) -> Session:
    return session_and_guard[0]


HANDLES: dict[str, Callable[[Session], Any]] = {
    "a core result": lambda s: s.execute(text("select 1 union select 2")),
    "scalars()": lambda s: s.execute(text("select 1 union select 2")).scalars(),
    "mappings()": lambda s: s.execute(text("select 1 union select 2")).mappings(),
    "an ORM-less select": lambda s: s.execute(select(text("1"))),
    "an iterator result": lambda s: rows(),
    "its scalars()": lambda s: rows().scalars(),
    "a connection": lambda s: s.connection(),
    "a session transaction": lambda s: s.get_transaction() or s.begin(),
    "nothing": lambda s: None,
    "a value": lambda s: 42,
}


@pytest.mark.parametrize("kind", list(HANDLES))
def test_c_and_python_guard_twin_handles_alike(
    kind: str, session_and_guard: tuple[Session, Any]
) -> None:
    guard_in_c = _in_c()
    session, guard = session_and_guard
    by_python, by_c = HANDLES[kind](session), HANDLES[kind](session)
    IN_PYTHON(by_python, guard)
    guard_in_c(by_c, guard)
    if by_python is by_c:  # (the session's one connection or transaction: guarded twice)
        return
    assert what_it_became(by_c) == what_it_became(by_python)


def test_the_first_result_of_a_class_makes_its_checked_class_in_python(session: Session) -> None:
    """No checked subclass yet: the C function hands the result to Python, which makes it; the
    next result of that class is switched in C to the same checked subclass."""
    guard_in_c = _in_c()
    cls = fresh_result_class()
    first, second = (cls(SimpleResultMetaData(["n"]), iter([(1,)])) for _ in range(2))
    guard = Guard()
    guard_in_c(first, guard)
    assert is_guarded_class(type(first)) and type(first).__mro__[1] is cls
    assert first.__dict__[GUARD_ATTRIBUTE] is guard
    guard_in_c(second, guard)
    assert type(second) is type(first) and second.__dict__[GUARD_ATTRIBUTE] is guard


def test_a_result_guarded_already_keeps_its_guard(session: Session) -> None:
    """As in Python: the guard a result holds is not replaced (it was handed out first)."""
    guard_in_c = _in_c()
    result = session.execute(text("select 1"))
    first, second = Guard(), Guard()
    guard_in_c(result, first)
    guard_in_c(result.scalars(), second)
    assert result.__dict__[GUARD_ATTRIBUTE] is first


def test_the_checked_methods_hand_out_through_c_where_it_is_built() -> None:
    _in_c()
    assert _handles.hand_out is IN_C


def test_guard_handle_refuses_a_wrong_call() -> None:
    guard_in_c = _in_c()
    with pytest.raises(TypeError, match=r"guard_handle\(handle, guard\)"):
        guard_in_c(rows())  # type: ignore[call-arg]
