"""``fan_out``: the same function over many items, each in a unit of work of its own.

The share-nothing answer to "do this for every item, concurrently": every item runs in a unit of
its own (a pool thread, a gevent greenlet, an asyncio task, or a Celery task on a worker) with a
session of its own, and ORM objects cross the boundary as data (:func:`sessionscope.ship`), never
as shared objects. Why each rule (docs/design.md, "Fan-out"):

- **A unit per item**, not per thread: a pool thread runs item after item, so each item is
  wrapped in ``unit_of_work()`` and, given ``session=``, a ``scope(new=True, commit=False)``. What
  the function did not commit is rolled back when its item ends, so a failed item leaves nothing.
- **ORM items are shipped in**: each is shipped in the caller and received into the item's own
  session (no SELECT). The caller's objects never reach another unit.
- **ORM results are shipped back** and received into the caller's current session of
  ``session``, in the order of the items, with ``populate_existing``: the caller's copies of
  those rows take the state the unit committed (its own unflushed changes stay on top). A result
  the function inserted or changed but did not commit is refused: its unit rolls it back, so
  there is no row to hand back. The item's session does not expire on commit, so what the
  function committed comes back loaded.
- **The first failure stops the fan-out**: items that have not started do not start, items that
  are running finish (a thread cannot be interrupted safely; their sessions close as usual), and
  the first failure is raised (later ones are attached as notes). A Celery fan-out revokes the
  tasks not yet finished.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm.base import instance_state

from ._arguments import refuse, what_it_is
from ._async_scoping import async_scoped_session
from ._orm_values import (
    Shipped,
    contains_marked,
    contains_orm,
    receive_shipped,
    replace_orm,
    shipped,
)
from ._scoping import scoped_session
from ._work import unit_of_work
from .exc import NotShippableError, background

CALL = "sessionscope.fan_out()"
VIAS = ("threads", "greenlets", "tasks")
CELERY_MARK = "__sessionscope_registry__"
"""Set by ``sessionscope.celery.install()`` on the classes of the tasks it covers."""


# -- arguments ---------------------------------------------------------------------------------


def _check_arguments(fn: Any, via: Any, limit: Any, session: Any) -> None:
    if not callable(fn):
        refuse(TypeError, CALL, "fn", fn, "a function to call with each item")
    if limit is not None and (type(limit) is not int or limit < 1):
        refuse(TypeError, CALL, "limit", limit, "None (no limit) or a positive int")
    celery_task = not isinstance(via, str) and getattr(type(via), CELERY_MARK, None) is not None
    if via not in VIAS and not celery_task:
        refuse(
            sa_exc.ArgumentError,
            CALL,
            "via",
            via,
            '"threads", "greenlets", "tasks" or a Celery task covered by '
            "sessionscope.celery.install()",
            ""
            if isinstance(via, str)
            else "A Celery task must belong to an app given to "
            "sessionscope.celery.install(), whose serializer ships ORM objects.",
        )
    if session is None:
        return
    wants_async = via == "tasks"
    kind = async_scoped_session if wants_async else scoped_session
    if not isinstance(session, kind):
        expected = (
            "None or a sessionscope.async_scoped_session (via='tasks' runs asyncio tasks)"
            if wants_async
            else "None or a sessionscope.scoped_session (the registry each unit takes a "
            "session of its own from)"
        )
        refuse(sa_exc.ArgumentError, CALL, "session", session, expected, what_it_is(session))


def _ship_items(items: list[Any], session: Any, via: Any) -> list[Any]:
    """Items with their ORM objects shipped (for Celery, its serializer ships them)."""
    if not isinstance(via, str):
        return items
    if session is None:
        for position, item in enumerate(items):
            if contains_orm(item):
                refuse(
                    sa_exc.ArgumentError,
                    CALL,
                    f"items[{position}]",
                    item,
                    "plain values, or ORM objects together with session=",
                    "Pass session=<the scoped_session the units use>: each unit receives its "
                    "ORM items into a session of its own.",
                    "fan-out-session",
                )
        return items
    return [replace_orm(item, shipped) for item in items]


# -- one item, in its unit ---------------------------------------------------------------------


def ship_committed(obj: Any) -> Shipped:
    """Ship a unit's result, unless the unit flushed it without committing (no row to ship)."""
    state = instance_state(obj)
    session = state.session
    transaction = None if session is None else session.get_transaction()
    while transaction is not None:
        if state in transaction._new or state in transaction._dirty:
            identity = state.key[1] if state.key is not None else "(pending)"
            raise NotShippableError(
                f"ship(): the result {type(obj).__name__} {identity} was flushed in its unit "
                "but not committed; the unit's work is rolled back as it ends, so there is no "
                "row to hand back. Commit before returning it (for a Celery task, or "
                "install(commit=True)), or return plain values. "
                f"{background('ship-uncommitted')}"
            )
        transaction = transaction._parent
    return shipped(obj)


