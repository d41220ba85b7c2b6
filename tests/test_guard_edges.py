"""Edges of the guard that SQLAlchemy users reach for: close_all_sessions(), custom factories,
a registry over a guarded sessionmaker, the SharedSession made before a fork."""

from __future__ import annotations

import os
import threading

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

import sessionscope
from tests.conftest import in_new_thread
from tests.models import Row


def test_closing_an_ended_units_session_again_is_quiet(engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    ended = in_new_thread(lambda: Scoped().execute(text("select 1")) and Scoped())
    assert isinstance(ended, Session)
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    # what close_all_sessions() does to it, from the main thread (not called here: it would reach
    # the sessions of every other test's units too): the ended thread's session closes again
    ended.close()
    with pytest.raises(sessionscope.CrossUnitError, match="unit of work that has ended"):
        ended.execute(text("select 1"))  # but it cannot be used again


def test_closing_a_live_units_session_from_another_is_refused(engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    started, release = threading.Event(), threading.Event()
    holder: list[Session] = []

    def live() -> None:
        holder.append(Scoped())
        holder[0].add(Row(owner="live", n=1))
        holder[0].flush()
        started.set()
        release.wait(30)
        holder[0].commit()

    thread = threading.Thread(target=live, name="live")
    thread.start()
    started.wait(30)
    try:
        with pytest.raises(sessionscope.CrossUnitError, match="thread 'live'"):
            holder[0].close()  # as close_all_sessions() would, from the main thread
    finally:
        release.set()
        thread.join(30)
    with Session(engine) as check:
        assert check.scalars(select(Row.owner)).all() == ["live"]  # its work was not disturbed
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_factory_that_makes_no_session_is_left_alone() -> None:
    Scoped = sessionscope.scoped_session(lambda: {"made": "by the application"})
    made = Scoped()
    assert made == {"made": "by the application"} and type(made) is dict
    Scoped.registry.clear()


def test_a_registry_over_a_guarded_sessionmaker_forgets_a_session_handed_off(
    engine: Engine,
) -> None:
    Scoped = sessionscope.scoped_session(sessionscope.guard(sessionmaker(engine), "raise"))
    session = Scoped()
    session.add(Row(owner="moved", n=1))
    session.flush()
    sessionscope.hand_off(session)
    assert Scoped() is not session  # the registry let go of it: the unit gets a new one
    Scoped.remove()

    def adopter() -> int:
        with sessionscope.adopt(session):
            session.commit()
            return len(session.scalars(select(Row)).all())

    assert in_new_thread(adopter) == 1
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork()")
def test_a_shared_session_made_before_a_fork_is_refused_in_the_child(engine: Engine) -> None:
    shared = sessionscope.SharedSession(Session(engine))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        try:
            with shared as session:
                session.execute(text("select 1"))
            verdict = b"used"
        except sessionscope.CrossUnitError as error:
            verdict = b"refused" if "os.fork()" in str(error) else b"other message"
        except BaseException:  # noqa: BLE001
            verdict = b"other error"
        os.write(write, verdict)
        os._exit(0)
    os.close(write)
    verdict = os.read(read, 100)
    os.close(read)
    os.waitpid(pid, 0)
    assert verdict == b"refused"
    with shared as session:  # the parent's is untouched
        assert session.execute(text("select 1")).scalar() == 1
        session.close()  # a shared session is closed in a block, like any other use


def test_a_guard_finds_its_session_or_async_session_while_it_lives_and_holds_none() -> None:
    """The guard finds its session in SQLAlchemy's registry of live sessions (an AsyncSession as
    its sync session's proxy) instead of holding a weak reference: it finds the very object while
    it lives, and nothing once it is gone, without keeping it alive."""
    import gc
    import weakref

    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from sessionscope._guard._install import guard_of

    Scoped = sessionscope.scoped_session(sessionmaker(create_engine("sqlite://")))
    session = Scoped()
    guard = guard_of(session)
    assert guard.session_ref() is session and not guard.of_async
    Scoped.remove()
    gone = weakref.ref(session)
    del session
    gc.collect()
    assert gone() is None and guard.session_ref() is None

    engine = create_async_engine("sqlite+aiosqlite://")
    async_session = sessionscope.guard(AsyncSession(engine))
    async_guard = guard_of(async_session)
    assert async_guard.session_ref() is async_session and async_guard.of_async
    async_gone = weakref.ref(async_session)
    del async_session
    gc.collect()
    assert async_gone() is None and async_guard.session_ref() is None
