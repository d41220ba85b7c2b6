"""The share-nothing guard between gevent and eventlet greenlets, patched or not.

A greenlet is a concurrent unit like a thread or a task: the session it gets from
``sessionscope.scoped_session`` is its own, and another greenlet that gets hold of it (or of an
object attached to it) is refused with ``CrossUnitError`` before anything reaches SQLAlchemy or
the driver. ``gevent.spawn`` / ``eventlet.spawn`` start greenlets in a fresh context, so even a
greenlet spawned *by* the owner is another unit; one run through ``contextvars.copy_context().run``
is a borrower, and two borrowers inside at once get ``ConcurrentUseError``. ``hand_off``/``adopt``
and ``SharedSession`` are the deliberate ways across.

Monkey-patching is process-wide and irreversible, so each (framework, patching, database)
combination runs ``tests/scenarios/guard_green.py`` in a fresh interpreter, which makes every check
and prints the facts as one JSON line. The combinations run in parallel, once for all the tests of
this module (each with its own SQLite file or PostgreSQL schema); the tests only assert on facts.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import PG_URL, postgres_available, require_server

SCENARIO = Path(__file__).parent / "scenarios" / "guard_green.py"
COMBOS = [
    (framework, patch, db)
    for framework, patches in (
        ("gevent", ("before", "after", "never")),
        ("eventlet", ("before", "never")),
    )
    for patch in patches
    for db in ("sqlite", "postgresql")
]
"""eventlet cannot patch *after* a pool exists (see ``tests/scenarios/_eventlet.py``)."""

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.parametrize(
        ("framework", "patch", "db"), [pytest.param(*c, id="-".join(c)) for c in COMBOS]
    ),
]

Facts = dict[str, Any]


# ------------------------------------------------------------------------------------------------
# running the scenario


@functools.cache
def _postgres_unreachable() -> str | None:
    return postgres_available()


def _run(framework: str, patch: str, url: str) -> Facts | str:
    """The scenario's facts (with its stderr), or why it produced none."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONWARNINGS", None)
    env.pop("PSYCOPG_WAIT_FUNC", None)
    command = [sys.executable, str(SCENARIO), "--framework", framework, "--patch", patch]
    try:
        proc = subprocess.run(
            [*command, "--url", url], capture_output=True, text=True, timeout=90, env=env
        )
    except subprocess.TimeoutExpired as exc:
        return f"{framework} --patch {patch} timed out (a deadlock?)\nstderr:\n{exc.stderr!r}"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return (
            f"{framework} --patch {patch} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    facts: Facts = json.loads(lines[-1])
    facts["stderr"] = proc.stderr
    return facts


@pytest.fixture(scope="module")
def scenario(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str, str, str], Facts]]:
    """Runs every combination that the selected tests of this module need, in parallel, at once.

    Each PostgreSQL run gets a schema of its own, so the parallel runs never see each other's
    tables; the schemas are dropped at the end of the module.
    """
    needed = sorted(
        {
            (
                item.callspec.params["framework"],
                item.callspec.params["patch"],
                item.callspec.params["db"],
            )
            for item in request.session.items
            if getattr(item, "module", None) is request.module and hasattr(item, "callspec")
        }
    )
    results: dict[tuple[str, str, str], concurrent.futures.Future[Facts | str]] = {}
    schemas: list[str] = []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, os.cpu_count() or 1))
    admin = create_engine(PG_URL)

    def start() -> None:
        pg_ok = _postgres_unreachable() is None
        for framework, patch, db in needed:
            if db == "sqlite":
                directory = tmp_path_factory.mktemp(f"{framework}-{patch}")
                url = f"sqlite:///{directory / 'guard-green.db'}"
            elif pg_ok:
                schema = f"{request.getfixturevalue('pg_schema')}_{framework}_{patch}"
                with admin.begin() as conn:
                    conn.execute(text(f'create schema "{schema}"'))
                schemas.append(schema)
                url = f"{PG_URL}?options=-csearch_path%3D{schema}"
            else:
                continue
            results[(framework, patch, db)] = pool.submit(_run, framework, patch, url)

    def get(framework: str, patch: str, db: str) -> Facts:
        if db == "postgresql":
            reason = _postgres_unreachable()
            if reason:
                require_server(reason)  # skips locally, fails in CI
        if not results:
            start()
        outcome = results[(framework, patch, db)].result()
        if isinstance(outcome, str):
            pytest.fail(outcome)
        return outcome

    yield get
    pool.shutdown(wait=True)
    if schemas:
        with admin.begin() as conn:
            for schema in schemas:
                conn.execute(text(f'drop schema "{schema}" cascade'))
    admin.dispose()


