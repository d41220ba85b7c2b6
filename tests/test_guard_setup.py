"""A new session's guard set up in C (``sessionscope._guard_setup``) and in Python: the same guard.

The C set-up takes the usual case of ``_install.install()`` (a session born guarded, made for a
unit of work) and the Python code stays the reference. Each test below makes one session each way
in the same unit, from the same line, and compares every field of the two guards and what the
set-up registers elsewhere (the lineage, the unit of work, the write checks, the identity map).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import greenlet
import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import sessionscope
from sessionscope import _fork
from sessionscope._guard import _install, _lineage, _state, _writes
from sessionscope._guard._install import guard_of
from sessionscope._work import current_work
from tests.conftest import require_built

NO_EXTENSIONS = bool(os.environ.get(_state.NO_EXTENSIONS_VARIABLE))
in_c = pytest.mark.skipif(
    _install.guard_new_session is None,
    reason="sessionscope._guard_setup is not built here (or SESSIONSCOPE_NO_EXTENSIONS is set)",
)


def test_the_set_up_runs_in_c_where_the_module_is_built() -> None:
    if NO_EXTENSIONS:
        assert _install.guard_new_session is None
        return
    require_built("_guard_setup", _install.guard_new_session is not None, "the Python set-up runs")
    calls: list[Any] = []
    in_python = _install.install_in_python

    def spy(*args: Any) -> Any:
        calls.append(args)
        return in_python(*args)

    Scoped = sessionscope.scoped_session(sessionmaker(create_engine("sqlite://")))
    _install.install_in_python = spy  # type: ignore[assignment]
    try:
        with Scoped.scope() as session:
            assert guard_of(session) is not None
    finally:
        _install.install_in_python = in_python  # type: ignore[assignment]
    assert calls == []  # the usual case never reached the Python set-up


class python_set_up:
    """``with python_set_up():`` makes the sessions guarded inside it the Python way."""

    def __enter__(self) -> None:
        self.saved = _install.guard_new_session
        _install.guard_new_session = None

    def __exit__(self, *exc_info: object) -> None:
        _install.guard_new_session = self.saved


def set_up(in_python: bool) -> contextlib.AbstractContextManager[None]:
    return python_set_up() if in_python else contextlib.nullcontext()


def both_ways(make: Callable[[bool], Any]) -> tuple[Any, Any]:
    """(made in C, made in Python): ``make(in_python)`` called from one line for both sites."""
    made = []
    for in_python in (False, True):
        made.append(make(in_python))
    return made[0], made[1]


def assert_same_guards(in_c: Any, in_python: Any) -> None:
    """The guards of two sessions made in one unit of work, one after the other: equal fields,
    each registered for its own session, the second lent (as its own link) after the first."""
    first, second = guard_of(in_c), guard_of(in_python)
    assert first is not None and second is not None
    for name in ("mode", "label", "created_at", "of_async", "owned_by_job", "generation", "state"):
        assert getattr(first, name) == getattr(second, name), name
    assert first.state == _state.OWNED and first.generation == _fork.generation
    assert first.created_at is not None and first.created_at[0] == __file__
    assert (first.depth, first.entered, first.after_leave) == (0, None, None)
    assert (second.depth, second.entered, second.after_leave) == (0, None, None)
    hook_code = [getattr(g.on_hand_off, "__code__", g.on_hand_off) for g in (first, second)]
    assert hook_code[0] == hook_code[1] and hook_code[0] is not None
    work = current_work()
    assert work is not None
    for guard, session in ((first, in_c), (second, in_python)):
        sync = session.sync_session if isinstance(session, AsyncSession) else session
        assert guard.session_key == sync.hash_key
        assert guard.session_ref() is session
        assert guard.owner_ref() is work and guard.fast_key is guard.owner_ref
        assert guard.token is _lineage.ITSELF  # its first ownership: the guard is its own link
        assert _writes.guard_of_state(SimpleNamespace(session_id=sync.hash_key)) is guard
        assert any(link is guard for link in work.owned_guards())
        assert type(sync.identity_map._modified) is _install.watch_flagging.__self__.FlaggingChecked  # type: ignore[attr-defined]
        assert sync.identity_map._modified.guard is guard
        assert guard.is_owned_by_current()
    assert second.parent is first
    assert second.length == first.length + 1
    assert second.rebuild_at == first.rebuild_at
    assert _lineage.current_lineage.get() is second


@pytest.fixture
def maker() -> Iterator[sessionmaker[Session]]:
    engine = create_engine("sqlite://")
    yield sessionmaker(engine)
    engine.dispose()


@in_c
@pytest.mark.parametrize("unit", ["thread", "greenlet", "task"])
def test_implicit_sessions_get_the_same_guard(maker: sessionmaker[Session], unit: str) -> None:
    by_c = sessionscope.scoped_session(maker)
    by_python = sessionscope.scoped_session(maker)

    def make(in_python: bool) -> Session:
        registry = by_python if in_python else by_c
        with set_up(in_python):
            return registry()  # (one line: one "created at" site for both)

    def compare() -> None:
        assert_same_guards(*both_ways(make))

    if unit == "thread":
        failures: list[BaseException] = []

        def run() -> None:
            try:
                compare()
            except BaseException as exc:  # (reported by the test's thread)
                failures.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if failures:
            raise failures[0]
    elif unit == "greenlet":
        greenlet.greenlet(compare).switch()
    else:

        async def main() -> None:
            await asyncio.create_task(asyncio.to_thread(lambda: None))  # (a loop in use)
            await asyncio.create_task(_async(compare))

        asyncio.run(main())


async def _async(fn: Callable[[], None]) -> None:
    fn()


@in_c
def test_scopes_get_the_same_guard(maker: sessionmaker[Session]) -> None:
    Scoped = sessionscope.scoped_session(maker, guard="warn")
    with contextlib.ExitStack() as scopes:

        def enter(in_python: bool) -> Session:
            with set_up(in_python):
                return scopes.enter_context(Scoped.scope(new=True))

        outer, inner = both_ways(enter)
        assert guard_of(outer).mode == "warn"  # type: ignore[union-attr]
        assert_same_guards(outer, inner)


@in_c
def test_async_sessions_get_the_same_guard() -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    by_c = sessionscope.async_scoped_session(async_sessionmaker(engine))
    by_python = sessionscope.async_scoped_session(async_sessionmaker(engine))

    def make(in_python: bool) -> AsyncSession:
        registry = by_python if in_python else by_c
        with set_up(in_python):
            return registry()

    async def main() -> None:
        made, made_too = both_ways(make)
        assert guard_of(made).of_async  # type: ignore[union-attr]
        assert_same_guards(made, made_too)
        await by_c.remove()
        await by_python.remove()

    asyncio.run(main())
    asyncio.run(engine.dispose())


@in_c
def test_the_lineage_is_pruned_as_in_python(maker: sessionmaker[Session]) -> None:
    """Many sessions made and closed in one unit: the chain of tokens is rebuilt at the same
    lengths, whichever set-up made the sessions."""
    Scoped = sessionscope.scoped_session(maker)

    def chain_lengths(in_python: bool) -> list[tuple[int, int]]:
        lengths = []

        def run() -> None:
            for _ in range(40):
                with set_up(in_python):
                    Scoped()
                token = _lineage.current_lineage.get()
                assert token is not None
                lengths.append((token.length, token.rebuild_at))
                Scoped.remove()

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return lengths

    by_c, by_python = both_ways(chain_lengths)
    assert len(by_c) == 40 and by_c == by_python
    assert min(length for length, _ in by_c) < max(length for length, _ in by_c)  # (pruned)


class _Owner:
    """What a link's guard is read for: its ``token`` (which link it owns by now) and its
    session's ``hash_key`` (whether that session is alive), and its fields as a link itself."""

    token: Any = None
    session_key: Any = None
    parent: Any = None
    length = 0
    rebuild_at = 0


