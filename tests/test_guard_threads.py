"""The share-nothing guard with a sync Session and real OS threads, on SQLite and PostgreSQL.

A guarded session belongs to the unit that made it. Threads that inherited the owner's context
(``asyncio.to_thread``, anyio's thread pool, ``copy_context().run``) may borrow it while the owner
waits; any other thread is refused before anything happens, with a message that names both
threads, where the session was made and what to do. Two borrowers inside at once are refused too.
The ways across are ``hand_off``/``adopt`` and ``SharedSession``; a forked child is refused, and
sessionscope's own end-of-thread cleanup is not.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
import pytest
from sqlalchemy import Engine, ForeignKey, event, exc, func, inspect, select, text
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

import sessionscope
from tests.models import Child, Parent, Row

ScopedSession = sessionscope.scoped_session[Session]
JOIN_TIMEOUT = 30.0
WAIT_TIMEOUT = 10.0


# -- helpers ------------------------------------------------------------------------------------


def _this_file() -> str:
    """This file as the guard's messages spell it (relative to the working directory)."""
    relative = os.path.relpath(__file__)
    return __file__ if relative.startswith(os.pardir) else relative


THIS_FILE = _this_file()


def here(offset: int = 0) -> str:
    """'created at <this file>:<line> (in <function>)' for the caller's line, as messages say it.

    Used on the line that makes a session: ``session, site = Scoped(), here()``.
    """
    frame = sys._getframe(1)
    return f"created at {THIS_FILE}:{frame.f_lineno + offset} (in {frame.f_code.co_name})"


def this_thread() -> str:
    """How messages describe the running thread."""
    return f"thread {threading.current_thread().name!r} (native id {threading.get_native_id()})"


def background(anchor: str) -> str:
    return f"(Background on this error: sessionscope docs/errors.md#{anchor})"


@dataclass
class Outcome:
    """What a function run in another thread returned or raised, and which thread that was."""

    value: Any = None
    error: BaseException | None = None
    unit: str = ""


def _capture(fn: Callable[[], Any], outcome: Outcome) -> None:
    outcome.unit = this_thread()
    try:
        outcome.value = fn()
    except BaseException as error:  # noqa: BLE001 - reported to the test
        outcome.error = error


def start_thread(
    fn: Callable[[], Any], name: str, *, context: contextvars.Context | None = None
) -> tuple[threading.Thread, Outcome]:
    """Start ``fn`` in a new thread (in ``context`` if given, else in the thread's own)."""
    outcome = Outcome()
    if context is None:
        thread = threading.Thread(target=_capture, args=(fn, outcome), name=name)
    else:
        thread = threading.Thread(target=context.run, args=(_capture, fn, outcome), name=name)
    thread.start()
    return thread, outcome


def join(thread: threading.Thread) -> None:
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive(), f"{thread.name} did not finish"


def in_thread(fn: Callable[[], Any], name: str = "intruder") -> Outcome:
    """Run ``fn`` in a thread started by hand: it starts from an empty context."""
    thread, outcome = start_thread(fn, name)
    join(thread)
    return outcome


def in_pool(fn: Callable[[], Any], name: str = "intruder-pool") -> Outcome:
    """Run ``fn`` through ``ThreadPoolExecutor.submit``, which copies no context."""
    outcome = Outcome()
    with ThreadPoolExecutor(1, thread_name_prefix=name) as pool:
        pool.submit(_capture, fn, outcome).result(JOIN_TIMEOUT)
    return outcome


def in_copied_context(fn: Callable[[], Any], name: str = "borrower") -> Outcome:
    """Run ``fn`` in a thread that runs a copy of the caller's context: a borrower."""
    thread, outcome = start_thread(fn, name, context=contextvars.copy_context())
    join(thread)
    return outcome


def assert_refused(
    outcome: Outcome,
    *,
    other: str,
    site: str | None,
    kind: type[sessionscope.ShareNothingError] = sessionscope.CrossUnitError,
    anchor: str = "guard-cross-unit",
) -> str:
    """``outcome`` is the guard's refusal naming both units, the session's site and the docs.

    ``other`` is the unit the refused one collided with: the owner, or the unit inside.
    """
    assert type(outcome.error) is kind, f"expected {kind.__name__}, got {outcome.error!r}"
    message = str(outcome.error)
    assert other in message, message
    assert outcome.unit in message, message
    assert site is None or site in message, message
    assert message.endswith(background(anchor)), message
    return message


def owners(engine: Engine) -> Counter[str]:
    """Committed rows per owner, read on a connection of its own."""
    with engine.connect() as conn:
        return Counter(conn.scalars(select(Row.owner)).all())


def n_of(engine: Engine, row_id: int) -> int | None:
    with engine.connect() as conn:
        return conn.scalar(select(Row.n).where(Row.id == row_id))


def family(engine: Engine) -> set[tuple[str, str]]:
    """Committed (parent name, child name) pairs."""
    with engine.connect() as conn:
        return {
            (parent, child)
            for parent, child in conn.execute(
                select(Parent.name, Child.name).join(Child, Child.parent_id == Parent.id)
            )
        }