def check(facts: Facts, name: str) -> Facts:
    """The facts of one check of the run; fails with the scenario's traceback if it crashed."""
    found: Facts = facts[name]
    if "crashed" in found:
        pytest.fail(f"the scenario's {name!r} check crashed:\n{found['crashed']}")
    return found


def refused(outcome: dict[str, str] | None, error: str, *units: str, anchor: str) -> str:
    """Assert that a call was refused with ``error``, naming ``units`` and the docs anchor."""
    assert outcome is not None, f"not refused: expected {error}"
    assert outcome["type"] == error, outcome
    message = outcome["message"]
    for unit in units:
        assert unit in message, (unit, message)
    assert f"docs/errors.md#{anchor}" in message, message
    return message


def nothing_left(found: Facts) -> None:
    """After the check's greenlets ended: no connection checked out, no session in the registry;
    no greenlet failed unexpectedly, nothing was logged or warned while it ran."""
    assert found["unit_errors"] == []
    assert found["pool_checkedout"] == 0
    assert found["registry_len"] == 0
    assert found["logged"] == []
    assert found["warned"] == []


# ------------------------------------------------------------------------------------------------
# 1, 2: another greenlet and A's session


OPERATIONS = {
    "execute": "called Session.execute()",
    "scalar": "called Session.scalar()",
    "add": "called Session.add()",
    "flush": "called Session.flush()",
    "get": "called Session.get()",
    "commit": "called Session.commit()",
    "rollback": "called Session.rollback()",
    "close": "called Session.close()",
    "attribute_write": "wrote Parent.name on an object attached to it",
    "collection_append": "wrote Parent.children on an object attached to it",
    "lazy_load_collection": "lazy-loaded Parent.children through this Session",
    "lazy_load_many_to_one": "lazy-loaded Child.parent through this Session",
    "expired_refresh": "called Session.",
}


def test_another_greenlet_is_refused_every_use_of_a_greenlets_session_and_objects(
    framework: str, patch: str, db: str, scenario: Callable[[str, str, str], Facts]
) -> None:
    """Greenlet A's registry session, handed to greenlet B (spawned by the main greenlet) and to C
    (spawned by A, but without A's context): every call into the session and every lazy load,
    refresh or write on its objects raises ``CrossUnitError`` naming both greenlets, where the
    session was made, the fix and the docs. Nothing B tried reached the session: A finds its
    objects unchanged, its own lazy loads work, and its commit lands exactly once. A ends without
    ``remove()``; its session is closed and its connection back in the pool."""
    found = check(scenario(framework, patch, db), "cross_unit")
    a, b, c = found["a"], found["b"], found["c"]
    assert a.startswith("greenlet ") and len({a, b, c}) == 3

    assert set(found["b_outcomes"]) == set(OPERATIONS)
    for operation, what_b_did in OPERATIONS.items():
        message = refused(
            found["b_outcomes"][operation], "CrossUnitError", a, b, anchor="guard-cross-unit"
        )
        assert f"belongs to {a}, but {b} {what_b_did}" in message
        assert found["created_at"] in message  # "guard_green.py:<line> (in owner_a)"
        assert "sessionscope.hand_off(session)" in message and "copy_to()" in message
    refused(found["c_outcomes"]["execute"], "CrossUnitError", a, c, anchor="guard-cross-unit")

    # B's own registry session is B's, and works.
    assert found["b_registry_gives_own_session"] is True
    assert found["b_own_session_works"] is None

    # Nothing B tried changed A's session: no rename, no new child, no pending row; A's own lazy
    # loads and refresh work, and A's commit lands exactly once.
    assert found["a_after"] == {
        "p1_name": "p1",
        "dirty": 0,
        "new": 0,
        "p2_children": ["c3"],
        "p2_name": "p2",
        "p1_children": ["c1", "c2"],
        "c1_parent": "p1",
    }
    assert found["rows"] == {"A": 1}
    assert found["sessions_not_closed"] == 0
    nothing_left(found)