def _outbound(result: Any, has_session: bool) -> Any:
    if not contains_orm(result):
        return result
    if not has_session:
        raise sa_exc.ArgumentError(
            f"{CALL}: the function returned ORM objects, but fan_out() was given no session= to "
            "receive them into. Pass session=<the scoped_session the units use>: results are "
            f"received into the caller's current session of it. {background('fan-out-session')}"
        )
    return replace_orm(result, ship_committed)


def _item_in_unit(fn: Callable[[Any], Any], item: Any, registry: Any, stop: _Stop, at: int) -> Any:
    """Run one item in a unit of work of its own (a pool thread or a greenlet runs this).

    A failure is told to ``stop`` as it happens, before the unit rolls back and closes (which can
    take a while under load): the items not started yet stop at once.
    """
    try:
        with unit_of_work():
            if registry is None:
                return _outbound(fn(item), False)
            with registry.scope(new=True, commit=False, expire_on_commit=False) as session:
                try:
                    return _outbound(fn(receive_shipped(session, item)), True)
                except BaseException as error:
                    stop.failed(at, error)  # before the scope rolls back
                    raise
    except BaseException as error:
        stop.failed(at, error)
        raise


async def _item_in_task(
    fn: Callable[[Any], Any], item: Any, registry: Any, stop: _Stop, at: int
) -> Any:
    """:func:`_item_in_unit` for the asyncio task that runs this."""
    try:
        async with unit_of_work():
            if registry is None:
                result = fn(item)
                return _outbound(await result if inspect.isawaitable(result) else result, False)
            async with registry.scope(new=True, commit=False, expire_on_commit=False) as session:
                try:
                    if contains_marked(item, Shipped):
                        item = await session.run_sync(receive_shipped, item)
                    result = fn(item)
                    return _outbound(await result if inspect.isawaitable(result) else result, True)
                except BaseException as error:
                    stop.failed(at, error)
                    raise
    except BaseException as error:
        stop.failed(at, error)
        raise


# -- the failure that stops the rest -----------------------------------------------------------


class _Stop:
    """The first failure, seen by every item before it starts."""

    def __init__(self) -> None:
        self.failures: list[tuple[int, BaseException]] = []
        self._lock = threading.Lock()

    @property
    def stopped(self) -> bool:
        return bool(self.failures)

    def failed(self, position: int, error: BaseException) -> None:
        """Record ``error`` of item ``position`` (once: it is told as it happens, and again as
        it leaves the item's unit)."""
        with self._lock:
            if not any(known is error for _, known in self.failures):
                self.failures.append((position, error))

    def raise_first(self) -> None:
        if not self.failures:
            return
        first_position, first = self.failures[0]
        others = self.failures[1:]
        if others and sys.version_info >= (3, 11):
            first.add_note(
                f"{CALL}: item {first_position} failed first; "
                + ", ".join(f"item {p} ({type(e).__name__})" for p, e in others)
                + " failed too"
            )
        raise first


_NOT_RUN = object()


def _guarded(stop: _Stop, position: int, fn: Any, item: Any, registry: Any) -> Any:
    """One item in its unit, unless an item failed before it started; a failure stops the rest."""
    if stop.stopped:
        return _NOT_RUN
    try:
        return _item_in_unit(fn, item, registry, stop, position)
    except BaseException as error:
        stop.failed(position, error)
        return _NOT_RUN


# -- the ways to run them ----------------------------------------------------------------------


_POLL = 0.05
"""How often a caller waiting for fan_out's threads wakes up (to run a signal's handler)."""


