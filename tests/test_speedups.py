"""The guard's checks in C (``sessionscope._speedups``) and in Python: the same behaviour.

The whole suite runs on the C checks where they are built (3.11, 3.12, 3.13 in ``make test``) and
on the Python ones on the oldest stack (``SESSIONSCOPE_NO_EXTENSIONS=1``). These tests cover what
is particular to the two implementations: which one runs, the switch that keeps the C module
out, the C wrapper's introspection, and a failing call leaving the guard's slot free.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session, sessionmaker

import sessionscope
from sessionscope import _registry
from sessionscope._guard import _checks, _state
from sessionscope._guard._guarded_class import guarded_class
from sessionscope._guard._install import guard_of
from sessionscope._guard._state import INSIDE
from tests.conftest import require_built
from tests.models import Row

NO_EXTENSIONS = bool(os.environ.get(_state.NO_EXTENSIONS_VARIABLE))


def test_the_checks_run_in_c_where_the_module_is_built() -> None:
    if NO_EXTENSIONS:
        assert not _checks.IN_C
        assert _state.GuardState is _state.PythonGuardState
        assert _registry.unit_session is _registry._unit_session_in_python
        return
    require_built("_speedups", _state.speedups is not None, "the Python checks run")
    assert _checks.IN_C
    assert _state.GuardState is _state.speedups.GuardState
    assert type(guarded_class(Session).__dict__["add"]).__name__ == "CheckedMethod"
    # the registries' lookup too: a proxied call, Session() and registry() run no Python frame
    assert _registry.unit_session is _state.speedups.unit_session
    assert type(_registry.UnitRegistry.__dict__["__call__"]).__name__ == "method_descriptor"
    for name, doc in (("__call__", "Return the current unit's session"), ("remove", "Close")):
        method = sessionscope.scoped_session.__dict__[name]  # Session() and remove() too
        assert type(method).__name__ == "method_descriptor" and method.__doc__.startswith(doc)
    # ... and the assignment-checked attributes are descriptors, not a __setattr__
    assert type(guarded_class(Session).__dict__["autoflush"]).__name__ == "CheckedAttribute"


@pytest.mark.parametrize("in_python", [False, True], ids=["c", "python"])
def test_session_call_answers_alike_in_c_and_python(
    engine: Engine, in_python: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Session()``: the lookup, a session made with arguments, SQLAlchemy's error when one is
    present, a factory that makes no session left alone; the C ``__call__`` (where built) and
    the Python one it falls back to for arguments."""
    from sessionscope._scoping import scoped_session

    if in_python:
        monkeypatch.setattr(scoped_session, "__call__", scoped_session._call_in_python)
        monkeypatch.setattr(scoped_session, "remove", scoped_session._remove_in_python)
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    made = Scoped(autoflush=False)
    assert made.autoflush is False and Scoped() is made and Scoped.registry() is made
    with pytest.raises(Exception, match="Scoped session is already present"):
        Scoped(autoflush=True)
    Scoped.remove()
    assert Scoped() is not made
    Scoped.remove()
    not_a_session = object()
    assert sessionscope.scoped_session(lambda: not_a_session)() is not_a_session
    keyed = sessionscope.scoped_session(sessionmaker(engine), scopefunc=lambda: "key")
    session = keyed()  # SQLAlchemy's registry: remove() closes and forgets it all the same
    session.connection()
    keyed.remove()
    assert not session.in_transaction() and keyed() is not session
    keyed.remove()


def test_sessionscope_no_extensions_keeps_the_c_module_out() -> None:
    program = """
import threading
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker
import sessionscope
from sessionscope._guard import _checks
from sessionscope._guard._guarded_class import guarded_class

Scoped = sessionscope.scoped_session(sessionmaker(create_engine("sqlite://")))
session = Scoped()
session.execute(text("select 1"))
refused = []

def other():
    try:
        session.execute(text("select 1"))
    except sessionscope.CrossUnitError:
        refused.append(True)

thread = threading.Thread(target=other)
thread.start()
thread.join()
print(_checks.IN_C, type(guarded_class(Session).__dict__["add"]).__name__, refused)
"""
    env = {**os.environ, _state.NO_EXTENSIONS_VARIABLE: "1"}
    done = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "function", "[True]"]


def test_a_checked_method_reads_as_the_method_it_checks() -> None:
    guarded = guarded_class(Session)
    for name in ("add", "execute", "get", "commit"):
        checked = guarded.__dict__[name]
        method = getattr(Session, name)
        assert checked.__wrapped__ is method
        assert checked.__name__ == name
        assert checked.__qualname__ == method.__qualname__
        assert checked.__doc__ == method.__doc__
        assert inspect.signature(checked) == inspect.signature(method)
        assert getattr(guarded, name) is checked  # (on the class: the checked method itself)


