"""How a unit of work's sessions are closed as it ends: sync ones now, AsyncSessions on their loop.

``WorkUnit.end()`` is synchronous (it runs from done-callbacks, greenlet links and finalizers).
``async with unit_of_work()`` ends the work *awaited*: blocking closes of sync sessions run in a
worker thread, off the event loop, and the AsyncSessions' closes are awaited, so the block's
connections are back in their pools when the block exits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from ._async_session_end import _closing, closers_on_its_loop
from ._guard._lineage import cleanup
from ._session_end import close_quietly_or_invalidate
from ._work import WorkUnit


def closers_for(session: Any) -> tuple[Callable[[], object], Callable[[], object]]:
    """(close now, close as the unit inside leaves) for a Session or an AsyncSession."""
    if isinstance(session, AsyncSession):
        return closers_on_its_loop(session)

    def close() -> None:
        close_quietly_or_invalidate(session)

    return close, close


async def end_awaited(work: WorkUnit) -> None:
    """End ``work`` from a task: sync closes off the loop, AsyncSession closes awaited."""
    loop = asyncio.get_running_loop()
    before = set(_closing)
    if _holds_sync_sessions(work):

        def end_in_worker() -> None:
            with cleanup():
                work.end()

        # The async closes it starts must run on this loop: they are started from the worker
        # through the loop (closers_on_its_loop sees no running loop there), so end on the loop
        # instead when any AsyncSession is held.
        if not _holds_async_sessions(work):
            await loop.run_in_executor(None, end_in_worker)
            return
    work.end()
    started = [task for task in _closing if task not in before]
    if started:
        await asyncio.shield(asyncio.gather(*started, return_exceptions=True))


def _sessions_of(work: WorkUnit) -> list[Any]:
    sessions = list(work.values.values())
    for ref in work.owned or ():
        guard = ref()
        session = guard.session_ref() if guard is not None else None
        if session is not None:
            sessions.append(session)
    return sessions


def _holds_sync_sessions(work: WorkUnit) -> bool:
    return any(not isinstance(s, AsyncSession) for s in _sessions_of(work))


def _holds_async_sessions(work: WorkUnit) -> bool:
    return any(isinstance(s, AsyncSession) for s in _sessions_of(work))
