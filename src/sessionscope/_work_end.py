"""How a unit of work's sessions are closed as it ends: sync ones now, AsyncSessions on their loop.

``WorkUnit.end()`` is synchronous (it runs from done-callbacks, greenlet links and finalizers).
``async with unit_of_work()`` ends the work *awaited*: blocking closes of sync sessions run in a
worker thread, off the event loop, and the AsyncSessions' closes are awaited, so the block's
connections are back in their pools when the block exits.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from ._async_session_end import _closing, closers_on_its_loop
from ._guard._lineage import cleanup
from ._lineage_node import guard_of_link
from ._session_end import close_quietly_or_invalidate, needs_io_to_close
from ._units._asyncio import _get_running_loop
from ._work import WorkUnit, end_hook


def closers_for(session: Any) -> tuple[Callable[[], object], Callable[[], object]]:
    """(close now, close as the unit inside leaves) for a Session or an AsyncSession."""
    if isinstance(session, AsyncSession):
        return closers_on_its_loop(session)

    def close() -> None:
        close_quietly_or_invalidate(session)

    return close, close


async def end_awaited(work: WorkUnit) -> None:
    """End ``work`` from a task: sync closes off the loop, AsyncSession closes awaited."""

    def end_in_worker() -> None:
        with cleanup():
            work.end()

    if _get_running_loop() is None:  # trio: its worker threads; AsyncSessions need asyncio
        import trio

        if _any_blocking_close(_sessions_of(work)):
            await trio.to_thread.run_sync(end_in_worker)
        else:
            work.end()
        return
    loop = asyncio.get_running_loop()
    sessions = _sessions_of(work)
    if not sessions:  # (the usual request: its scope's session closed and sealed already)
        work.end()
        return
    holds_async = any(isinstance(s, AsyncSession) for s in sessions)
    # Sync sessions close in a worker thread; but the closes of AsyncSessions must start on this
    # loop (closers_on_its_loop sees no running loop in a worker), so with any AsyncSession held
    # the whole end runs here.
    if not holds_async and _any_blocking_close(sessions):
        await loop.run_in_executor(None, end_in_worker)
        return
    before = set(_closing)
    work.end()
    started = [task for task in _closing if task not in before]
    if started:
        await asyncio.shield(asyncio.gather(*started, return_exceptions=True))


def may_block_to_end(work: WorkUnit) -> bool:
    """Whether ending ``work`` may block on the database (see :func:`_any_blocking_close`).

    Asked at every gevent or eventlet unit's end, in the hub: it stops at the first session that
    may block, without building a list (a loop, not ``any()`` over a generator expression: a
    frame less per unit).
    """
    for session in _each_session_of(work):
        if not isinstance(session, AsyncSession) and needs_io_to_close(session):  # (_may_block)
            return True
    return False


def _may_block(session: Any) -> bool:
    """Whether closing ``session`` may block: a sync session in a transaction."""
    return not isinstance(session, AsyncSession) and needs_io_to_close(session)


def _sessions_of(work: WorkUnit) -> list[Any]:
    """The sessions ending ``work`` may close (see :func:`_each_session_of`), as a list."""
    return list(_each_session_of(work))


def _each_session_of(work: WorkUnit) -> Iterator[Any]:
    """The sessions ending ``work`` may close: its registries' and those it owns that are not
    closed for good (a scope's sealed session holds nothing). A registry's session is also owned
    by the work: it comes once (the first registry's is the usual one; it used to be checked
    twice at every gevent unit's end). Its guard is recognised by the session's ``hash_key``,
    without looking the session up (an AsyncSession has none: its guard's session is looked
    up, and recognised by identity)."""
    first = work.value if work.value_key is not None else None
    first_key = None
    if first is not None:
        yield first
        first_key = getattr(first, "hash_key", None)
    if work.values:
        yield from work.values.values()
    owned = work.owned
    if owned is None:
        return
    for link in owned if isinstance(owned, list) else (owned,):
        guard = guard_of_link(link)
        if guard is None or (first_key is not None and guard.session_key == first_key):
            continue
        session = guard.unsealed_session()
        if session is not None and session is not first:
            yield session


def _any_blocking_close(sessions: list[Any]) -> bool:
    """Whether one of ``sessions`` is a sync session whose close can block (one in a
    transaction): only then is a worker thread worth its hop (per request, under ASGI)."""
    return any(_may_block(s) for s in sessions)


_lent: weakref.WeakKeyDictionary[Any, weakref.WeakSet[WorkUnit]] = weakref.WeakKeyDictionary()
"""The works lent to each loop's tasks (by loop, not on it: see ``_units._asyncio.watch_end``)."""


def lent_on_loop(loop: asyncio.AbstractEventLoop, work: WorkUnit) -> None:
    """Remember that ``work`` was lent to a task of ``loop``: its AsyncSessions (connected on
    that loop) are closed before the loop closes, since the work itself outlives the loop."""
    try:
        works = _lent.get(loop)
    except TypeError:  # a loop that takes no weak reference: they are closed when the work
        return  # ends, if its loop still runs then
    if works is None:
        works = _lent[loop] = weakref.WeakSet()
        from ._async_session_end import finish_closes_before_loop_close

        finish_closes_before_loop_close(loop)
    works.add(work)


async def close_lent_async_sessions(loop: asyncio.AbstractEventLoop) -> None:
    """On ``loop``, before it closes: close the AsyncSessions of works lent to its tasks."""
    for work in list(_lent.get(loop, ())):
        for key, value in work.value_items():
            if isinstance(value, AsyncSession):
                work.pop_value(key)
                hook = end_hook(key)
                if hook is not None:
                    hook.work_ended(work, value)
        for guard in work.owned_guards():
            if isinstance(guard.session_ref(), AsyncSession):
                guard.owner_ended(work)