S = TypeVar("S", bound=Session)


@pytest.fixture
def track(engine: Engine) -> Iterator[Callable[[S], S]]:
    """``track(session)`` closes ``session`` after the test whoever owns it by then.

    A test that fails half-way must not leave a connection in a transaction behind: on
    PostgreSQL its locks would block the next test's tables from being dropped.
    """
    sessions: list[Session] = []

    def tracked(session: S) -> S:
        sessions.append(session)
        return session

    yield tracked
    for session in sessions:
        sessionscope.guard(session, "off")  # the test is over: whoever owns it, close it
        session.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.fixture
def Scoped(engine: Engine, track: Callable[[Session], Session]) -> Iterator[ScopedSession]:
    """A guarded registry; its sessions are closed (and the pool checked) after the test."""
    registry: ScopedSession = sessionscope.scoped_session(sessionmaker(engine))
    yield registry
    registry.remove()


# -- 1. a thread that is not a borrower is refused, and nothing happens ------------------------


@dataclass
class World:
    """A guarded session owned by the main thread, with loaded objects to misuse."""

    session: Session
    site: str
    owner: str
    row: Row  # ("seed", n=1), loaded
    parent: Parent  # "p" with children c1, c2 (not loaded)
    other: Parent  # "q", no children
    stranger: Row = field(default_factory=lambda: Row(owner="intruder", n=7))
    new_child: Child = field(default_factory=lambda: Child(name="intruder"))
    pending: Row = field(default_factory=lambda: Row(owner="pending", n=3))  # added after prepare
    child: Child | None = None
    final_n: int = 1  # the seed row's n once the owner has committed after the refusal


@pytest.fixture
def world(Scoped: ScopedSession) -> World:
    session, site = Scoped(), here()
    session.add_all(
        [
            Row(owner="seed", n=1),
            Parent(name="p", children=[Child(name="c1"), Child(name="c2")]),
            Parent(name="q"),
        ]
    )
    session.commit()
    row = session.scalars(select(Row)).one()
    parent, other = session.scalars(select(Parent).order_by(Parent.id)).all()
    assert "children" in inspect(parent).unloaded
    return World(session, site, this_thread(), row, parent, other)


def load_children(w: World) -> None:
    assert [c.name for c in w.parent.children] == ["c1", "c2"]


def load_child_and_parent(w: World) -> None:
    load_children(w)
    w.child = w.parent.children[0]
    assert w.child.parent is w.parent  # loaded by the owner, from the identity map


def load_child_only(w: World) -> None:
    w.child = w.session.scalars(select(Child).where(Child.name == "c1")).one()
    assert "parent" in inspect(w.child).unloaded  # its parent "p" is in the identity map


def expire_by_commit(w: World) -> None:
    w.session.commit()
    assert "n" in inspect(w.row).expired_attributes


def modify_row(w: World) -> None:
    w.row.n = 5
    w.final_n = 5


def unmodified(*objs: Any) -> Callable[[World], None]:
    def check(w: World) -> None:
        for name in objs:
            obj = getattr(w, name)
            assert not w.session.is_modified(obj), f"{name} was modified"
            assert obj not in w.session.dirty

    return check


def still_pending(w: World) -> None:
    """The owner's pending row was neither flushed, committed, rolled back nor expunged."""
    assert w.pending in w.session.new


def stranger_not_added(w: World) -> None:
    assert w.stranger not in w.session and inspect(w.stranger).transient


def row_untouched(w: World) -> None:
    assert w.row in w.session and w.row not in w.session.deleted
    assert not inspect(w.row).expired_attributes
    assert (w.row.owner, w.row.n) == ("seed", 1)
    unmodified("row")(w)


def row_still_modified(w: World) -> None:
    assert w.row.n == 5 and w.session.is_modified(w.row)  # refresh() would have discarded it


def children_still_unloaded(w: World) -> None:
    assert "children" in inspect(w.parent).unloaded


def parent_still_unloaded(w: World) -> None:
    assert w.child is not None and "parent" in inspect(w.child).unloaded


def row_still_expired(w: World) -> None:
    assert "n" in inspect(w.row).expired_attributes


def family_unchanged(w: World) -> None:
    assert [c.name for c in w.parent.children] == ["c1", "c2"]
    assert all(c.parent is w.parent for c in w.parent.children)
    assert w.new_child.parent is None and w.new_child not in w.session  # no backref, no cascade
    assert "children" in inspect(w.other).unloaded  # nothing was appended by a backref
    unmodified("parent", "other")(w)
    for c in w.parent.children:
        assert not w.session.is_modified(c)


@dataclass
class Case:
    attack: Callable[[World], Any]
    unchanged: Callable[[World], None] = still_pending
    prepare: Callable[[World], None] | None = None