def test_a_checked_method_called_on_its_class(engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    session = Scoped()
    guarded = type(session)
    assert guarded.execute(session, text("select 1")).scalar() == 1
    with pytest.raises(TypeError):
        guarded.execute()  # no session: the method's own error
    session.close()


def test_a_failing_call_leaves_the_slot_free_and_its_exception_as_raised(engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    session = Scoped()
    guard = guard_of(session)
    assert guard is not None
    with pytest.raises(Exception) as raised:
        session.execute(text("select * from no_such_table"))
    assert "no_such_table" in str(raised.value)
    assert raised.value.__context__ is None or "no_such_table" in str(raised.value.__context__)
    assert (guard.depth, guard.entered, INSIDE.get(guard)) == (0, None, None)
    session.rollback()
    # the slot is free: another thread is refused as a unit that does not own the session,
    # not as a concurrent one
    refused: list[BaseException] = []

    def other() -> None:
        try:
            session.execute(text("select 1"))
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            refused.append(error)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(30)
    assert type(refused[0]) is sessionscope.CrossUnitError
    session.close()


def test_a_base_exception_inside_a_call_leaves_the_slot_free(engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    session = Scoped()
    guard = guard_of(session)
    assert guard is not None

    class Stop(BaseException):
        pass

    def stop(*args: Any) -> None:
        raise Stop

    event.listen(session, "do_orm_execute", stop)
    with pytest.raises(Stop):
        session.execute(select(Row))
    event.remove(session, "do_orm_execute", stop)
    assert (guard.depth, guard.entered, INSIDE.get(guard)) == (0, None, None)
    assert session.execute(text("select 1")).scalar() == 1
    session.close()


def test_writes_and_row_iteration_are_checked_by_the_same_rules(engine: Engine) -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    session = Scoped()
    session.add_all([Row(owner="a", n=n) for n in range(3)])
    session.commit()
    row = session.scalars(select(Row).where(Row.n == 0)).one()
    rows = iter(session.execute(select(Row.n).order_by(Row.n)))
    assert next(rows) == (0,)
    errors: list[BaseException] = []

    def other() -> None:
        for attempt in (lambda: setattr(row, "owner", "b"), lambda: next(rows)):
            try:
                attempt()
            except BaseException as error:  # noqa: BLE001 - handed back to the test
                errors.append(error)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(30)
    assert [type(e) for e in errors] == [sessionscope.CrossUnitError] * 2
    assert "wrote Row.owner" in str(errors[0]) and "fetched rows" in str(errors[1])
    # the owner's iteration goes on where it was, and its write passes
    assert [r.n for r in rows] == [1, 2]
    row.owner = "c"
    session.commit()
    assert session.scalar(select(Row.owner).where(Row.n == 0)) == "c"
    session.close()


def test_an_assignment_is_checked_whether_or_not_its_name_is_interned(engine: Engine) -> None:
    """A name made at run time (equal to a checked one, not the same object) is checked all the
    same: the checked attributes are descriptors of the guarded class, which CPython finds by
    the name's value (when they were a C ``__setattr__``, it compared interned pointers first)."""
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    session = Scoped()
    made = "".join(["auto", "flush"])
    assert made == "autoflush" and made is not sys.intern(made)
    errors: list[BaseException] = []

    def other() -> None:
        for name in ("autoflush", made):
            try:
                setattr(session, name, False)
            except BaseException as error:  # noqa: BLE001 - handed back to the test
                errors.append(error)
        session.not_checked = "assigned"  # type: ignore[attr-defined]  # any other name passes

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(30)
    assert [type(e) for e in errors] == [sessionscope.CrossUnitError] * 2
    assert all("assigned Session.autoflush" in str(e) for e in errors)
    assert session.autoflush is True
    assert session.not_checked == "assigned"  # type: ignore[attr-defined]
    setattr(session, made, False)  # the owner assigns it
    assert session.autoflush is False
    Scoped.remove()


def test_the_task_that_opened_the_work_is_checked_without_python(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a task, the owner's calls and writes take the C fast path as a thread's do (no
    ``admit()``, no ``check_write()`` in Python), holding the slot by the task; other tasks still
    go through ``admit()``: a child made after the session borrows it, a task made before is
    refused."""
    if not _checks.IN_C:
        pytest.skip("the Python checks: a task's calls go through admit() by design")
    from sessionscope._guard._ownership import SessionGuard

    python_checks: list[str] = []
    admit, check_write = SessionGuard.admit, SessionGuard.check_write

    def counted_admit(self: SessionGuard, *args: Any) -> bool:
        python_checks.append("admit")
        return admit(self, *args)

    def counted_check_write(self: SessionGuard, *args: Any) -> None:
        python_checks.append("check_write")
        check_write(self, *args)

    monkeypatch.setattr(SessionGuard, "admit", counted_admit)
    monkeypatch.setattr(SessionGuard, "check_write", counted_check_write)
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    inside_during_call: list[object] = []
    refused: list[BaseException] = []
    borrowed: list[int] = []

    async def main() -> None:
        made = asyncio.Event()
        handed: list[Session] = []

        async def made_before() -> None:  # not a borrower: its context predates the session
            await made.wait()
            try:
                handed[0].execute(text("select 1"))
            except BaseException as error:  # noqa: BLE001 - handed back to the test
                refused.append(error)

        early = asyncio.create_task(made_before())
        session = Scoped()
        guard = guard_of(session)
        assert guard is not None

        def look(*args: Any) -> None:
            inside_during_call.append(INSIDE.get(guard))

        row = Row(owner="a", n=1)
        session.add(row)
        session.flush()
        event.listen(session, "do_orm_execute", look)
        session.execute(select(Row))
        event.remove(session, "do_orm_execute", look)
        row.owner = "b"  # a write by the owner task
        assert python_checks == []
        assert inside_during_call == [asyncio.current_task()]

        async def child() -> None:  # a borrower: made after the session, the owner not inside
            borrowed.append(session.execute(text("select 1")).scalar_one())

        await asyncio.create_task(child())
        assert python_checks and set(python_checks) == {"admit"}
        admitted_child = len(python_checks)
        handed.append(session)
        made.set()
        await early
        assert len(python_checks) > admitted_child  # (the early task's refusal)
        session.rollback()
        Scoped.remove()

    asyncio.run(main())
    assert borrowed == [1]
    assert len(refused) == 1 and type(refused[0]) is sessionscope.CrossUnitError, refused


@pytest.mark.parametrize("kind", ["thread", "task"])
def test_an_ended_units_session_is_closed_by_the_cleanup_without_python_checks(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A unit that ends without ``remove()``: sessionscope's cleanup closes its session from
    outside the unit. The C check lets that close (and SQLAlchemy's calls inside it) through
    as ``admit()`` would, without calling it; a use by anyone else is still refused."""
    from sessionscope._guard._ownership import SessionGuard

    python_checks: list[str] = []
    admit = SessionGuard.admit

    def counted_admit(self: SessionGuard, *args: Any) -> bool:
        python_checks.append(args[0])
        return admit(self, *args)

    monkeypatch.setattr(SessionGuard, "admit", counted_admit)
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    made: list[Session] = []

    def unit() -> None:
        session = Scoped()
        session.execute(text("select 1"))  # (holds a connection: the close gives it back)
        made.append(session)
        python_checks.clear()  # (the owner's own calls: in Python too once trio is imported)

    if kind == "thread":
        thread = threading.Thread(target=unit)
        thread.start()
        thread.join()
    else:

        async def task_unit() -> None:
            unit()

        async def main() -> None:
            await asyncio.create_task(task_unit())
            await asyncio.sleep(0)  # (the task's end callback)

        asyncio.run(main())
    assert len(made) == 1 and not made[0].in_transaction()  # closed at the unit's end
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    if _checks.IN_C:
        assert python_checks == []  # the cleanup's close, and SQLAlchemy's calls inside it
    else:
        assert "close" in python_checks  # (the Python checks: admit() lets the cleanup through)
    with pytest.raises(sessionscope.CrossUnitError):
        made[0].execute(text("select 1"))


@pytest.mark.parametrize("patcher", ["gevent", "eventlet"])
@pytest.mark.parametrize("order", ["patched later", "patched first"])
def test_a_work_records_the_os_threads_ident_under_monkey_patching(
    patcher: str, order: str
) -> None:
    """The task check's thread test compares a work's thread with the OS thread's ident: under
    monkey-patching (early or late, as the problem this library solves has it) ``get_ident()``
    names the running greenlet, so the work records the unpatched one."""
    pytest.importorskip(patcher)
    patch = {
        "gevent": "from gevent import monkey; monkey.patch_all()",
        "eventlet": "import eventlet; eventlet.monkey_patch()",
    }[patcher]
    original = {
        "gevent": "monkey.get_original('_thread', 'get_ident')",
        "eventlet": "__import__('eventlet.patcher').patcher.original('_thread').get_ident",
    }[patcher]
    imports = "import sessionscope\nfrom sessionscope import _work"
    program = f"""
import warnings
warnings.simplefilter("ignore")
{imports if order == "patched later" else patch}
{patch if order == "patched later" else imports}
import asyncio, _thread
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker
Scoped = sessionscope.scoped_session(sessionmaker(create_engine("sqlite://")))

async def unit():
    Scoped()
    work = _work.work_var.get()
    return work.thread, {original}()

recorded, os_thread = asyncio.run(unit())
print(recorded == os_thread, _thread.get_ident() != os_thread)
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]  # (and get_ident() is patched: a greenlet's)
