"""The checked variant of a result a guarded session (or its connection) returned.

Every way a result reads rows goes through a handful of private fetch methods
(``_fetchone_impl``, ``_fetchmany_impl``, ``_fetchall_impl``, ``_fetchiter_impl``, ...), the same
in SQLAlchemy 2.0 and 2.1; the checked subclass wraps those, so ``fetch*``, ``scalars()``,
``partitions()``, ``yield_per`` and ``AsyncResult`` (which calls them in SQLAlchemy's greenlet)
are all covered by the same few checks.

- A fetch stays inside the session while it runs, as a session call does: it reads the cursor,
  and for the ORM it fills the identity map (whose own checks are then nested, one comparison).
- An *iteration* (``iter(result)``, SQLAlchemy's row generator) fetches a row each time it is
  resumed, possibly by another unit than the one that started it (``it = iter(result);
  next(it)`` here, ``list(it)`` elsewhere). So its rows are handed out by an iterator that
  compares, before each fetch, the running greenlet, loop and task with those that fetched
  before (a few pointer comparisons a row); when they differ the full check runs.
- Plain data is not checked: a result whose rows were all fetched (soft-closed: ``.all()``
  was called, or ``freeze()``), or whose session's unit of work ended and closed it (what is
  left is buffered; an open cursor would be refused by SQLAlchemy itself).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from greenlet import getcurrent

from .._units._asyncio import _get_running_loop, current_task_of_loop
from ._checks import checked_fetch
from ._guarded_class import GUARD_ATTRIBUTE, checked_subclass, is_guarded_class
from ._state import speedups

F = TypeVar("F", bound=Callable[..., Any])

RESULT_FETCHES = (
    "_fetchiter_impl",
    "_fetchone_impl",
    "_fetchmany_impl",
    "_fetchall_impl",
    "_raw_all_tuples",
    "_raw_row_iterator",
)
ITERATION = "_iter_impl"  # what ``iter(result)`` returns (SQLAlchemy 2.0 and 2.1)
FILTERS = ("scalars", "mappings")
CHECK = "(result)"


def _checked_iter_impl(method: F, guard_of: Callable[[Any], Any]) -> F:
    """``iter(result)``: SQLAlchemy's row generator, handed out through a checking iterator.

    The check runs before SQLAlchemy's generator is resumed, so a refused ``next()`` leaves the
    owner's iteration where it was (a generator that raised would be finished).
    """

    @functools.wraps(method)
    def checked(self: Any) -> Any:
        rows = method(self)
        guard = guard_of(self)
        if guard is None:
            return rows
        loop = _get_running_loop()
        task = current_task_of_loop(loop) if loop is not None else None
        return _RowsCheckedOnResume(rows, guard, getcurrent(), loop, task)

    return checked  # type: ignore[return-value]


def _own_guard(result: Any) -> Any:
    return result.__dict__[GUARD_ATTRIBUTE]


def _real_results_guard(filtered: Any) -> Any:
    return filtered._real_result.__dict__.get(GUARD_ATTRIBUTE)


def _returning_filter(method: F) -> F:
    """``scalars()`` / ``mappings()`` of a guarded result: the filter's iteration is checked."""

    @functools.wraps(method)
    def returning(self: Any, *args: Any, **kw: Any) -> Any:
        filtered = method(self, *args, **kw)
        guard_filter(filtered)
        return filtered

    return returning  # type: ignore[return-value]


_FILTER_CLASSES = "_sessionscope_guarded_filter_class"


def _filter_namespace(base: type) -> dict[str, Any]:
    return {ITERATION: _checked_iter_impl(getattr(base, ITERATION), _real_results_guard)}


def guard_filter(filtered: Any) -> None:
    """Check the iteration of a filter (``ScalarResult``, ``MappingResult``) of a guarded
    result; its fetches go to the result under it, which checks them."""
    cls = type(filtered)
    guarded = cls.__dict__.get(_FILTER_CLASSES)  # (every filter but the first of its class)
    if guarded is not None:
        filtered.__class__ = guarded
    elif not is_guarded_class(cls) and callable(getattr(cls, ITERATION, None)):
        filtered.__class__ = checked_subclass(cls, _filter_namespace, _FILTER_CLASSES)


class _RowsCheckedOnResumeInPython:
    """``rows``, checked again before each fetch made by a unit other than the one before.

    An iterator object, not a generator: a refused ``next()`` must leave the iteration usable
    (a generator that raised is finished, and its cursor would stay open for nobody).
    """

    __slots__ = ("next_row", "guard", "greenlet", "loop", "task")

    def __init__(self, rows: Iterator[Any], guard: Any, greenlet: Any, loop: Any, task: Any):
        self.next_row = rows.__next__
        self.guard = guard
        self.greenlet = greenlet
        self.loop = loop
        self.task = task

    def __iter__(self) -> _RowsCheckedOnResumeInPython:
        return self

    def __next__(self) -> Any:
        # the next fetch is about to run, for whoever asks: the unit that asked before (a few
        # pointer comparisons), or one that must pass the full check first
        task = self.task
        if (
            getcurrent() is not self.greenlet
            or _get_running_loop() is not self.loop
            or (task is not None and current_task_of_loop(self.loop) is not task)
        ):
            self.greenlet, self.loop, self.task = _recheck(self.guard)
        return self.next_row()


def _recheck(guard: Any) -> tuple[Any, Any, Any]:
    """The full check for the unit now iterating (raises for another unit); who it is."""
    guard.check_use(CHECK)
    loop = _get_running_loop()
    return getcurrent(), loop, current_task_of_loop(loop) if loop is not None else None


_RowsCheckedOnResume: Any = _RowsCheckedOnResumeInPython
"""The C module's ``RowsCheckedOnResume`` (the same iterator, in C) when it is built."""
if speedups is not None:
    speedups.configure_results(_recheck)
    _RowsCheckedOnResume = speedups.RowsCheckedOnResume


def result_namespace(base: type) -> dict[str, Any]:
    """The checked fetch methods of a result class."""
    namespace = {
        name: checked_fetch(CHECK, getattr(base, name))
        for name in RESULT_FETCHES
        if callable(getattr(base, name, None))
    }
    if callable(getattr(base, ITERATION, None)):
        namespace[ITERATION] = _checked_iter_impl(getattr(base, ITERATION), _own_guard)
    for name in FILTERS:
        if callable(getattr(base, name, None)):
            namespace[name] = _returning_filter(getattr(base, name))
    return namespace
