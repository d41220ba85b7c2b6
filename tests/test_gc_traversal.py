"""What the garbage collector sees of sessionscope's C-based objects: each reference once.

A guard (``SessionGuard``) and a unit of work (``WorkUnit``) are Python subclasses of C types
(``_speedups.GuardState``, ``_work_state.WorkState``). An instance holds one reference to its
class, and CPython's traversal of a heap subclass visits the class itself before the C type's
traversal runs; a C traversal that visited it again made the collector take two references off
the class per instance in every collection, driving its count for the class below zero. These
tests hold for the Python fallbacks too (there the classes are plain slotted classes).
"""

from __future__ import annotations

import gc
import threading

from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

import sessionscope
from sessionscope._guard._install import guard_of
from sessionscope._work import WorkUnit


def visits_of(obj: object, target: object) -> int:
    return sum(1 for seen in gc.get_referents(obj) if seen is target)


def test_a_unit_of_work_is_traversed_with_its_class_once() -> None:
    work = WorkUnit(threading.current_thread(), None, False)
    assert visits_of(work, WorkUnit) == 1


def test_a_guard_is_traversed_with_its_class_once() -> None:
    Scoped = sessionscope.scoped_session(sessionmaker(create_engine("sqlite://")))
    with Scoped.scope() as session:
        guard = guard_of(session)
        assert guard is not None
        assert visits_of(guard, type(guard)) == 1


def test_many_units_and_guards_collected_in_cycles_leave_their_classes_intact() -> None:
    """Sessions made in contexts that die in reference cycles: the collector frees them all,
    and the classes it counted references to are still the ones in use."""
    import contextvars

    Scoped = sessionscope.scoped_session(sessionmaker(create_engine("sqlite://")))
    for _ in range(300):
        context = contextvars.Context()
        session = context.run(Scoped)
        cycle: list[object] = [context, session]
        cycle.append(cycle)
        del context, session, cycle
    gc.collect()
    assert len(Scoped.registry) == 0
    work = WorkUnit(threading.current_thread(), None, False)
    assert type(work) is WorkUnit and visits_of(work, WorkUnit) == 1