CASES: dict[str, Case] = {
    "execute": Case(lambda w: w.session.execute(select(Row))),
    "add": Case(lambda w: w.session.add(w.stranger), stranger_not_added),
    "add_all": Case(lambda w: w.session.add_all([w.stranger]), stranger_not_added),
    "flush": Case(lambda w: w.session.flush()),
    "commit": Case(lambda w: w.session.commit()),
    "rollback": Case(lambda w: w.session.rollback(), row_still_modified, modify_row),
    "get": Case(lambda w: w.session.get(Row, w.row.id)),
    "refresh": Case(lambda w: w.session.refresh(w.row), row_still_modified, modify_row),
    "merge": Case(lambda w: w.session.merge(Row(id=w.row.id, owner="merged", n=99)), row_untouched),
    "connection": Case(lambda w: w.session.connection()),
    "scalars": Case(lambda w: w.session.scalars(select(Row)).all()),
    "scalar": Case(lambda w: w.session.scalar(select(func.count()).select_from(Row))),
    "query": Case(lambda w: w.session.query(Row).all()),
    "delete": Case(lambda w: w.session.delete(w.row), row_untouched),
    "close": Case(lambda w: w.session.close(), row_untouched),
    "expire": Case(lambda w: w.session.expire(w.row), row_untouched),
    "expire_all": Case(lambda w: w.session.expire_all(), row_untouched),
    "expunge": Case(lambda w: w.session.expunge(w.row), row_untouched),
    "lazy load of a collection": Case(lambda w: len(w.parent.children), children_still_unloaded),
    "lazy many-to-one from the identity map": Case(
        lambda w: w.child and w.child.parent, parent_still_unloaded, load_child_only
    ),
    "refresh of an expired attribute": Case(lambda w: w.row.n, row_still_expired, expire_by_commit),
    "scalar attribute write": Case(lambda w: setattr(w.row, "n", 99), row_untouched),
    "many-to-one write": Case(
        lambda w: setattr(w.child, "parent", w.other), family_unchanged, load_child_and_parent
    ),
    "collection append": Case(
        lambda w: w.parent.children.append(w.new_child), family_unchanged, load_children
    ),
    "collection remove": Case(
        lambda w: w.parent.children.remove(w.parent.children[0]), family_unchanged, load_children
    ),
    "collection clear": Case(lambda w: w.parent.children.clear(), family_unchanged, load_children),
}

EARLY: dict[str, tuple[Case, str]] = {
    # writes that SQLAlchemy performs partly before its usual listeners run (regressions)
    "collection replace": (
        Case(
            lambda w: setattr(w.parent, "children", [w.new_child]),
            family_unchanged,
            load_children,
        ),
        "fixed bug: a refused `parent.children = [...]` has already swapped in a new, empty "
        "collection and marked the parent modified (CollectionAttributeImpl.set assigns before "
        "the append events fire); the owner's next flush then detaches c1 and c2",
    ),
    "attribute delete": (
        Case(lambda w: delattr(w.row, "n"), row_untouched),
        "fixed bug: `del obj.attr` on a scalar attribute is not checked (only 'set' is listened to "
        "for scalars), so another thread deletes the value and marks the object modified",
    ),
}

POOL_CASES = ("execute", "commit", "lazy load of a collection", "scalar attribute write")
"""Also run from a ThreadPoolExecutor: who the thread is matters, not what it calls."""

CASE_PARAMS = (
    [pytest.param(case, in_thread, id=f"{name}-Thread") for name, case in CASES.items()]
    + [pytest.param(CASES[name], in_pool, id=f"{name}-ThreadPoolExecutor") for name in POOL_CASES]
    + [pytest.param(case, in_thread, id=f"{name}-Thread") for name, (case, _) in EARLY.items()]
)


@pytest.mark.parametrize(("case", "run"), CASE_PARAMS)
def test_a_thread_that_is_not_a_borrower_is_refused_and_nothing_happens(
    case: Case, run: Callable[[Callable[[], Any]], Outcome], world: World, engine: Engine
) -> None:
    w, session = world, world.session
    if case.prepare is not None:
        case.prepare(w)
    session.add(w.pending)

    outcome = run(lambda: case.attack(w))

    assert_refused(outcome, other=w.owner, site=w.site)
    assert outcome.unit.startswith("thread 'intruder") and outcome.unit != w.owner
    case.unchanged(w)
    still_pending(w)
    assert owners(engine) == Counter({"seed": 1})  # nothing reached the database
    # the owner goes on as if nothing had happened
    session.add(Row(owner="after", n=2))
    session.commit()
    assert session.scalars(select(Row.owner).order_by(Row.id)).all() == ["seed", "pending", "after"]
    assert owners(engine) == Counter({"seed": 1, "pending": 1, "after": 1})
    assert n_of(engine, w.row.id) == w.final_n
    assert family(engine) == {("p", "c1"), ("p", "c2")}
    session.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


class OrphanBase(DeclarativeBase):
    pass


class Order(OrphanBase):
    __tablename__ = "ss_guard_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    lines: Mapped[list[Line]] = relationship(back_populates="order", cascade="all, delete-orphan")


class Line(OrphanBase):
    __tablename__ = "ss_guard_lines"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("ss_guard_orders.id"))
    qty: Mapped[int]
    order: Mapped[Order] = relationship(back_populates="lines")


