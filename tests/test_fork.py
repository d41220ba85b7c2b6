"""A forked child never receives, uses or closes its parent's sessions."""

from __future__ import annotations

import os
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import sessionmaker

import sessionscope

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