def test_sqlalchemy_scoped_session_shares_and_refuses_nothing_where_sessionscope_refuses(
    framework: str, patch: str, db: str, scenario: Callable[[str, str, str], Facts]
) -> None:
    """The contrast, in the same two greenlets. SQLAlchemy's ``scoped_session`` keys sessions by
    a ``threading.local`` made with the registry: unless gevent/eventlet patched before that, A and
    B get the SAME session from it. And whoever it belongs to, B may use A's session: B's
    ``execute`` and ``add`` go through silently and A finds B's row pending in its session.
    sessionscope's registry gives B its own session, and refuses B's use of A's."""
    facts = scenario(framework, patch, db)
    found = check(facts, "cross_unit")
    assert facts["patched"] is (patch != "never")  # the run patched as asked

    assert found["sqlalchemy_registry_same_session"] is (patch != "before")
    assert found["sqlalchemy_outcomes"] == {"execute": None, "add": None}
    assert found["a_sees_b_pending_in_sqlalchemy_session"] is True

    assert found["b_registry_gives_own_session"] is True
    assert found["b_outcomes"]["execute"]["type"] == "CrossUnitError"
    assert found["b_outcomes"]["add"]["type"] == "CrossUnitError"
    assert "B" not in found["rows"]


# ------------------------------------------------------------------------------------------------
# 3: borrowers


def test_overlapping_borrowers_raise_concurrent_use_error_and_the_first_completes(
    framework: str, patch: str, db: str, scenario: Callable[[str, str, str], Facts]
) -> None:
    """Greenlets run in a copy of A's context (``spawn(copy_context().run, ...)``) borrow A's
    session. While borrower 1 is inside a statement that yields (PostgreSQL's ``pg_sleep`` where
    psycopg waits cooperatively, else a green sleep in an event hook), borrower 2's calls and A's
    own are stopped with ``ConcurrentUseError`` naming the unit inside; borrower 1 completes, a
    later borrower alone is welcome, and only their rows are committed."""
    facts = scenario(framework, patch, db)
    found = check(facts, "concurrent")
    a, b1, b2 = found["a"], found["b1"], found["b2"]
    assert len({a, b1, b2, found["b3"]}) == 4

    # psycopg waits cooperatively when patched before it is imported: by itself under gevent, with
    # the wait function the scenario selects under eventlet.
    cooperative = db == "postgresql" and patch == "before"
    assert facts["db_io_cooperative"] is (cooperative if db == "postgresql" else None)
    if cooperative:
        assert facts["psycopg_wait"] == ("wait_select" if framework == "eventlet" else "wait_poll")
    assert found["blocked_in"] == ("pg_sleep" if cooperative else "event_hook_sleep")

    for call in ("execute", "add", "flush"):
        refused(found["b2_outcomes"][call], "ConcurrentUseError", b2, b1, anchor="guard-concurrent")
    assert (
        f"{b2} called Session.scalar() while {b1} was inside"
        in (found["b2_outcomes"]["execute"]["message"])
    )
    refused(found["a_while_b1_inside"], "ConcurrentUseError", a, b1, anchor="guard-concurrent")

    assert found["b1_outcomes"] == {"execute": None, "value": 42, "add": None, "flush": None}
    assert found["b3_outcomes"] == {"execute": None, "value": 3, "add": None, "flush": None}
    assert found["a_after"] is None  # A's commit
    assert found["rows"] == {"b1": 1, "b3": 1}
    nothing_left(found)