def test_a_refused_remove_does_not_orphan_the_object(Scoped: ScopedSession, engine: Engine) -> None:
    OrphanBase.metadata.create_all(engine)
    try:
        session = Scoped()
        session.add(Order(lines=[Line(qty=1), Line(qty=1)]))
        session.commit()
        order = session.scalars(select(Order)).one()
        first = order.lines[0]

        outcome = in_thread(lambda: order.lines.remove(first))

        assert type(outcome.error) is sessionscope.CrossUnitError
        assert first in order.lines and not session.is_modified(order)
        first.qty = 2  # the owner's own, legitimate change
        session.commit()
        assert session.scalar(select(func.count()).select_from(Line)) == 2
    finally:
        Scoped.remove()
        OrphanBase.metadata.drop_all(engine)


# -- 2. borrowers: threads that inherited the owner's context ----------------------------------


def seed_parent(session: Session) -> Parent:
    session.add(Parent(name="p", children=[Child(name="c1")]))
    session.commit()
    parent = session.scalars(select(Parent)).one()
    assert "children" in inspect(parent).unloaded
    return parent


def borrowed_work(session: Session, parent: Parent, label: str) -> str:
    """What a borrowing thread does with the owner's session and objects; returns its name."""
    session.add_all([Row(owner=label, n=i) for i in range(3)])
    session.flush()
    parent.children.append(Child(name=label))  # a lazy load, then a collection append
    parent.name = label  # a scalar write
    assert session.scalar(select(func.count()).select_from(Row).where(Row.owner == label)) == 3
    return threading.current_thread().name


def assert_borrowed_work_landed(engine: Engine, label: str) -> None:
    assert owners(engine) == Counter({label: 3})
    assert family(engine) == {(label, "c1"), (label, label)}


def this_task() -> str:
    task = asyncio.current_task()
    assert task is not None
    return f"asyncio task {task.get_name()!r}"


async def refused_in_executor(work: Callable[[], Any]) -> Outcome:
    """Run ``work`` with ``loop.run_in_executor``, which copies no context: not a borrower."""
    outcome = Outcome()
    await asyncio.get_running_loop().run_in_executor(None, _capture, work, outcome)
    return outcome


def test_asyncio_to_thread_borrows_a_tasks_session(Scoped: ScopedSession, engine: Engine) -> None:
    async def request() -> str:
        session, site = Scoped(), here()  # the task's own implicit session
        parent = seed_parent(session)
        refused = await refused_in_executor(lambda: borrowed_work(session, parent, "executor"))
        assert_refused(refused, other=this_task(), site=site)

        name = await asyncio.to_thread(borrowed_work, session, parent, "to_thread")

        session.commit()
        return name

    assert asyncio.run(request()) != threading.current_thread().name
    assert_borrowed_work_landed(engine, "to_thread")


def test_anyio_to_thread_borrows_a_tasks_session(Scoped: ScopedSession, engine: Engine) -> None:
    async def request() -> str:
        session, site = Scoped(), here()
        parent = seed_parent(session)
        refused = await refused_in_executor(lambda: borrowed_work(session, parent, "executor"))
        assert_refused(refused, other=this_task(), site=site)

        # the thread pool of Starlette and FastAPI for sync endpoints and dependencies
        name: str = await anyio.to_thread.run_sync(borrowed_work, session, parent, "anyio")

        session.commit()
        return name

    assert asyncio.run(request()) != threading.current_thread().name
    assert_borrowed_work_landed(engine, "anyio")


def test_a_thread_running_a_copied_context_borrows_a_threads_session(
    Scoped: ScopedSession, engine: Engine
) -> None:
    session, site = Scoped(), here()
    parent = seed_parent(session)
    refused = in_thread(lambda: borrowed_work(session, parent, "plain"))
    assert_refused(refused, other=this_thread(), site=site)

    borrowed = in_copied_context(lambda: borrowed_work(session, parent, "copied"))

    assert borrowed.error is None and borrowed.value == "borrower"
    session.commit()
    assert_borrowed_work_landed(engine, "copied")


def test_a_scope_session_is_borrowed_by_the_work_it_sends_to_to_thread(
    Scoped: ScopedSession, engine: Engine
) -> None:
    async def request() -> str:
        with Scoped.scope() as session:
            site = here(-1)
            parent = seed_parent(session)
            refused = await refused_in_executor(lambda: borrowed_work(session, parent, "executor"))
            assert_refused(refused, other=this_task(), site=site)

            def work() -> str:
                assert Scoped() is session  # the registry follows the context too
                return borrowed_work(Scoped(), parent, "scoped")

            name = await asyncio.to_thread(work)
        return name  # the block committed what the borrower wrote

    assert asyncio.run(request()) != threading.current_thread().name
    assert_borrowed_work_landed(engine, "scoped")


# -- 3. two units inside one session at once ----------------------------------------------------


