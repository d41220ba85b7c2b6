"""OS threads: a thread's identity, and how its end is seen, in that very thread.

CPython clears a thread's ``_thread._local`` storage while the ending thread still runs (in
``PyThreadState_Clear``, before ``Thread.join()`` can return). A sentinel kept in such a local is
therefore freed *in the ending thread*, early enough that its session is closed by its own thread
(SQLite's same-thread check holds) and before anyone joining it looks at the pool. A thread's main
greenlet, by contrast, is freed later through a pending call that only the main thread runs.

The local must be the interpreter's own: gevent and eventlet replace ``_thread._local`` with a
greenlet-local one when they patch, so the original is fetched from them when needed.
"""

from __future__ import annotations

import _thread
import atexit
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from greenlet import getcurrent


class ThreadUnit:
    """The identity of one OS thread (the real one, also under monkey-patching).

    A token rather than :class:`threading.Thread`: under gevent or eventlet patching
    ``threading.current_thread()`` answers for greenlets, and foreign threads only have dummy Thread
    objects that never die. One token lives in each thread's own (unpatched) local storage, so it
    dies with the thread; a forked child gets a new one, so it never shares a unit with its parent.
    """

    __slots__ = ("name", "native_id", "__weakref__")

    def __init__(self) -> None:
        self.name = threading.current_thread().name
        self.native_id = threading.get_native_id()

    def __repr__(self) -> str:
        return f"<ThreadUnit {self.name!r} native_id={self.native_id}>"


class UnitEndListener(Protocol):
    def unit_ended(self, *_: Any) -> None: ...


def _patched_by_gevent() -> bool:
    """Whether gevent patched ``_thread`` (its name for it: "_thread"; "thread" before Python 3)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and (
        monkey.is_module_patched("_thread") or monkey.is_module_patched("thread")
    )


def _unpatched(name: str) -> Any:
    """``_thread.<name>`` as the interpreter has it, also under gevent's or eventlet's
    monkey-patching (whose ``_local`` and ``get_ident`` stand for the running greenlet)."""
    current = getattr(_thread, name)
    if current.__module__ == "_thread":
        return current
    if _patched_by_gevent():
        return sys.modules["gevent.monkey"].get_original("_thread", name)
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None:
        return getattr(eventlet_patcher.original("_thread"), name)
    return current  # pragma: no cover - an unknown patcher; best effort


# The main thread's locals are cleared late in interpreter shutdown, after module globals have
# been set to None; the sentinel reaches this state through a default argument, which survives.
_interpreter = {"shutting_down": False}


@atexit.register
def _at_exit() -> None:
    _interpreter["shutting_down"] = True


_MIN_PRUNE = 16
"""A sentinel's list of listeners is first pruned of dead references at this length."""


class _ThreadEndSentinel:
    """Lives in the thread's own local storage; telling listeners when the thread is done.

    Listeners are held weakly (see :func:`watch_end`), in a list of weak references: most threads
    have one listener, and a ``WeakSet`` (a set, a removal callback and its list, made per
    thread, and an iteration guard at the end) was most of what the sentinel cost a thread. A
    pool thread gets a listener per job, whose works end (and are freed) job after job: once the
    list has doubled since it was last pruned, the dead references are dropped (amortised O(1)
    per job). A listener added twice is told twice, which listeners take (a second end does
    nothing).
    """

    __slots__ = ("listeners", "prune_at")

    def __init__(self) -> None:
        self.listeners: list[weakref.ref[Any]] = []
        self.prune_at = _MIN_PRUNE

    def add(self, listener: Any) -> None:
        listeners = self.listeners
        listeners.append(weakref.ref(listener))
        if len(listeners) >= self.prune_at:
            listeners[:] = [ref for ref in listeners if ref() is not None]
            self.prune_at = max(_MIN_PRUNE, 2 * len(listeners))

    def __del__(self, _interpreter: dict[str, bool] = _interpreter) -> None:
        if _interpreter["shutting_down"]:
            return  # connections die with the process; nothing may run this late
        for ref in list(self.listeners):  # (a copy: an end may make a new listener)
            listener = ref()
            if listener is not None:
                listener.unit_ended()