def _in_threads(fn: Any, items: list[Any], registry: Any, limit: int | None) -> list[Any]:
    """Each item in a unit of its own on ``limit`` threads, which take the items in order.

    Not a ``ThreadPoolExecutor``: its future, work item, queue hand-off and wake-up per item are
    what a caller of ``fan_out`` waits for anyway, so each thread here simply takes the next item
    when it is done with one (under a lock), and stops taking them at the first failure.

    The caller waits on an event the last thread sets, not in ``Thread.join()``: interrupted
    (``KeyboardInterrupt``), it stops the items not yet started and waits again for those running,
    whose sessions then close as usual. An interrupted ``join()`` can leave the thread marked as
    stopped while it still runs (CPython before 3.13), and a second ``join()`` would not wait.
    The caller wakes every ``_POLL`` seconds while it waits: a SIGINT that the kernel hands to one
    of the item threads (it may pick any thread) runs Python's handler only once the main thread
    runs again, and a wait with no timeout would not end before every item had.

    Interrupted while it starts the threads, the caller cannot tell from ``start()`` whether the
    thread began: an interrupted ``start()`` may return (by raising) after its thread took an
    item. So each thread says it began (``began``), and the caller, once the stop is recorded,
    writes off those that have not: one that begins later takes no item and does not count.
    """
    stop = _Stop()
    results: list[Any] = [_NOT_RUN] * len(items)
    taking = threading.Lock()
    positions = iter(range(len(items)))
    workers = min(limit or min(32, (os.cpu_count() or 1) + 4), len(items))  # (the pool's default)
    running = [workers]
    all_done = threading.Event()
    began: list[bool | None] = [False] * workers
    """Per thread, under ``taking``: True once it began, None once the caller wrote it off."""

    def take_items(index: int) -> None:
        with taking:
            if began[index] is None:  # written off by an interrupted start: nothing to do
                return
            began[index] = True
        try:
            while not stop.stopped:
                with taking:
                    position = next(positions, None)
                if position is None:
                    return
                results[position] = _guarded(stop, position, fn, items[position], registry)
        finally:
            with taking:
                running[0] -= 1
                if not running[0]:
                    all_done.set()

    try:
        for n in range(workers):
            threading.Thread(target=take_items, args=(n,), name=f"sessionscope.fan_out_{n}").start()
    except BaseException as error:
        # A thread could not be started (or Ctrl-C came meanwhile): nothing more starts, and
        # the threads that began finish their items; the others are written off (see above).
        stop.failed(-1, error)
        with taking:
            for n, state in enumerate(began):
                if state is False:
                    began[n] = None
                    running[0] -= 1
            if not running[0]:
                all_done.set()
        all_done.wait()
        raise
    try:
        while not all_done.wait(_POLL):
            pass
    except BaseException as interruption:  # the caller was interrupted: nothing more starts
        stop.failed(-1, interruption)
        all_done.wait()
        raise
    stop.raise_first()
    return results


def _in_greenlets(fn: Any, items: list[Any], registry: Any, limit: int | None) -> list[Any]:
    try:
        import gevent.pool
    except ImportError as error:  # pragma: no cover - the extra is missing
        raise ImportError(
            "fan_out(via='greenlets') runs gevent greenlets: pip install 'sessionscope[gevent]'"
        ) from error
    stop = _Stop()
    pool = gevent.pool.Pool(limit)
    results: list[Any] = [_NOT_RUN] * len(items)

    def run(position: int, item: Any) -> None:
        results[position] = _guarded(stop, position, fn, item, registry)

    for position, item in enumerate(items):
        if stop.stopped:
            break
        pool.spawn(run, position, item)  # waits for a free slot when limited
    pool.join()
    stop.raise_first()
    return results