@pytest.mark.parametrize("second_op", ["add", "execute", "attribute write", "owner's execute"])
def test_a_second_unit_inside_the_session_at_the_same_time_is_refused(
    second_op: str, Scoped: ScopedSession, engine: Engine
) -> None:
    session, site = Scoped(), here()
    session.add(Row(owner="seed", n=1))
    session.commit()
    seed = session.scalars(select(Row)).one()
    owner = this_thread()
    first_inside, second_tried = threading.Event(), threading.Event()
    hook_waited: list[bool] = []

    def hold_the_first_insert(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if threading.current_thread().name == "first" and statement.lstrip().startswith("INSERT"):
            first_inside.set()  # the first borrower is inside session.commit(), in its flush
            hook_waited.append(second_tried.wait(WAIT_TIMEOUT))

    def first() -> None:
        session.add(Row(owner="first", n=1))
        session.commit()

    attempts: dict[str, tuple[Callable[[], object], str]] = {
        "add": (lambda: session.add(Row(owner="second", n=1)), "called Session.add()"),
        "execute": (lambda: session.execute(select(Row)).all(), "called Session.execute()"),
        "attribute write": (lambda: setattr(seed, "n", 50), "wrote Row.n"),
        "owner's execute": (lambda: session.execute(select(Row)).all(), "called Session.execute()"),
    }
    attempt, did = attempts[second_op]

    def second() -> None:
        assert first_inside.wait(WAIT_TIMEOUT)
        try:
            attempt()
        finally:
            second_tried.set()

    event.listen(engine, "before_cursor_execute", hold_the_first_insert)
    try:
        first_thread, first_outcome = start_thread(
            first, "first", context=contextvars.copy_context()
        )
        if second_op == "owner's execute":
            second_outcome = Outcome()
            _capture(second, second_outcome)  # the owner itself, on the main thread
        else:
            second_thread, second_outcome = start_thread(
                second, "second", context=contextvars.copy_context()
            )
            join(second_thread)
        join(first_thread)
    finally:
        event.remove(engine, "before_cursor_execute", hold_the_first_insert)

    assert hook_waited == [True]
    assert first_outcome.error is None
    message = assert_refused(
        second_outcome,
        other=first_outcome.unit,
        site=site,
        kind=sessionscope.ConcurrentUseError,
        anchor="guard-concurrent",
    )
    assert f"{second_outcome.unit} {did}" in message
    assert f"while {first_outcome.unit} was inside the same Session" in message
    if second_op == "owner's execute":
        assert second_outcome.unit == owner
    assert owners(engine) == Counter({"seed": 1, "first": 1})
    assert seed.n == 1 and not session.is_modified(seed)
    # the session is fine afterwards
    session.add(Row(owner="after", n=1))
    session.commit()
    assert Counter(session.scalars(select(Row.owner)).all()) == Counter(
        {"seed": 1, "first": 1, "after": 1}
    )
    assert owners(engine) == Counter({"seed": 1, "first": 1, "after": 1})


# -- 4. modes, and guard() on sessions and sessionmakers ----------------------------------------


def test_warn_mode_warns_and_lets_the_call_proceed(
    engine: Engine, track: Callable[[Any], Any]
) -> None:
    Warned = sessionscope.scoped_session(sessionmaker(engine), guard="warn")
    session, site = Warned(), here()
    track(session)
    session.add(Row(owner="seed", n=1))
    session.commit()
    seed = session.scalars(select(Row)).one()

    def misuse() -> None:
        session.add(Row(owner="warned", n=1))
        seed.n = 9
        session.commit()

    with pytest.warns(sessionscope.ShareNothingWarning) as record:
        outcome = in_thread(misuse, name="warned-thread")

    assert outcome.error is None
    assert issubclass(sessionscope.ShareNothingWarning, exc.SAWarning)
    messages = [str(w.message) for w in record]
    assert any("called Session.add()" in m for m in messages)
    assert any("wrote Row.n" in m for m in messages)
    for m in messages:
        assert this_thread() in m and outcome.unit in m and site in m
        assert m.endswith(background("guard-cross-unit"))
    assert owners(engine) == Counter({"seed": 1, "warned": 1})
    assert n_of(engine, seed.id) == 9
    Warned.remove()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_off_mode_makes_plain_sessions(engine: Engine, track: Callable[[Any], Any]) -> None:
    maker = sessionmaker(engine)
    Guarded = sessionscope.scoped_session(maker)  # the default, for contrast
    guarded = track(Guarded())
    assert type(in_thread(lambda: guarded.execute(select(1))).error) is (
        sessionscope.CrossUnitError
    )
    Guarded.remove()
    Plain = sessionscope.scoped_session(maker, guard="off")
    session = track(Plain())
    assert type(session) is maker.class_  # exactly what the sessionmaker makes
    with Plain.scope() as scoped:
        assert type(scoped) is maker.class_
    session.add(Row(owner="seed", n=1))
    session.commit()
    seed = session.scalars(select(Row)).one()

    def use() -> None:
        session.add(Row(owner="other", n=1))
        seed.n = 4
        session.commit()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outcome = in_thread(use)
    assert outcome.error is None
    assert owners(engine) == Counter({"seed": 1, "other": 1}) and n_of(engine, seed.id) == 4
    Plain.remove()


def test_guard_off_on_a_guarded_session_turns_it_off_and_raise_turns_it_back_on(
    Scoped: ScopedSession, engine: Engine
) -> None:
    session = Scoped()
    maker_class: type[Session] = Scoped.session_factory.class_  # type: ignore[attr-defined]
    assert type(session) is not maker_class and isinstance(session, maker_class)
    assert type(session).__name__ == "Session"  # the guarded variant reads as the same class
    session.add(Row(owner="seed", n=1))
    session.commit()
    seed = session.scalars(select(Row)).one()
    assert type(in_thread(lambda: setattr(seed, "n", 2)).error) is sessionscope.CrossUnitError

    assert sessionscope.guard(session, "off") is session
    assert type(session) is maker_class

    def write_and_commit() -> None:
        seed.n = 2
        session.commit()

    outcome = in_thread(write_and_commit)
    assert outcome.error is None and n_of(engine, seed.id) == 2

    sessionscope.guard(session, "warn")  # guarded again, owned by this thread, warning
    with pytest.warns(sessionscope.ShareNothingWarning):
        assert in_thread(lambda: session.execute(select(1))).error is None
    sessionscope.guard(session, "raise")  # only the mode changes
    assert type(in_thread(lambda: session.execute(select(1))).error) is (
        sessionscope.CrossUnitError
    )
    session.add(Row(owner="after", n=1))
    session.commit()
    assert owners(engine) == Counter({"seed": 1, "after": 1})


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda e: sessionscope.scoped_session(sessionmaker(e), guard="on"),  # type: ignore[arg-type]
            id="registry",
        ),
        pytest.param(lambda e: sessionscope.guard(Session(e), "strict"), id="session"),  # type: ignore[arg-type]
        pytest.param(lambda e: sessionscope.guard(sessionmaker(e), "raises"), id="maker"),  # type: ignore[arg-type]
        pytest.param(lambda e: sessionscope.guard(Session(e), None), id="None"),  # type: ignore[arg-type]
    ],
)
def test_an_invalid_mode_is_an_argument_error(
    call: Callable[[Engine], Any], engine: Engine
) -> None:
    with pytest.raises(exc.ArgumentError, match="expects one of 'raise', 'warn' or 'off'"):
        call(engine)


