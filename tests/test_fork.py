"""A forked child never receives, uses or closes its parent's sessions."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import sessionmaker

import sessionscope
from sessionscope import _fork, _registry

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def in_child(fn: Any) -> bytes:
    """Run ``fn`` in a forked child; return the byte it reports (b"E" if it raised)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            answer = fn()
        except BaseException:  # noqa: BLE001 - reported, the child must not run pytest's code
            answer = b"E"
        os.write(write, answer)
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    return answer


def test_the_child_gets_a_new_session_and_leaves_the_parents_connection_alone(
    engine: Engine,
) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    parent_session = Scoped()
    parent_session.execute(text("select 1"))  # holds a connection (a socket, for PostgreSQL)
    assert len(Scoped.registry) == 1

    def child() -> bytes:
        engine.dispose(close=False)  # what SQLAlchemy documents for pools in a child
        fresh = Scoped()
        fresh.execute(text("select 1"))
        fresh.close()
        return b"1" if fresh is not parent_session and len(Scoped.registry) == 1 else b"0"

    assert in_child(child) == b"1"
    # the parent's session and connection still work: the child never spoke on its socket
    assert Scoped() is parent_session
    assert parent_session.execute(text("select 2")).scalar() == 2
    Scoped.remove()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("guard", ["raise", "off"])
def test_in_the_child_remove_leaves_the_parents_thread_session_alone(
    engine: Engine, guard: Any
) -> None:
    """A thread's work of the parent is not emptied in the child (only greenlets' works are
    kept for that): ``remove()`` there finds no session of the child's to close, and the
    parent's transaction is not ended by the child (with the guard off too: the registry itself
    must not close it, not only the guard refuse to)."""
    Scoped = sessionscope.scoped_session(sessionmaker(engine), guard=guard)
    parent_session = Scoped()
    parent_session.execute(text("select 1"))
    assert parent_session.in_transaction()

    def child() -> bytes:
        engine.dispose(close=False)
        Scoped.remove()  # nothing of the child's: the parent's session is not closed
        untouched = parent_session.in_transaction()
        fresh = Scoped()
        return b"1" if untouched and fresh is not parent_session else b"0"

    assert in_child(child) == b"1"
    assert Scoped() is parent_session and parent_session.in_transaction()
    assert parent_session.execute(text("select 2")).scalar() == 2
    Scoped.remove()
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_a_task_forking_gets_a_new_session_in_the_child(engine: Engine) -> None:
    """An asyncio task that holds a session and forks: the child runs on in the task's code,
    with the task's context, and must neither get nor close the parent's session."""
    Scoped = sessionscope.scoped_session(sessionmaker(engine))

    async def task() -> tuple[bytes, Any]:
        parent_session = Scoped()
        parent_session.execute(text("select 1"))

        def child() -> bytes:
            engine.dispose(close=False)
            fresh = Scoped()
            fresh.close()
            Scoped.remove()
            return b"1" if fresh is not parent_session and parent_session.in_transaction() else b"0"

        answer = in_child(child)
        same = Scoped() is parent_session and parent_session.in_transaction()
        return answer, same

    answer, same = asyncio.run(_in_a_task(task))
    assert answer == b"1" and same
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def _in_a_task(body: Any) -> Any:
    return await asyncio.create_task(body())


@pytest.mark.parametrize("lookup", ["C", "Python"])
def test_the_lookup_never_answers_a_work_of_an_older_generation(
    lookup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both lookups, and ``remove()``, compare the work's fork generation with the process's
    (what a forked child sees for a parent's thread or task work, which it no longer empties).
    Their fast paths step aside when trio is imported (as in this test process): it is taken
    out of ``sys.modules`` for the test, so that they run."""
    if lookup == "C" and _registry.speedups is None:
        pytest.skip("the C module is not built (or SESSIONSCOPE_NO_EXTENSIONS is set)")
    monkeypatch.delitem(sys.modules, "trio", raising=False)
    Scoped = sessionscope.scoped_session(sessionmaker(create_engine("sqlite://")), guard="off")
    find = _registry.unit_session if lookup == "C" else _registry._unit_session_in_python
    before = Scoped()
    assert find(Scoped.registry) is before
    before.connection()  # in a transaction: a close would end it
    monkeypatch.setattr(_fork, "generation", _fork.generation + 1)
    Scoped.remove()  # nothing of this generation's to close
    assert before.in_transaction()
    after = find(Scoped.registry)
    assert after is not before and find(Scoped.registry) is after
    Scoped.remove()
    assert before.in_transaction()  # the older generation's was never closed here
    before.close()