def _chain(spec: str) -> tuple[list[Any], list[Any]]:
    """Links oldest first, one per letter. Tokens: ``l`` lendable, ``d`` its guard dead, ``o``
    its guard owning by another link now, ``s`` its session gone. Guards that are their own link:
    ``g`` lendable, ``x`` its session gone, ``y`` owned anew (by a token). (What is kept alive,
    and the links.)"""
    kept: list[Any] = []
    links: list[Any] = []
    parent = None
    for length, kind in enumerate(spec, 1):
        guard = _Owner()
        session = Session()
        guard.session_key = session.hash_key
        if kind in "lgdoy":
            kept.append(session)
        if kind in "gxy":
            link: Any = guard
            guard.token = _lineage.ITSELF if kind != "y" else object()
        else:
            link = _lineage.BorrowToken(guard)
            guard.token = link if kind in "ls" else object()
        link.parent, link.length, link.rebuild_at = parent, length, 99
        if kind != "d":
            kept.append(guard)
        links.append(link)
        parent = link
    guard = session = None  # (the last ones: not kept by these names)
    gc.collect()  # (the dead ones' guards and sessions: freed now)
    return kept, links


@in_c
@pytest.mark.parametrize(
    "spec",
    ["", "l", "d", "g", "x", "ldldl", "dddd", "llll", "oldlo", "gxgyg", "lgsxodly", "l" * 20 + "d"],
)
def test_dead_links_are_dropped_as_in_python(spec: str) -> None:
    """The C set-up's ``drop_dead`` (what it calls once a chain has grown to twice its live
    length) relinks a chain as ``_lineage._drop_dead`` does: the same tokens, lengths and
    rebuild point."""
    from sessionscope import _guard_setup  # type: ignore[attr-defined]

    def dropped(drop: Callable[[Any], Any]) -> list[tuple[int, int, int]]:
        kept, links = _chain(spec)
        head = drop(links[-1] if links else None)
        found = []
        while head is not None:
            found.append((links.index(head), head.length, head.rebuild_at))
            head = head.parent
        del kept
        return found

    by_c = dropped(_guard_setup.drop_dead)
    by_python = dropped(lambda head: None if head is None else _lineage._drop_dead(head))
    assert by_c == by_python
    assert [index for index, _, _ in by_c] == [i for i, k in enumerate(spec) if k in "lg"][::-1]