def test_guard_on_a_sessionmaker_guards_the_sessions_it_makes(
    engine: Engine, track: Callable[[Any], Any]
) -> None:
    maker = sessionmaker(engine)
    maker_class = maker.class_
    assert sessionscope.guard(maker) is maker
    session, site = maker(), here()
    track(session)
    assert isinstance(session, maker_class) and type(session) is not maker_class
    session.add(Row(owner="seed", n=1))
    session.commit()

    outcome = in_thread(lambda: session.add(Row(owner="other", n=1)))

    assert_refused(outcome, other=this_thread(), site=site)
    other_maker = sessionmaker(engine)
    with other_maker() as unrelated:
        assert type(unrelated) is other_maker.class_  # other makers are left alone
    sessionscope.guard(maker, "off")
    plain = track(maker())
    assert type(plain) is maker_class
    assert in_thread(lambda: plain.execute(select(1))).error is None
    plain.close()
    session.add(Row(owner="after", n=1))
    session.commit()
    session.close()
    assert owners(engine) == Counter({"seed": 1, "after": 1})
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_guard_on_a_plain_session(engine: Engine, track: Callable[[Any], Any]) -> None:
    session, site = sessionscope.guard(Session(engine)), here()
    track(session)
    assert type(session) is not Session and isinstance(session, Session)
    seed = Row(owner="seed", n=1)
    session.add(seed)
    session.commit()
    assert "n" in inspect(seed).expired_attributes

    outcome = in_pool(lambda: seed.n)  # expired by the commit: a refresh

    assert_refused(outcome, other=this_thread(), site=site)
    assert seed.n == 1
    session.close()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# -- 5. hand_off / adopt --------------------------------------------------------------------------