# ------------------------------------------------------------------------------------------------
# 4: hand_off / adopt, SharedSession


def test_hand_off_and_adopt_move_a_session_between_greenlets(
    framework: str, patch: str, db: str, scenario: Callable[[str, str, str], Facts]
) -> None:
    """A greenlet flushes a row, hands its session off and ends. The session outlives it (the
    registry forgot it: its connection stays checked out, its flushed row stays in the
    transaction); nobody may use it until another greenlet adopts it, which then sees the flushed
    row and commits both rows. Afterwards the adopter owns it; adopting a session its live owner
    did not hand off is refused."""
    found = check(scenario(framework, patch, db), "hand_off")
    giver, taker, prober = found["giver"], found["taker"], found["prober"]

    message = refused(
        found["giver_after_hand_off"], "CrossUnitError", giver, anchor="guard-cross-unit"
    )
    assert "handed off" in message and "sessionscope.adopt(session)" in message
    assert found["giver_registry_gives_new_session"] is True
    assert found["checkedout_after_giver_ended"] == 1

    message = refused(
        found["taker_before_adopt"], "CrossUnitError", taker, anchor="guard-cross-unit"
    )
    assert "handed off" in message
    assert found["taker_sees_flushed_rows"] == 1
    refused(found["prober_after_adopt"], "CrossUnitError", prober, taker, anchor="guard-cross-unit")
    refused(
        found["adopt_without_hand_off"],
        "CrossUnitError",
        found["snatcher"],
        found["live_owner"],
        anchor="guard-hand-off",
    )
    assert found["rows"] == {"handoff": 2}
    nothing_left(found)


def test_shared_session_with_a_cooperative_lock_serializes_read_modify_write(
    framework: str, patch: str, db: str, scenario: Callable[[str, str, str], Facts]
) -> None:
    """``SharedSession(session, lock=<gevent or eventlet Semaphore>)``: 10 greenlets x 3 turns of
    read, switch, write inside ``with shared as session:`` end with exactly 30 (no lost update);
    outside a block nobody may touch the session."""
    found = check(scenario(framework, patch, db), "shared_semaphore")
    assert found["errors"] == []
    assert found["completed"] == 10
    assert found["final_value"] == found["expected_if_all_complete"] == 30
    message = refused(found["outside_block"], "CrossUnitError", anchor="guard-cross-unit")
    assert "SharedSession" in message
    nothing_left(found)


def test_shared_session_default_lock_serializes_when_patched_and_refuses_not_deadlocks_when_not(
    framework: str, patch: str, db: str, scenario: Callable[[str, str, str], Facts]
) -> None:
    """The default lock is ``threading.Lock()``: gevent's or eventlet's once they patched (before
    or after the registry existed), and then the counts are exact. Unpatched, it is an OS lock that
    a greenlet waiting on would block its whole thread forever; instead each greenlet that would
    wait gets ``ConcurrentUseError`` naming the holder and the fix, and the holder finishes."""
    found = check(scenario(framework, patch, db), "shared_default_lock")
    if patch != "never":
        assert found["default_lock_module"] != "_thread"
        assert found["errors"] == []
        assert found["final_value"] == found["expected_if_all_complete"] == 30
    else:
        assert found["default_lock_module"] == "_thread"
        assert found["completed"] == 1
        assert found["final_value"] == found["turns"] == 3
        holder = found["names"][0]  # the first worker to run takes the lock
        assert len(found["errors"]) == 9
        for error in found["errors"]:
            message = refused(error, "ConcurrentUseError", holder, anchor="guard-shared")
            assert "in the same OS thread" in message and "gevent.lock.Semaphore()" in message
    nothing_left(found)


