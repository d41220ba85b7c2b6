"""Closing an AsyncSession when its task ends: awaited, on its own loop, never by the collector.

An AsyncSession can only be closed by awaiting ``close()`` on the loop its connections belong to.
A task's end is reported by its done-callback, on that loop, so the close runs there in a task of
its own. That task must not be cancellable: ``asyncio.run()`` cancels every task still pending
when the main coroutine returns, which is exactly when the main task's done-callback schedules
its close, and a coroutine cancelled before its first step never runs at all (its connection would
then be left to the garbage collector). ``asyncio.run()`` waits for the tasks it cancelled, so an
uncancellable close finishes before the loop closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from ._guard._install import guard_of
from ._guard._lineage import cleanup
from ._session_end import is_sealed, seal
from ._units._asyncio import _get_running_loop

log = logging.getLogger("sessionscope")
_closing: set[asyncio.Task[Any]] = set()  # strong references until done: tasks are held weakly


class _CloseTask(asyncio.Task):  # type: ignore[type-arg]
    """A task that ignores ``cancel()``: it finishes returning a connection to its pool."""

    def cancel(self, msg: Any = None) -> bool:
        return False


async def _close(session: Any, *, then_seal: bool) -> None:
    with cleanup():  # this task is sessionscope's own: the guard lets it close the session
        try:
            await session.close()
        except BaseException:
            with contextlib.suppress(Exception):  # the close error is the one worth reporting
                await session.invalidate()
            raise
        finally:
            if then_seal:
                seal(session.sync_session)


def start_close(session: Any, *, then_seal: bool = False) -> asyncio.Future[None]:
    """Begin closing ``session`` on the running loop, in a task that cancellation can't stop.

    An AsyncSession in no transaction holds no connection: closing it does no I/O and nothing
    can cut it short, so it is closed here and then (a done future), without the task and the
    greenlet an awaited close costs (about a tenth of a small request's CPU under uvicorn).
    """
    loop = asyncio.get_running_loop()
    if not session.sync_session.in_transaction():
        done: asyncio.Future[None] = loop.create_future()
        try:
            if not is_sealed(session.sync_session):  # (sealed: closed for good already)
                with cleanup():
                    session.sync_session.close()
        except Exception as error:  # noqa: BLE001 - reported through the future, as a task's
            done.set_exception(error)
        else:
            done.set_result(None)
        finally:
            if then_seal:
                seal(session.sync_session)
        return done
    coroutine: Coroutine[Any, Any, None] = _close(session, then_seal=then_seal)
    task: asyncio.Task[None] = _CloseTask(coroutine, loop=loop)
    _closing.add(task)
    task.add_done_callback(_closing.discard)
    finish_closes_before_loop_close(loop)
    return task


_hooked: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
"""The loops whose ``close()`` finishes pending closes first (kept here, not on the loop: see
``_units._asyncio.watch_end``)."""


def finish_closes_before_loop_close(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop.close()`` finish the closes still pending on ``loop`` first.

    ``loop.run_until_complete(job())`` stops the loop in the very iteration in which the job's
    task ends, so the close that the task's end schedules never gets a step; a worker that then
    calls ``loop.close()`` (one loop per job) would leave the connection checked out, idle in
    transaction. ``asyncio.run()`` needs none of this (it waits for cancelled tasks). A loop
    type that takes no attributes keeps its pending closes until it is run again.
    Works a thread lent to the loop's tasks (``_work_end.lent_on_loop``) outlive the loop: their
    AsyncSessions are closed here too.
    """
    try:
        if loop in _hooked:
            return
        _hooked.add(loop)
    except TypeError:  # a loop that takes no weak reference keeps its closes until it runs
        return
    original_close = loop.close

    async def finish() -> None:
        from ._work_end import close_lent_async_sessions

        await close_lent_async_sessions(loop)
        pending = [task for task in _closing if task.get_loop() is loop and not task.done()]
        await asyncio.gather(*pending, return_exceptions=True)

    def close() -> None:
        if not loop.is_running() and not loop.is_closed():
            loop.run_until_complete(finish())
        original_close()

    with contextlib.suppress(AttributeError):  # a loop that takes no attributes keeps its
        loop.close = close  # type: ignore[method-assign]  # closes until it runs again


def _report_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "sessionscope: closing an AsyncSession at the end of its task failed",
            exc_info=task.exception(),
        )


def closers_on_its_loop(session: Any) -> tuple[Callable[[], object], Callable[[], object]]:
    """(close now, close from another thread) for an AsyncSession, both on the running loop.

    Outside any event loop (a thread or greenlet used an AsyncSession) it never awaited, so it
    never checked out a connection: there is nothing to await on and nothing to return.
    """
    if _get_running_loop() is None:

        def cannot_close() -> None:
            if session.sync_session.get_transaction() is not None:
                log.warning(
                    "sessionscope: an AsyncSession ended outside any event loop while in a "
                    "transaction; it could not be closed"
                )

        return cannot_close, cannot_close
    loop = asyncio.get_running_loop()

    def close() -> None:
        start_close(session).add_done_callback(_report_failure)

    return close, lambda: loop.call_soon_threadsafe(close)


def close_on_its_loop(session: Any) -> None:
    """End-of-unit hook of the async registry: close the task's AsyncSession on its loop."""
    close, close_later = closers_on_its_loop(session)
    guard = guard_of(session)
    if guard is None:
        close()
    else:  # a borrower inside (a to_thread thread outliving a cancelled task) closes it on leaving
        guard.end(close, close_later)


async def close_shielded(session: Any, *, then_seal: bool) -> None:
    """Close ``session`` and wait for it; if the waiter is cancelled, the close still completes."""
    await asyncio.shield(start_close(session, then_seal=then_seal))
