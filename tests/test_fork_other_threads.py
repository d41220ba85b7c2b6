"""A fork while other threads are inside transactions: the child never touches their sessions.

In a forked child CPython frees the other threads' states, and with them their contexts and the
units of work these hold, *before* any ``os.register_at_fork`` callback runs. A unit of work
freed there used to end as usual and close its session: the child rolled back on the parent's
socket and checked the parent's connection into its own copy of the pool, and the parent's
transaction was gone under it. Here another thread of the parent holds a session with a row
flushed but not committed while the main thread forks; the child reports any rollback or
check-in of a connection it sees, then the parent's thread commits, and the row must be there,
once.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, func, select, text
from sqlalchemy.orm import Session, sessionmaker

import sessionscope
from tests.models import Row

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"),
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]

Holder = Callable[[Any, Callable[[Session], None]], None]
"""Runs ``body(session)`` in another thread's unit of work and waits there until released."""


@pytest.fixture
def application_name() -> str:
    """Names this test's connections to PostgreSQL (pg_stat_activity), apart from others'."""
    return f"ss-fork-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def engine(db_url: str, application_name: str) -> Iterator[Engine]:
    eng = create_engine(db_url, connect_args={"application_name": application_name})
    yield eng
    eng.dispose()


def _implicit_session(scoped: Any, body: Callable[[Session], None]) -> None:
    body(scoped())


def _scope_session(scoped: Any, body: Callable[[Session], None]) -> None:
    with scoped.scope() as session:
        body(session)


HOLDERS: dict[str, tuple[Holder, bool]] = {
    # (how the thread holds its session, whether it runs as a thread-pool job)
    "implicit session, thread": (_implicit_session, False),
    "scope's session, thread": (_scope_session, False),
    "implicit session, pool job": (_implicit_session, True),
}


def _touches_in_children(engine: Engine) -> list[str]:
    """What the engine does to a connection in another process than this one: filled there."""
    parent, seen = os.getpid(), []

    @event.listens_for(engine, "rollback")
    def rolled_back(conn: Any) -> None:
        if os.getpid() != parent:
            seen.append("rollback")

    @event.listens_for(engine, "checkin")
    def checked_in(dbapi_connection: Any, record: Any) -> None:
        if os.getpid() != parent:
            seen.append("checkin")

    return seen


def _fork_and_report(seen: list[str]) -> list[str]:
    """Fork; the child collects garbage, reports what ``seen`` holds, and leaves."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(read_end)
            gc.collect()
            os.write(write_end, json.dumps(seen).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reading:
        report = reading.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return list(json.loads(report))


@pytest.mark.parametrize("holder", sorted(HOLDERS))
def test_the_child_never_touches_the_sessions_of_the_parents_other_threads(
    engine: Engine, application_name: str, holder: str
) -> None:
    hold, as_pool_job = HOLDERS[holder]
    scoped = sessionscope.scoped_session(sessionmaker(engine))
    seen = _touches_in_children(engine)
    owner = f"fork-{holder}"
    flushed, release = threading.Event(), threading.Event()

    def body(session: Session) -> None:
        session.add(Row(id=1, owner=owner, n=1))
        session.flush()  # in a transaction on the parent's connection
        flushed.set()
        assert release.wait(30)
        session.commit()

    def thread_work() -> None:
        hold(scoped, body)

    if as_pool_job:
        pool = ThreadPoolExecutor(1)
        done = pool.submit(thread_work)
        assert flushed.wait(30)
        touched = _fork_and_report(seen)
        release.set()
        done.result(30)
        pool.shutdown()
    else:
        failures: list[BaseException] = []

        def run() -> None:
            try:
                thread_work()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test
                failures.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        assert flushed.wait(30)
        touched = _fork_and_report(seen)
        release.set()
        thread.join(30)
        assert not failures, failures

    assert touched == [], f"the child used the parent's connection: {touched}"
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).where(Row.owner == owner)).scalar() == 1
        idle = conn.execute(
            text(
                "select count(*) from pg_stat_activity where application_name = :name"
                " and state like 'idle in transaction%'"
            ),
            {"name": application_name},
        ).scalar()
    assert idle == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert len(scoped.registry) == 0