class _PerThread(_unpatched("_local")):  # type: ignore[misc]
    """What sessionscope keeps per OS thread: a ``threading.local`` that gevent's patching cannot
    make per-greenlet (the interpreter's own ``_thread._local``).

    Every field starts as None in each thread (a local's ``__init__`` runs in each thread on its
    first use there): a field read before it is set would raise ``AttributeError``, whose
    message is formatted as it is raised, and a new thread that takes a session read four such
    fields (about 10,000 instructions of a thread's unit, ``unit_cost.py``).
    """

    def __init__(self) -> None:
        self.unit: ThreadUnit | None = None
        """The thread's identity (:func:`current_thread_unit`)."""
        self.ident: int | None = None
        """The thread's ident, one int object per thread (:func:`thread_ident`)."""
        self.sentinel: _ThreadEndSentinel | None = None
        """What tells the thread's listeners that it ended (:func:`watch_end`)."""
        self.last_job: Any = None
        """A pool thread's current job's unit of work (:func:`replace_last_job`)."""


per_thread = _PerThread()
"""What sessionscope keeps per OS thread (its unit, its ident, its end sentinel, its pool job).
Hot callers read ``unit`` and ``ident`` on it directly, falling back to
:func:`current_thread_unit` and :func:`thread_ident` while they are None."""


THREAD_UNIT_ATTRIBUTE = "_sessionscope_thread_unit"


INTERPRETER = _interpreter
"""``INTERPRETER["shutting_down"]`` is True once exit handlers run: no cleanup may run then."""


def current_thread_unit() -> ThreadUnit:
    """The running thread's identity (also kept on its main greenlet, to name it in messages)."""
    unit = per_thread.unit
    if unit is None:
        unit = per_thread.unit = ThreadUnit()
        # weakly: a thread's main greenlet is freed late (by the main thread), its unit must not be
        _main_greenlet().__dict__[THREAD_UNIT_ATTRIBUTE] = weakref.ref(unit)
    return unit


_os_thread_ident: Callable[[], int] = _unpatched("get_ident")
"""The OS thread's ident, which the C task check compares with the running thread's."""


def thread_ident() -> int:
    """The OS thread's ident (``_thread.get_ident()``, unpatched), as one int object per thread:
    every unit of work records it, and a fresh int per call would be 32 bytes more per live
    unit."""
    ident = per_thread.ident
    if ident is None:
        ident = per_thread.ident = _os_thread_ident()
    return ident


def _main_greenlet() -> Any:
    main = getcurrent()
    while main.parent is not None:
        main = main.parent
    return main


def is_current(unit: ThreadUnit) -> bool:
    return per_thread.unit is unit


def renew_after_fork() -> list[Any]:
    """In a forked child the surviving thread gets a new identity; the old one is abandoned."""
    old = per_thread.unit
    per_thread.unit = unit = ThreadUnit()
    _main_greenlet().__dict__[THREAD_UNIT_ATTRIBUTE] = weakref.ref(unit)
    return [old] if old is not None else []


def is_pool_worker() -> bool:
    """Whether the running thread is a thread pool's worker: it runs jobs in contexts of others.

    anyio's worker threads (Starlette, FastAPI, ``anyio.to_thread``) and ``concurrent.futures``
    workers (``asyncio.to_thread``, ``run_in_executor``): their own context runs only the pool's
    loop, never application code.
    """
    thread = threading.current_thread()
    if type(thread).__name__ == "WorkerThread" and type(thread).__module__.startswith("anyio"):
        return True
    futures_thread = sys.modules.get("concurrent.futures.thread")
    target = getattr(thread, "_target", None)
    return futures_thread is not None and target is getattr(futures_thread, "_worker", None)


def replace_last_job(work: Any) -> Any:
    """Hold ``work`` as this pool thread's current job's; return the previous one, if any."""
    previous = per_thread.last_job
    per_thread.last_job = work
    return previous


def watch_end(unit: Any, listener: UnitEndListener) -> None:
    """Call ``listener.unit_ended()`` in the current thread (``unit``) when it ends.

    Weakly: a pool job's unit of work is freed (and ended) long before its thread ends, and must
    not pile up. It is told before the thread's context is torn down, which is not a safe moment
    to run Python code that touches context variables.
    """
    sentinel = per_thread.sentinel
    if sentinel is None:
        sentinel = per_thread.sentinel = _ThreadEndSentinel()
    sentinel.add(listener)


def describe(unit: Any) -> str:
    return f"thread {unit.name!r} (native id {unit.native_id})"