# ------------------------------------------------------------------------------------------------
# 5: greenlets that end


def test_ended_greenlets_sessions_are_closed_by_sessionscope_without_guard_errors(
    framework: str, patch: str, db: str, scenario: Callable[[str, str, str], Facts]
) -> None:
    """With warnings as errors: 3 greenlets that finish holding a transaction, and 3 killed with
    ``.kill()`` (holding flushed or pending rows, one while inside a statement), never call
    ``remove()``. sessionscope closes their sessions without any guard error, warning or log
    (under gevent from the hub's end-of-greenlet callback, i.e. not from the owner; under eventlet
    in the ending greenthread), nothing stays checked out, the killed greenlets' rows are gone.
    The closed sessions are still guarded: the main greenlet may not use them. And nothing went
    to stderr, where gevent and eventlet print a greenlet's (or the hub's) uncaught errors."""
    facts = scenario(framework, patch, db)
    found = check(facts, "ended")
    assert found["after_finish"] == {"pool_checkedout": 0, "registry_len": 0}
    assert found["before_kill"] == {"pool_checkedout": 3, "registry_len": 3}
    assert found["reached_end"] == []
    assert found["sessions_not_closed"] == 0
    if framework == "gevent":
        assert (found["closed_by_another_unit"], found["closed_by_owner"]) == (6, 0)
    else:
        assert (found["closed_by_another_unit"], found["closed_by_owner"]) == (0, 6)
    assert found["rows"] == {"f0": 1, "f1": 1, "f2": 1}
    touches = found["main_touches_ended_sessions"]
    assert len(touches) == 6
    for outcome in touches:
        refused(outcome, "CrossUnitError", "thread 'MainThread'", anchor="guard-cross-unit")
    nothing_left(found)
    stderr = facts["stderr"]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-5000:]


# ------------------------------------------------------------------------------------------------
# borrowers that outlive their owner: known failures (``raises=AssertionError``: a scenario that
# crashed, or did not set the situation up, fails the test instead of passing as expected)


def test_owner_ending_while_a_borrower_is_inside_does_not_pull_the_connection_from_under_it(
    framework: str, patch: str, db: str, scenario: Callable[[str, str, str], Facts]
) -> None:
    """The owner spawns a borrower (its context) and ends without waiting while the borrower is
    inside a statement. The session is closed as the borrower leaves its call (never under it),
    so its connection is not checked in, nor handed to another unit, while the statement runs;
    nothing is logged; nothing stays checked out. (Before the fix, gevent's cleanup closed it
    under the borrower and eventlet's raised ConcurrentUseError and leaked the connection.)"""
    found = check(scenario(framework, patch, db), "borrower_inside_at_owner_end")
    if found["owner_ended_while_borrower_inside"] is not True:
        pytest.fail("not set up: the owner did not end while its borrower was inside")
    assert found["checked_in_while_borrower_inside"] is False
    assert found["other_unit_got_the_borrowers_connection"] is False
    assert found["logged"] == []
    assert found["pool_checkedout"] == 0


def test_a_borrower_outliving_its_owner_cannot_reopen_the_closed_session(
    framework: str, patch: str, db: str, scenario: Callable[[str, str, str], Facts]
) -> None:
    """The owner spawns a borrower (its context) and ends; sessionscope closes the owner's session.
    The borrower's later use is refused (like a ``Session.scope()`` session after its block): it
    would begin a transaction and check out a connection that nobody gives back."""
    found = check(scenario(framework, patch, db), "late_borrower")
    if found["pool_checkedout_after_owner_ended"] != 0:
        pytest.fail("not set up: the owner's end did not close its session")
    assert found["late_outcome"] is not None
    assert found["late_reopened_a_transaction"] is False
    assert found["pool_checkedout_after_late_use"] == 0
