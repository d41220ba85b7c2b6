"""A unit of work's start and end in C (``sessionscope._work_state``) and in Python: the same.

``WorkUnit`` derives from the C ``WorkState`` where it is built, and from ``PythonWorkState``,
the reference, where it is not (or ``SESSIONSCOPE_NO_EXTENSIONS`` is set). Each test below makes
one work each way and compares what they hold and what their end calls, in the same order and
with the same arguments, failures included.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import weakref
from collections.abc import Iterator
from typing import Any

import greenlet
import pytest

from sessionscope import _fork, _work
from sessionscope._extensions import NO_EXTENSIONS_VARIABLE
from sessionscope._units import current_unit
from sessionscope._units._thread import INTERPRETER
from sessionscope._work import PythonWorkState, WorkUnit
from tests.conftest import require_built

NO_EXTENSIONS = bool(os.environ.get(NO_EXTENSIONS_VARIABLE))
FIELDS = [name for name in PythonWorkState.__slots__ if name != "__weakref__"]


class PythonWorkUnit(PythonWorkState):
    """A WorkUnit on the Python base, whatever the running one derives from."""

    __slots__ = ()
    take_values = WorkUnit.take_values
    value_items = WorkUnit.value_items
    describe = WorkUnit.describe
    root_unit = WorkUnit.root_unit


def both(*args: Any) -> Iterator[Any]:
    """A work made by ``WorkUnit`` (C where built) and one by the Python reference."""
    yield WorkUnit(*args)
    yield PythonWorkUnit(*args)


def fields(work: Any) -> dict[str, Any]:
    held = {name: getattr(work, name) for name in FIELDS}
    if isinstance(held["root"], weakref.ref):
        held["root"] = ("weakly", held["root"]())
    return held


def test_workunit_derives_from_the_c_state_where_it_is_built() -> None:
    if NO_EXTENSIONS:
        assert WorkUnit.__mro__[1] is PythonWorkState
        return
    require_built("_work_state", _work._work_state is not None, "the Python state is used")
    assert WorkUnit.__mro__[1] is _work._work_state.WorkState  # type: ignore[union-attr]
    assert WorkUnit.__mro__[1].__module__ == "sessionscope._work_state"


def test_a_thread_s_work_starts_with_the_same_fields() -> None:
    unit = current_unit()
    parent = WorkUnit(unit, None, True)
    made = [fields(w) for w in both(unit, None, False, parent, True)]
    assert made[0] == made[1]
    assert made[0]["root"] is unit and made[0]["parent"] is parent and made[0]["lends"] is True
    assert made[0]["ended"] is False and made[0]["generation"] == _fork.generation
    assert made[0]["prune_owned_at"] == _work._MIN_PRUNE


def test_a_greenlet_is_held_weakly_by_both() -> None:
    glet = greenlet.greenlet(lambda: None)
    c_work, python_work = both(glet, None, False)
    assert fields(c_work) == fields(python_work)
    assert isinstance(c_work.root, weakref.ref) and c_work.root() is glet


def test_arguments_are_refused_alike() -> None:
    for make in (WorkUnit, PythonWorkUnit):
        with pytest.raises(TypeError):
            make(current_unit())  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            make(current_unit(), None, False).end(True)  # type: ignore[misc]
        with pytest.raises(TypeError):
            make(current_unit(), None, False).end(closing=True)  # type: ignore[call-arg]


class Hook:
    """A registry's end hook that records what it is given (and may fail)."""

    def __init__(self, calls: list[Any], fail: BaseException | None = None) -> None:
        self.calls = calls
        self.fail = fail

    def work_ended(self, work: Any, value: Any) -> None:
        self.calls.append(("work_ended", value))
        if self.fail is not None:
            raise self.fail