def test_hand_off_and_adopt_move_a_session_to_another_thread(
    Scoped: ScopedSession, engine: Engine, track: Callable[[Any], Any]
) -> None:
    session, site = Scoped(), here()
    track(session)
    parent = seed_parent(session)
    assert [c.name for c in parent.children] == ["c1"]

    assert sessionscope.hand_off(session) is session
    assert Scoped() is not session  # the registry forgot it

    # handed off and not adopted: nobody may use it, not even its former owner
    for misuse in (lambda: session.execute(select(1)), lambda: setattr(parent, "name", "x")):
        mine = Outcome(unit=this_thread())
        _capture(misuse, mine)
        assert type(mine.error) is sessionscope.CrossUnitError
        assert "handed off" in str(mine.error) and "nobody has adopted it" in str(mine.error)
        assert mine.unit in str(mine.error) and site in str(mine.error)
    assert type(in_thread(lambda: session.get(Parent, parent.id)).error) is (
        sessionscope.CrossUnitError
    )
    assert parent.name == "p" and not session.is_modified(parent)

    adopted, go_on = threading.Event(), threading.Event()

    def adopter() -> None:
        with sessionscope.adopt(session) as mine:  # a Session closes at the end of `with`
            assert mine is session
            adopted.set()
            assert go_on.wait(WAIT_TIMEOUT)
            parent.name = "renamed"
            parent.children.append(Child(name="added"))
            session.commit()

    thread, outcome = start_thread(adopter, "adopter")
    assert adopted.wait(WAIT_TIMEOUT)
    former = Outcome()
    _capture(lambda: session.execute(select(1)), former)
    go_on.set()
    join(thread)

    assert outcome.error is None
    assert_refused(former, other=outcome.unit, site=site)  # it is the adopter's now
    assert family(engine) == {("renamed", "c1"), ("renamed", "added")}
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_adopt_without_hand_off_is_refused(Scoped: ScopedSession, engine: Engine) -> None:
    session = Scoped()
    session.add(Row(owner="seed", n=1))
    session.flush()

    outcome = in_thread(lambda: sessionscope.adopt(session), name="would-be-adopter")

    message = assert_refused(outcome, other=this_thread(), site=None, anchor="guard-hand-off")
    assert "has not handed it off" in message
    assert type(in_thread(lambda: session.execute(select(1))).error) is (
        sessionscope.CrossUnitError
    )
    session.commit()  # still the owner's
    assert Scoped() is session and owners(engine) == Counter({"seed": 1})


def test_hand_off_by_a_thread_that_does_not_own_the_session_is_refused(
    Scoped: ScopedSession, engine: Engine
) -> None:
    session = Scoped()

    outcome = in_thread(lambda: sessionscope.hand_off(session), name="not-the-owner")

    message = assert_refused(outcome, other=this_thread(), site=None, anchor="guard-hand-off")
    assert "tried to hand it off" in message
    # nothing changed: still owned here, still the registry's, and not up for adoption
    assert Scoped() is session
    assert type(in_thread(lambda: sessionscope.adopt(session)).error) is (
        sessionscope.CrossUnitError
    )
    session.add(Row(owner="owner", n=1))
    session.commit()
    assert owners(engine) == Counter({"owner": 1})


def test_a_handed_off_registry_session_survives_its_threads_end(
    Scoped: ScopedSession, engine: Engine, track: Callable[[Any], Any]
) -> None:
    handed: list[Session] = []

    def owner_thread() -> bool:
        session = Scoped()
        session.add(Row(owner="handed", n=1))
        session.flush()  # in a transaction on its connection: a close would roll it back
        handed.append(track(sessionscope.hand_off(session)))
        fresh = Scoped()
        fresh.execute(select(1))
        return fresh is not session  # ends without remove(): fresh is closed, session is not

    outcome = in_thread(owner_thread, name="owner-thread")

    assert outcome.error is None and outcome.value is True
    assert len(Scoped.registry) == 0  # type: ignore[arg-type]
    assert engine.pool.checkedout() == 1  # type: ignore[attr-defined]  # the handed-off one
    (session,) = handed
    with sessionscope.adopt(session):
        row = session.scalars(select(Row)).one()
        assert row.owner == "handed" and row in session
        session.commit()
    assert owners(engine) == Counter({"handed": 1})
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


# -- 6. SharedSession ----------------------------------------------------------------------------

THREADS, ROUNDS = 6, 15


def read_modify_write(session: Session, counter_id: int, writes: list[int]) -> None:
    """One increment of the counter row, as an application would write it."""
    row = session.get(Row, counter_id)
    assert row is not None
    n = row.n
    time.sleep(0.0005)  # a wide window for another thread to read the same value
    row.n = n + 1
    writes.append(1)
    session.flush()


def test_shared_session_serializes_threads_read_modify_write(
    Scoped: ScopedSession, engine: Engine, track: Callable[[Any], Any]
) -> None:
    session = track(Scoped())
    counter = Row(owner="counter", n=0)
    session.add(counter)
    session.commit()
    counter_id = counter.id
    shared = sessionscope.SharedSession(session)
    assert Scoped() is not session  # the registry let go of it
    writes: list[int] = []

    def worker() -> None:
        for _ in range(ROUNDS):
            with shared as s:
                read_modify_write(s, counter_id, writes)

    threads = [start_thread(worker, f"worker-{i}") for i in range(THREADS)]
    for thread, _ in threads:
        join(thread)
    assert [outcome.error for _, outcome in threads] == [None] * THREADS
    assert len(writes) == THREADS * ROUNDS
    with shared as s:
        s.commit()
        assert s.get(Row, counter_id) is counter and counter.n == THREADS * ROUNDS
    assert n_of(engine, counter_id) == THREADS * ROUNDS  # not one update lost
    with shared as s:
        s.close()