async def _in_tasks(fn: Any, items: list[Any], registry: Any, limit: int | None) -> list[Any]:
    stop = _Stop()
    slots = asyncio.Semaphore(limit) if limit else None

    async def run(position: int, item: Any) -> Any:
        if slots is not None:
            async with slots:
                return await run_now(position, item)
        return await run_now(position, item)

    async def run_now(position: int, item: Any) -> Any:
        if stop.stopped:
            return _NOT_RUN
        try:
            return await _item_in_task(fn, item, registry, stop, position)
        except BaseException as error:
            stop.failed(position, error)
            return _NOT_RUN

    tasks = [asyncio.ensure_future(run(i, item)) for i, item in enumerate(items)]
    try:
        if tasks:
            await asyncio.wait(tasks)
    except BaseException:  # the caller was cancelled: so is every item, and each ends cleanly
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        raise
    stop.raise_first()
    return [task.result() for task in tasks]


def _in_celery(task: Any, items: list[Any], limit: int | None) -> list[Any]:
    sent: list[Any] = []
    values: list[Any] = []
    try:
        for item in items:
            if limit is not None and len(sent) - len(values) >= limit:
                values.append(sent[len(values)].get())
            sent.append(task.apply_async((item,)))
        while len(values) < len(sent):
            values.append(sent[len(values)].get())
    except BaseException:
        for result in sent[len(values) :]:
            if not result.ready():
                result.revoke()  # not started: never starts; running: finishes on its own
        raise
    return values


# -- the public call ---------------------------------------------------------------------------


@overload
def fan_out(  # type: ignore[overload-overlap]
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    via: Literal["tasks"],
    limit: int | None = None,
    session: Any = None,
) -> Awaitable[list[Any]]: ...


@overload
def fan_out(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    via: object = "threads",
    limit: int | None = None,
    session: Any = None,
) -> list[Any]: ...


def fan_out(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    via: object = "threads",
    limit: int | None = None,
    session: Any = None,
) -> Any:
    """Call ``fn(item)`` for each item, each in a unit of work of its own; results in order.

    :param fn: called once per item, in the item's own unit; for ``via="tasks"`` it may be a
     coroutine function. With ``session=``, ``session()`` inside it is the item's own session,
     which is rolled back at the end of the item unless ``fn`` committed.
    :param items: the items; ORM objects among them (also in lists, tuples, sets and dict
     values) are shipped and arrive attached to the item's own session.
    :param via: ``"threads"`` (a thread pool), ``"greenlets"`` (a gevent pool), ``"tasks"``
     (asyncio tasks: ``fan_out`` returns an awaitable), or a Celery task covered by
     ``sessionscope.celery.install()`` (``fn`` must be that task; its workers run the items).
    :param limit: how many items run at once (threads default to ``ThreadPoolExecutor``'s
     default; greenlets, tasks and Celery to no limit).
    :param session: the sessionscope ``scoped_session`` (``async_scoped_session`` for tasks)
     the units take their sessions from; needed when items or results hold ORM objects. ORM
     results are received into the caller's current session of it.
    :return: the results in the order of the items (an awaitable of them for ``"tasks"``).
    :raises: the first failure of an item, after the items that were running have ended; items
     that had not started do not run.
    """
    _check_arguments(fn, via, limit, session)
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        refuse(TypeError, CALL, "items", items, "an iterable of items")
    listed = list(items)
    if not isinstance(via, str):
        if fn is not via and fn is not getattr(via, "__wrapped__", via):
            refuse(
                TypeError,
                CALL,
                "fn",
                fn,
                f"the Celery task given as via= ({getattr(via, 'name', via)}): its workers run it",
            )
        return _in_celery(via, listed, limit)
    shipped = _ship_items(listed, session, via)
    if via == "tasks":
        return _fan_out_tasks(fn, shipped, session, limit)
    run = _in_threads if via == "threads" else _in_greenlets
    results = run(fn, shipped, session, limit) if shipped else []
    return _arrive(results, session)


async def _fan_out_tasks(fn: Any, items: list[Any], registry: Any, limit: int | None) -> list[Any]:
    results = await _in_tasks(fn, items, registry, limit)
    if registry is None or not contains_marked(results, Shipped):
        return results
    caller: Any = registry()
    arrived: list[Any] = await caller.run_sync(receive_shipped, results, populate_existing=True)
    return arrived


def _arrive(results: list[Any], registry: Any) -> list[Any]:
    """Results with their shipped ORM objects received into the caller's current session."""
    if registry is None or not contains_marked(results, Shipped):
        return results
    arrived: list[Any] = receive_shipped(registry(), results, populate_existing=True)
    return arrived