@in_c
def test_what_is_not_the_usual_case_is_left_to_python(maker: sessionmaker[Session]) -> None:
    """The C set-up does nothing and answers None: the Python code then does it all."""
    guard_new_session = _install.guard_new_session
    assert guard_new_session is not None
    work = sessionscope.unit_of_work()
    with work:
        unit_work = current_work()
        plain = maker()  # not of a guarded class (the registry's maker was not used)
        assert guard_new_session(plain, "raise", None, None, unit_work, 1) is None
        assert guard_of(plain) is None
        Scoped = sessionscope.scoped_session(maker)
        session = Scoped()
        assert guard_new_session(session, "off", None, None, unit_work, 1) is None
        assert guard_new_session(session, "raise", None, None, unit_work, 1) is None  # guarded
        assert guard_new_session(session, "raise", None, None, None, 1) is None  # no work
        Scoped.remove()


@pytest.mark.parametrize("in_python", [False, True])
def test_write_checks_find_the_guard_through_sqlalchemys_sessions(
    maker: sessionmaker[Session], in_python: bool
) -> None:
    """Whichever set-up made it, a written object's guard is found through SQLAlchemy's own
    registry of sessions by id, in C and in Python alike: a guarded session's, none for a plain
    Session's objects or once the session is gone, and another unit's write is refused."""
    Scoped = sessionscope.scoped_session(maker)
    with set_up(in_python):
        session = Scoped()
    guard = guard_of(session)
    assert guard is not None
    state = SimpleNamespace(session_id=session.hash_key, class_=object)
    assert _writes.guard_of_state(state) is guard
    plain = Session(bind=session.bind)
    assert _writes.guard_of_state(SimpleNamespace(session_id=plain.hash_key)) is None
    _writes._check(SimpleNamespace(session_id=plain.hash_key, class_=object), "name")  # no guard
    _writes._check(state, "name")  # the owner's own write

    refused: list[BaseException] = []

    def write_from_another_thread() -> None:
        try:
            _writes._check(state, "name")
        except sessionscope.exc.CrossUnitError as error:
            refused.append(error)

    thread = threading.Thread(target=write_from_another_thread)
    thread.start()
    thread.join()
    assert len(refused) == 1 and "name" in str(refused[0])
    Scoped.remove()
    del session, guard, plain
    gc.collect()
    assert _writes.guard_of_state(state) is None  # the session is gone from SQLAlchemy's registry


@in_c
def test_the_guards_reference_to_its_work_is_left_to_reference_counting(
    maker: sessionmaker[Session],
) -> None:
    """The guard's weak reference to its unit of work (callback-less: CPython's one per work) is
    untracked by the collector, an object less per live unit for it to walk, and the guard is its
    own lineage link (no token object at all). Once the unit has ended, its work, its guard (held
    by the work and the lineage) and its session are freed by reference counting. Works and
    guards that die in collected cycles clear the reference, and their sessions end."""
    Scoped = sessionscope.scoped_session(maker)

    def unit() -> tuple[Any, Any, int]:
        session = Scoped()
        guard = guard_of(session)
        assert guard is not None and guard.token is _lineage.ITSELF
        return guard.owner_ref, weakref.ref(guard), session.hash_key

    holder: dict[str, Any] = {}
    gc.disable()  # (reference counting alone)
    try:
        thread = threading.Thread(target=lambda: holder.update(result=unit()))
        thread.start()
        thread.join()
        owner_ref, guard_ref, key = holder["result"]
        assert not gc.is_tracked(owner_ref)
        assert owner_ref() is None  # the thread's work ended and was freed: the reference cleared
        assert guard_ref() is None and key not in _writes._live_session_refs
    finally:
        gc.enable()

    keys = []
    for _ in range(200):  # works and guards freed by the collector, in cycles
        context = contextvars.Context()
        session = context.run(Scoped)
        keys.append(session.hash_key)
        cycle: list[Any] = [context, session]
        cycle.append(cycle)
        del context, session, cycle
    gc.collect()
    assert not [k for k in keys if k in _writes._live_session_refs]  # the sessions were freed
    assert len(Scoped.registry) == 0