class Guard:
    """What a work's owned references lead to: a guard told its owner ended."""

    def __init__(self, calls: list[Any], name: str, fail: BaseException | None = None) -> None:
        self.calls = calls
        self.name = name
        self.fail = fail

    def owner_ended(self, work: Any) -> None:
        self.calls.append(("owner_ended", self.name, work.ended))
        if self.fail is not None:
            raise self.fail


def ended_with(
    work: Any, calls: list[Any], *, fail_hook: BaseException | None = None, collected: bool = False
) -> tuple[list[Any], list[Any]]:
    """End ``work`` holding two values and owning three guards (one gone): what was called."""
    hooks = [Hook(calls, fail_hook), Hook(calls)]
    _work.register_end_hook("test-key-a", hooks[0])
    _work.register_end_hook("test-key-b", hooks[1])
    guards = [Guard(calls, "first", fail_hook), Guard(calls, "second")]
    gone = Guard(calls, "gone")
    work.value_key, work.value = "test-key-a", "value-a"
    work.values = {"test-key-b": "value-b", "test-key-none": "value-none"}
    work.owned = [weakref.ref(guards[0]), weakref.ref(gone), weakref.ref(guards[1])]
    del gone
    work.root = weakref.ref(greenlet.getcurrent())  # a greenlet's work: kept for the sweep
    _work.holding_values[weakref.ref(work)] = None
    try:
        work.end(collected=collected)
    finally:
        _work._end_hooks.pop("test-key-a", None)
        _work._end_hooks.pop("test-key-b", None)
    return hooks, guards


def test_the_end_calls_the_same_hooks_in_the_same_order() -> None:
    seen = []
    for work in both(current_unit(), None, False):
        calls: list[Any] = []
        ended_with(work, calls)
        seen.append((calls, fields(work), weakref.ref(work) in _work.holding_values))
    assert seen[0] == seen[1]
    calls, held, holding = seen[0]
    assert calls == [
        ("work_ended", "value-a"),
        ("work_ended", "value-b"),
        ("owner_ended", "first", True),
        ("owner_ended", "second", True),
    ]
    assert held["ended"] is True and held["owned"] is None and not holding
    assert held["value_key"] is None and held["value"] is None and held["values"] is None