def test_shared_session_outside_a_block_is_refused(
    Scoped: ScopedSession, engine: Engine, track: Callable[[Any], Any]
) -> None:
    session, site = Scoped(), here()
    track(session)
    counter = Row(owner="counter", n=0)
    session.add(counter)
    session.commit()
    shared = sessionscope.SharedSession(session)

    mine = Outcome(unit=this_thread())
    _capture(lambda: session.execute(select(1)), mine)  # even its creator, outside a block
    other = in_thread(lambda: session.execute(select(1)))
    write = in_thread(lambda: setattr(counter, "n", 5))
    for outcome in (mine, other, write):
        assert type(outcome.error) is sessionscope.CrossUnitError
        message = str(outcome.error)
        assert "SharedSession" in message and "with shared as session:" in message
        assert outcome.unit in message and site in message
        assert message.endswith(background("guard-cross-unit"))

    # while a thread is inside a block, the others are still "outside", not "concurrent"
    inside, done = threading.Event(), threading.Event()

    def holder() -> None:
        with shared as s:
            s.execute(select(1))
            inside.set()
            assert done.wait(WAIT_TIMEOUT)

    thread, outcome = start_thread(holder, "holder")
    assert inside.wait(WAIT_TIMEOUT)
    during = Outcome(unit=this_thread())
    _capture(lambda: session.execute(select(1)), during)
    done.set()
    join(thread)
    assert outcome.error is None
    assert type(during.error) is sessionscope.CrossUnitError
    with shared as s:
        assert s.get(Row, counter.id) is counter and counter.n == 0
        s.close()


def test_without_the_lock_the_same_workload_loses_updates(
    engine: Engine, track: Callable[[Any], Any]
) -> None:
    """The comparison: one plain session shared by the same threads without SharedSession."""
    session = track(sessionmaker(engine)())
    counter = Row(owner="counter", n=0)
    session.add(counter)
    session.commit()
    counter_id = counter.id
    writes: list[int] = []

    def worker() -> None:
        for _ in range(ROUNDS):
            read_modify_write(session, counter_id, writes)

    threads = [start_thread(worker, f"worker-{i}") for i in range(THREADS)]
    for thread, _ in threads:
        join(thread)
    errors = [outcome.error for _, outcome in threads if outcome.error is not None]
    session.commit()
    final = n_of(engine, counter_id)
    # increments were lost; most threads also died of "Session is already flushing"
    assert final is not None and final < len(writes), (len(writes), final, errors)


# -- 7. fork -----------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_is_refused_the_parents_session(
    Scoped: ScopedSession, engine: Engine
) -> None:
    session = Scoped()
    session.add(Row(owner="parent", n=1))
    session.flush()  # holds a connection: the parent's socket (PostgreSQL) or file handle
    row = session.scalars(select(Row)).one()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one byte per check, never return into pytest
        answer = b""
        try:
            for attempt in (
                lambda: session.execute(text("select 1")),
                lambda: setattr(row, "n", 2),
                lambda: session.close(),
            ):
                try:
                    attempt()
                    answer += b"N"  # not refused
                except sessionscope.CrossUnitError as error:
                    answer += b"Y" if "os.fork()" in str(error) else b"?"
                except BaseException:  # noqa: BLE001
                    answer += b"E"
            engine.dispose(close=False)
            fresh = Scoped()
            answer += b"Y" if fresh is not session and fresh.scalar(text("select 3")) == 3 else b"N"
        except BaseException:  # noqa: BLE001
            answer += b"E"
        finally:
            os.write(write, answer)
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert answer == b"YYYY", answer
    # the parent's session, connection and transaction are intact
    assert row.n == 1 and not session.is_modified(row)
    assert session.scalar(select(func.count()).select_from(Row)) == 1
    session.commit()
    assert owners(engine) == Counter({"parent": 1})


# -- 8. a thread's end --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["raise", "warn"])
def test_a_thread_that_ends_without_remove_has_its_session_closed_quietly(
    mode: Any, engine: Engine, caplog: pytest.LogCaptureFixture, track: Callable[[Any], Any]
) -> None:
    Registry = sessionscope.scoped_session(sessionmaker(engine), guard=mode)
    made, refused_here = threading.Event(), threading.Event()
    sessions: list[Session] = []
    rows: list[Row] = []

    def worker() -> None:
        session = Registry()
        sessions.append(session)
        rows.append(Row(owner="ended", n=1))
        session.add(rows[0])
        session.flush()  # holds a connection, in a transaction
        made.set()
        assert refused_here.wait(WAIT_TIMEOUT)
        # ends without Registry.remove() or close()

    with warnings.catch_warnings(), caplog.at_level(logging.DEBUG, logger="sessionscope"):
        warnings.simplefilter("error")
        thread, outcome = start_thread(worker, "short-lived")
        assert made.wait(WAIT_TIMEOUT)
        (session,) = sessions
        track(session)
        # the session is guarded: this thread may not touch it (a warning is an error here)
        refusal = (
            sessionscope.CrossUnitError if mode == "raise" else sessionscope.ShareNothingWarning
        )
        try:
            with pytest.raises(refusal, match="short-lived"):
                session.execute(select(1))
        finally:
            refused_here.set()
        join(thread)  # the thread's end closes its session: no refusal, no warning, no log

    assert outcome.error is None
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert len(Registry.registry) == 0  # type: ignore[arg-type]
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert not session.in_transaction() and rows[0] not in session
    assert owners(engine) == Counter()  # closed, so rolled back
