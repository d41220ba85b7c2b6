"""Deliberate sharing: one session used by several units, one block at a time.

SQLAlchemy's documentation allows, "in this extremely unusual scenario", several threads taking
part in one task to share a Session, "with a proper locking scheme so that there isn't concurrent
access to the Session or its state". :class:`SharedSession` is that scheme: a unit uses the
session (and its objects) only inside ``with shared as session:`` (``async with`` for asyncio or
trio tasks), which holds a lock for the whole block, so each unit's run of calls is never
interleaved with another's. Outside a block, nobody may touch the session or its objects.

Transactions are left to the application: the units take part in the same task, so a block does
not commit; the unit that finishes the task commits (in its block).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import exc as sa_exc

from .. import _fork
from .._arguments import expect_session, refuse
from .._units import Unit, current_unit, describe_unit
from .._units._thread import ThreadUnit, current_thread_unit
from ..exc import ConcurrentUseError, CrossUnitError, background
from ._handoff import _check_nobody_inside, _check_owner_is_current
from ._install import guard_of, install
from ._state import SHARED

S = TypeVar("S")


class Lock(Protocol):
    def acquire(self) -> Any: ...

    def release(self) -> Any: ...


class SharedSession(Generic[S]):
    """A guarded session shared by several units, which take turns in ``with`` blocks.

    :param session: a ``Session`` or ``AsyncSession`` owned by the running unit (a registry's
     implicit session is taken out of the registry; a ``Session.scope()`` session cannot be
     shared). Unguarded sessions are guarded.
    :param lock: for ``with`` blocks, the lock that serializes the units; default
     ``threading.Lock()`` (gevent's or eventlet's when they patched ``threading`` first). Greenlets
     of an unpatched program need ``gevent.lock.Semaphore()`` (or eventlet's). ``async with``
     blocks use an ``asyncio.Lock`` (or ``trio.Lock``).
    """

    def __init__(self, session: S, *, lock: Lock | None = None) -> None:
        expect_session("SharedSession()", "session", session)
        if lock is not None:
            _expect_lock(lock)
        guard = guard_of(session)
        if guard is None:
            install(session, "raise")
            guard = guard_of(session)
            assert guard is not None  # a Session or AsyncSession, just guarded
        if guard.state == SHARED:
            raise sa_exc.InvalidRequestError("This session is already a SharedSession's.")
        _check_owner_is_current(guard, "share it")
        _check_nobody_inside(guard, "shared")
        if guard.on_hand_off is not None:
            guard.on_hand_off(session)
            guard.on_hand_off = None
        guard.disown(SHARED)
        self.session = session
        self._guard = guard
        self._lock: Lock = lock if lock is not None else threading.Lock()
        self._async_lock: Any = None
        self._blocks: str | None = None  # "with" or "async with", fixed by the first block
        self._holder: Unit | None = None
        self._holder_thread: ThreadUnit | None = None
        self._depth = 0

    # -- with (threads, greenlets) -------------------------------------------------------------

    def __enter__(self) -> S:
        unit = current_unit()
        if self._reenter(unit, "with"):
            return self.session
        if not self._lock.acquire(blocking=False):  # type: ignore[call-arg]
            self._check_no_deadlock(unit)
            self._lock.acquire()
        self._take(unit, self._lock)
        return self.session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._give_back("with"):
            self._lock.release()

    # -- async with (asyncio or trio tasks) ----------------------------------------------------

    async def __aenter__(self) -> S:
        unit = current_unit()
        if self._reenter(unit, "async with"):
            return self.session
        if self._async_lock is None:
            self._async_lock = _new_async_lock()
        await self._async_lock.acquire()
        self._take(unit, self._async_lock)
        return self.session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._give_back("async with"):
            self._async_lock.release()

    # -- turns -----------------------------------------------------------------------------------

    def _reenter(self, unit: Unit, blocks: str) -> bool:
        if self._blocks is None:
            self._blocks = blocks
        elif self._blocks != blocks:
            raise sa_exc.InvalidRequestError(
                f"This SharedSession is used with `{self._blocks}` blocks; `{blocks}` would not "
                "be serialized with them. Use one kind of block for all its units."
            )
        if self._holder is unit:
            self._depth += 1
            return True
        return False

    def _take(self, unit: Unit, lock: Lock) -> None:
        try:
            if self._guard.generation != _fork.generation:
                raise CrossUnitError(
                    "This SharedSession was made before os.fork(), in the parent process; its "
                    "connection belongs to the parent. Create a new session in the child. "
                    + background("guard-forked")
                )
            self._guard.own()
        except BaseException:
            lock.release()
            raise
        self._holder, self._holder_thread, self._depth = unit, current_thread_unit(), 1

    def _give_back(self, blocks: str) -> bool:
        """End one block of the holder; True when the lock is to be released."""
        if self._holder is None or blocks != self._blocks:
            raise sa_exc.InvalidRequestError(
                f"A SharedSession was exited (`{blocks}`) without being entered that way (or "
                "exited once more than entered); nothing was released. Use "
                "`with shared as session:` (`async with` in tasks) instead of calling "
                "__enter__/__exit__ by hand. " + background("guard-shared-blocks")
            )
        unit = current_unit()
        if unit is not self._holder:
            raise sa_exc.InvalidRequestError(
                f"A SharedSession block entered in {describe_unit(self._holder)} was exited in "
                f"{describe_unit(unit)}; enter and exit it in one unit."
            )
        self._depth -= 1
        if self._depth:
            return False
        self._guard.disown(SHARED)
        self._holder = self._holder_thread = None
        return True

    def _check_no_deadlock(self, unit: Unit) -> None:
        """Refuse to block an OS lock on a turn held by another unit of this very thread."""
        holder = self._holder
        if (
            holder is not None
            and self._holder_thread is current_thread_unit()
            and type(self._lock).__module__ == "_thread"
        ):
            raise ConcurrentUseError(
                f"{describe_unit(unit)} would wait for a SharedSession held by "
                f"{describe_unit(holder)} in the same OS thread, on a thread lock: that waits "
                "forever. Give greenlets of an unpatched program a cooperative lock "
                "(SharedSession(session, lock=gevent.lock.Semaphore()), or eventlet's "
                "eventlet.semaphore.Semaphore()), and use `async with` in tasks. "
                + background("guard-shared")
            )


def _expect_lock(lock: object) -> None:
    """A ``with``-block lock: ``acquire()``/``release()`` that block, not coroutines."""
    acquire = getattr(lock, "acquire", None)
    if not callable(acquire) or not callable(getattr(lock, "release", None)):
        refuse(
            TypeError,
            "SharedSession()",
            "lock",
            lock,
            "a lock with acquire() and release() (threading.Lock(), gevent.lock.Semaphore())",
        )
    if inspect.iscoroutinefunction(acquire):
        refuse(
            TypeError,
            "SharedSession()",
            "lock",
            lock,
            "a lock for `with` blocks (threading.Lock(), gevent.lock.Semaphore())",
            "An asyncio lock cannot serve `with` blocks; `async with shared as session:` brings "
            "its own asyncio.Lock (or trio.Lock), so leave `lock` out.",
        )


def _new_async_lock() -> Any:
    if asyncio.events._get_running_loop() is not None:
        return asyncio.Lock()
    trio = sys.modules.get("trio")
    if trio is not None:
        return trio.Lock()
    raise sa_exc.InvalidRequestError("`async with` a SharedSession needs asyncio or trio.")