@pytest.mark.parametrize("how", ["an older generation", "a fork under way in another process"])
def test_a_parent_process_s_work_is_abandoned_untouched_by_both(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A work of a parent process ending in a forked child (after the fork's callbacks, or
    while CPython frees the parent's other threads, before them): no hook and no guard is
    called, and its values are parked in ``_fork._orphans``, never closed."""
    seen = []
    for work in both(current_unit(), None, False):
        calls: list[Any] = []
        orphans_before = len(_fork._orphans)
        with monkeypatch.context() as patch:
            if how == "an older generation":
                patch.setattr(_fork, "generation", _fork.generation + 1)
            else:  # the forking process's id is not this one's: this is its child
                patch.setattr(_fork, "forking_pid", os.getpid() + 1)
            ended_with(work, calls)
        orphaned = _fork._orphans[orphans_before:]
        del _fork._orphans[orphans_before:]
        seen.append((calls, fields(work), weakref.ref(work) in _work.holding_values, orphaned))
    assert seen[0] == seen[1]
    calls, held, holding, orphaned = seen[0]
    assert calls == [] and sorted(orphaned) == ["value-a", "value-b", "value-none"]
    assert held["ended"] is True and held["owned"] is None and not holding
    assert held["value_key"] is None and held["value"] is None and held["values"] is None


def test_a_fork_under_way_in_this_process_ends_works_as_usual(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The parent, between a fork's start and its return (another thread ending its work
    meanwhile): its works are its own, and end as usual."""
    monkeypatch.setattr(_fork, "forking_pid", os.getpid())
    for work in both(current_unit(), None, False):
        calls: list[Any] = []
        ended_with(work, calls)
        assert len(calls) == 4


def test_the_end_runs_once() -> None:
    for work in both(current_unit(), None, False):
        calls: list[Any] = []
        ended_with(work, calls)
        work.value_key, work.value = "test-key-a", "again"
        work.end()
        assert len(calls) == 4 and work.value == "again"


def test_a_failing_hook_is_logged_alike_and_the_end_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen = []
    for collected in (False, True):
        for work in both(current_unit(), None, False):
            caplog.clear()
            calls: list[Any] = []
            with caplog.at_level(logging.DEBUG, logger="sessionscope"):
                ended_with(work, calls, fail_hook=ValueError("hook broke"), collected=collected)
            records = [
                (r.levelname, r.getMessage(), r.exc_info and repr(r.exc_info[1]))
                for r in caplog.records
            ]
            seen.append((collected, calls, records))
    for collected in (False, True):
        c_end, python_end = [s for s in seen if s[0] is collected]
        assert c_end == python_end
        _, calls, records = c_end
        assert len(calls) == 4  # every hook ran
        level = "DEBUG" if collected else "ERROR"
        assert [r[0] for r in records] == [level, level]
        assert all(r[2] == "ValueError('hook broke')" for r in records)
        assert "failed" in records[0][1]


def test_a_hook_raising_keyboardinterrupt_stops_the_end_in_both() -> None:
    for work in both(current_unit(), None, False):
        calls: list[Any] = []
        with pytest.raises(KeyboardInterrupt):
            ended_with(work, calls, fail_hook=KeyboardInterrupt())
        assert calls == [("work_ended", "value-a")]
        assert work.ended is True


def test_a_task_s_work_holds_its_task_weakly_once_ended() -> None:
    async def main() -> list[Any]:
        task = asyncio.current_task()
        works = list(both(task, task, False))
        for work in works:
            assert work.root is task and work.task is task
            work.end()
        return [(w.task, w.root()) for w in works]

    assert [(task, root is not None) for task, root in asyncio.run(main())] == [
        (None, True),
        (None, True),
    ]


def test_a_work_freed_without_its_end_ends_as_collected() -> None:
    for make in (WorkUnit, PythonWorkUnit):
        calls: list[Any] = []
        guard = Guard(calls, "only")
        work = make(current_unit(), None, False)
        work.owned = weakref.ref(guard)
        del work  # freed by reference counting: its __del__ ends it
        assert calls == [("owner_ended", "only", True)]


def test_a_work_in_a_cycle_is_collected_and_ended() -> None:
    """(Weak references inside a collected cycle are cleared before any finalizer runs: what
    reaches the end is what the work holds strongly, its values.)"""
    for make in (WorkUnit, PythonWorkUnit):
        calls: list[Any] = []
        hook = Hook(calls)
        _work.register_end_hook("test-key-cycle", hook)
        try:
            work = make(current_unit(), None, False)
            work.value_key, work.value = "test-key-cycle", [work]  # a cycle through the work
            freed = weakref.ref(work)
            del work
            gc.collect()
        finally:
            _work._end_hooks.pop("test-key-cycle", None)
        assert freed() is None
        assert len(calls) == 1 and calls[0][0] == "work_ended"


def test_nothing_ends_at_interpreter_shutdown() -> None:
    for make in (WorkUnit, PythonWorkUnit):
        calls: list[Any] = []
        guard = Guard(calls, "late")
        work = make(current_unit(), None, False)
        work.owned = weakref.ref(guard)
        INTERPRETER["shutting_down"] = True
        try:
            del work
        finally:
            INTERPRETER["shutting_down"] = False
        assert calls == []


def test_a_proxy_of_the_work_is_callable_and_ends_it() -> None:
    """A pool job's context holds a weak proxy: callable (the work is its own end callback)."""
    work = WorkUnit(current_unit(), None, False)
    proxy = weakref.proxy(work)
    assert type(proxy) is weakref.CallableProxyType
    assert proxy.myself() is work
    proxy()
    assert work.ended is True
