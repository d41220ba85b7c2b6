"""Units of work: what a request or a job is, whichever threads, greenlets or tasks run it.

A thread, greenlet or task is the unit people *start*; the unit they *mean* is the unit of work: a
request or a job. Servers reuse threads and greenlets for job after job, and hand one request's
work from unit to unit in sequence (FastAPI runs a sync dependency, the endpoint and the
dependency's exit as three thread-pool jobs while the request's task waits). So sessionscope keys
implicit sessions and ownership by a :class:`WorkUnit` held in a context variable:

- **Work a unit waits for is part of it.** A job that runs in a copy of the unit's context
  (``asyncio.to_thread``, anyio/Starlette/FastAPI thread pools, ``copy_context().run``) sees the
  same ``WorkUnit``, so it uses the waiting unit's sessions, one after another.
- **Tasks are units of their own.** A child task (``gather``, ``create_task``, task groups) also
  copies the context, but it runs concurrently with its parent: it never joins the parent's work
  (it may *borrow* the parent's guarded sessions, see ``_guard._lineage``). Hence the check that
  the running task is the one that opened the work.
- **Boundaries** (:func:`unit_of_work`) open a fresh ``WorkUnit`` in a long-lived thread or
  greenlet for one request or job, and end it (closing its sessions) when the block ends.
- **Implicit units of work.** A unit that uses sessionscope outside any boundary gets one on
  first use, set in its own context. It ends with the unit: a task's done-callback, a gevent or
  eventlet greenlet's link, and otherwise the moment its context is freed (a thread's context is
  freed in the ending thread before ``join()`` returns; a raw greenlet's when it is freed; a pool
  job's as the pool drops the job). That last rule is what keeps a pool thread from carrying one
  job's session into the next, when nobody marked the job.

What cannot be done: a job's copied context carries no reference to the task waiting for it, so
jobs of a unit that never touched sessionscope (and opened no boundary) before handing them out
cannot be tied together. Each such job is then a unit of work of its own. Frameworks' glue (and
``unit_of_work()`` by hand) marks the request first.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import sys
import weakref
from collections.abc import Callable
from contextvars import Context, ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from greenlet import greenlet

from . import _fork
from ._extensions import load_extension
from ._lineage_node import guard_of_link, still_lendable
from ._units import ThreadUnit, Unit, _trio, describe_unit, unit_outside_tasks, watch_unit_end
from ._units._asyncio import _get_running_loop, current_task_of_loop
from ._units._asyncio import watch_end as watch_task_end
from ._units._greenlet import hub_spawner
from ._units._thread import (
    INTERPRETER,
    is_pool_worker,
    per_thread,
    replace_last_job,
    thread_ident,
)

log = logging.getLogger("sessionscope")
_modules = sys.modules

work_var: ContextVar[WorkUnit | None] = ContextVar("sessionscope.unit_of_work", default=None)
"""The running context's unit of work (it may not apply: see :func:`current_work`)."""

EndHook = Callable[["WorkUnit", Any], None]
_end_hooks: dict[str, weakref.ref[Any]] = {}
"""What to do with a value a :class:`WorkUnit` holds under a key when it ends (``UnitLocal``),
held weakly (see :func:`end_hook`). A plain dict of weak references, not a
``WeakValueDictionary``, whose ``get()`` is a Python call more at every unit's end."""


holding_values: dict[weakref.ref[WorkUnit], None] = {}
"""The greenlets' works holding a registry value, as keys: their weak references (until they
end). Keyed by the reference each such work has anyway, not by ``id()``, whose ``int`` was 32
bytes more per live greenlet unit; a dict, not a set, because a set's table grows fourfold and
was as large or larger per entry at some sizes. What a forked child empties, and what
``UnitLocal``'s sweep walks for finished greenlets; ``UnitLocal.set`` adds to it. A thread's
or task's work is not kept here (about 60 bytes a live unit): in a forked child the lookups'
fast paths compare its fork generation with the process's and miss, and its end abandons its
values (``_fork.abandon_if_parents``).

A weak reference without a callback is the one CPython shares per object (the guard's
``owner_ref`` is that same object), so this costs no object per unit, where a ``WeakSet`` made
one per unit for the collector to walk.
"""


def register_end_hook(key: str, owner: Any) -> None:
    """Tell work units that values under ``key`` end through ``owner.work_ended(work, value)``."""

    def forget(_: weakref.ref[Any], key: str = key, hooks: dict[str, Any] = _end_hooks) -> None:
        hooks.pop(key, None)  # (hooks bound: at interpreter exit the module's globals may be gone)

    _end_hooks[key] = weakref.ref(owner, forget)


def end_hook(key: str) -> Any:
    """The owner registered for ``key``, or None (never registered, or freed since)."""
    ref = _end_hooks.get(key)
    return None if ref is None else ref()


_MIN_PRUNE = 16
"""A work's list of owned sessions is first pruned (of the links that can no longer be lent) at
this length."""


def _run_hook(work: WorkUnit, collected: bool, hook: Callable[..., object], *args: Any) -> None:
    try:
        hook(*args)
    except Exception:  # an end-of-work hook must never break a loop, a hub or a thread's exit
        _hook_failed(work, collected)


def _hook_failed(work: WorkUnit, collected: bool, error: BaseException | None = None) -> None:
    """Log the failure of an end-of-work hook (see :meth:`WorkUnit.end`): ``error``, or the one
    being handled."""
    exc_info: BaseException | bool = True if error is None else error
    if collected:
        log.debug("sessionscope: closing after %s failed", work.describe(), exc_info=exc_info)
    else:
        log.error("sessionscope: cleaning up after %s failed", work.describe(), exc_info=exc_info)


class PythonWorkState:
    """A unit of work's fields, its start and its end: what the C ``WorkState`` of
    ``sessionscope._work_state`` does when it is built (see ``_work_state.c``), and the
    reference it is compared with (``tests/test_work_state.py``). :class:`WorkUnit` derives from
    :data:`WorkState`, one or the other."""

    __slots__ = (
        "value_key",
        "value",
        "values",
        "task",
        "root",
        "ended",
        "generation",
        "explicit",
        "owned",
        "prune_owned_at",
        "parent",
        "lends",
        "via",
        "thread",
        "__weakref__",
    )

    def __init__(
        self,
        root: Any,
        task: Any,
        explicit: bool,
        parent: WorkUnit | None = None,
        lends: bool = False,
    ) -> None:
        """(Positional arguments: a class called with keywords builds a dict per call, and a
        request opens one of these.)"""
        self.value_key: str | None = None
        """The key of the value held in :attr:`value` (None: no value there)."""
        self.value: Any = None
        self.values: dict[str, Any] | None = None
        """The values of other keys than :attr:`value_key`'s (most works hold one value: a
        dict per work would be about 150 bytes and an object more for the collector)."""
        self.task = task
        # a greenlet is held weakly: the work lives in the greenlet's own context
        self.root: Any = weakref.ref(root) if isinstance(root, greenlet) else root
        self.ended = False
        self.generation = _fork.generation
        self.explicit = explicit
        self.owned: Any = None  # a lineage link (a guard, or its token), a list of them, or None
        """The guarded sessions this work owns (see :meth:`owns`): one reference, or a list."""
        self.prune_owned_at = _MIN_PRUNE
        self.parent = parent
        """The work this one runs inside (test harnesses nest them): its sessions may be used."""
        self.lends = lends
        """Whether asyncio tasks the opening thread runs may take the work over, one at a time."""
        self.via: Any = None
        """What a pool job's context holds instead of the work (a weak proxy); else None."""
        ident = per_thread.ident  # (thread_ident(), inlined: a request opens a work)
        self.thread: int = thread_ident() if ident is None else ident
        """The thread that opened the work: a task's runs its loop. The C check uses it to see
        the task that opened the work without asking asyncio for the running loop (a system
        call on Python 3.10 and 3.11)."""

    # -- the end -------------------------------------------------------------------------------

    def end(self, *, collected: bool = False) -> None:
        """End the work: its sessions are closed (rolled back if uncommitted), once.

        ``collected``: the garbage collector freed the work's last context in a reference cycle,
        together with whatever else the cycle held; SQLAlchemy may have reclaimed the connection
        first, so a close that fails then is no news (logged at debug level).
        """
        if self.ended:
            return
        work = cast("WorkUnit", self)  # (what every instance is: this is WorkUnit's base)
        self.ended = True
        if holding_values and type(self.root) is weakref.ref:  # (only greenlets' works are kept)
            holding_values.pop(weakref.ref(work), None)
        if (self.generation != _fork.generation or _fork.forking_pid) and _fork.abandon_if_parents(
            self
        ):
            return  # a parent process's work, ending in a child: nothing of it is touched
        # (take_values() and owned_guards(), inlined: every request ends a work)
        values = None
        if self.value_key is not None or self.values:
            values = work.take_values()
        task, self.task = self.task, None  # a task's context holds its work: no cycle left
        owned = self.owned
        self.owned = None
        if values is not None:
            for key, value in values:
                ref = _end_hooks.get(key)  # (end_hook(), inlined: every unit ends here)
                hook = None if ref is None else ref()
                if hook is not None:
                    _run_hook(work, collected, hook.work_ended, work, value)
        if owned is not None:
            for link in owned if isinstance(owned, list) else (owned,):
                guard = link() if isinstance(link, weakref.ref) else link  # (guard_of_link())
                if guard is not None:
                    try:  # (_run_hook(), inlined: a request's session ends here)
                        guard.owner_ended(work)
                    except Exception:
                        _hook_failed(work, collected)
        if task is not None and self.root is task:
            # A task's context holds its work, and the work its task: a cycle the collector
            # alone could free (8 objects per task, the coroutine's frame among them, kept
            # into older generations). Held weakly now the work has ended, the task is freed
            # by reference counting as the loop drops it. (A thread's or greenlet's root is
            # no such cycle: a greenlet is held weakly from the start.)
            self.root = _weak_root(task)

    def __del__(self, _interpreter: dict[str, bool] = INTERPRETER) -> None:
        # Freed with the last context holding it: a thread's context in the ending thread, a
        # pool job's as the pool drops it. At interpreter shutdown nothing may run (module
        # globals may be gone already; the default argument survives).
        # (A work whose __init__ failed has no fields: nothing to end.)
        if not getattr(self, "ended", True) and not _interpreter["shutting_down"]:
            # In a context of its own: a finalizer can run inside any allocation, also one
            # CPython makes while it sets a context variable (the copy of the context's
            # mapping), and the end sets some (closing a session is cleanup()): set in that
            # same context, they replaced the mapping the interrupted set was still copying
            # (a crash; tests/test_gc_traversal.py).
            contextvars.Context().run(self.end, collected=True)


def _load_work_state() -> Any:
    """``sessionscope._work_state``, configured, or None (not built, or extensions off)."""
    module = load_extension("_work_state")
    if module is not None:
        module.configure(
            _fork,
            per_thread,
            thread_ident,
            greenlet,
            holding_values,
            _end_hooks,
            _hook_failed,  # (called with the failure: the C end handles no exception)
            INTERPRETER,
            _MIN_PRUNE,
        )
    return module


_work_state = _load_work_state()

if TYPE_CHECKING:
    WorkState = PythonWorkState
else:
    WorkState = PythonWorkState if _work_state is None else _work_state.WorkState


class WorkUnit(WorkState):
    """One unit of work: its implicit sessions, who opened it, whether it has ended.

    It holds one value per registry (a registry's key to its implicit session, see
    :meth:`get_value`): the first in two slots the registry lookup reads directly, any others in
    a dict made for them. ``task`` is the asyncio or trio task that opened the work (None for a
    thread or greenlet): only that task, and threads or greenlets running in a copy of its
    context, are in the work.
    """

    __slots__ = ()

    # -- who -----------------------------------------------------------------------------------

    def root_unit(self) -> Any:
        root = self.root
        return root() if isinstance(root, weakref.ref) else root

    def describe(self) -> str:
        root = self.root_unit()
        who = describe_unit(root) if root is not None else "a unit that has ended and been freed"
        if self.explicit:
            return f"the unit of work opened in {who}"
        return who

    def owns(self, link: Any) -> None:
        """Remember a guarded session this work owns by its lineage link (its guard, or the
        guard's :class:`~sessionscope._lineage_node.BorrowToken` when it was owned anew), to
        close it when the work ends.

        Most units of work own one session: it is kept as it is, and a list is made for a second
        one (an object less per unit, which counts when 100,000 units are alive at once). A
        long-lived work (a thread's, making session after session with ``Session()`` and
        ``remove()``) would keep a link per session: once the list has doubled since it was last
        pruned, the links that can no longer be lent (their session gone, or owned by another
        link) are dropped before ``link`` is added (amortised O(1) per session).
        ``_guard_setup.own`` does the same in C for the usual case.
        """
        owned = self.owned
        if owned is None:
            self.owned = link
            return
        if not isinstance(owned, list):
            self.owned = [owned, link]
            return
        if len(owned) + 1 >= self.prune_owned_at:
            owned[:] = [kept for kept in owned if still_lendable(kept)]
            self.prune_owned_at = max(_MIN_PRUNE, 2 * len(owned))
        owned.append(link)

    def owned_guards(self) -> list[Any]:
        """The guards of what :meth:`owns` was given and are still there (a new list: the
        caller may end sessions meanwhile)."""
        owned = self.owned
        if owned is None:
            return []
        links = owned if isinstance(owned, list) else (owned,)
        return [guard for guard in map(guard_of_link, links) if guard is not None]

    # -- values --------------------------------------------------------------------------------

    def get_value(self, key: str) -> Any:
        """The value held under ``key``, or None."""
        if self.value_key == key:
            return self.value
        values = self.values
        return None if values is None else values.get(key)

    def set_value(self, key: str, value: Any) -> bool:
        """Hold ``value`` under ``key`` (replacing any); True if the key held nothing."""
        if self.value_key == key:
            self.value = value
            return False
        if self.value_key is None:
            self.value_key, self.value = key, value
            return self.values is None or self.values.pop(key, None) is None
        values = self.values
        if values is None:
            values = self.values = {}
        new = key not in values
        values[key] = value
        return new

    def pop_value(self, key: str) -> Any:
        """Forget the value held under ``key``; return it (or None)."""
        if self.value_key == key:
            value = self.value
            self.value_key = self.value = None
            return value
        values = self.values
        return None if values is None else values.pop(key, None)

    def value_items(self) -> list[tuple[str, Any]]:
        """The keys and values held (a new list)."""
        key = self.value_key
        items = [] if key is None else [(key, self.value)]
        if self.values:
            items.extend(self.values.items())
        return items

    def take_values(self) -> list[tuple[str, Any]]:
        """The keys and values held, forgotten here."""
        items = self.value_items()
        self.value_key = self.value = self.values = None
        return items

    # -- the end -------------------------------------------------------------------------------

    def myself(self) -> WorkUnit:
        """The work itself, also when asked through the weak proxy a pool job's context holds."""
        return self

    def within(self, other: WorkUnit) -> bool:
        """Whether this work is ``other`` or runs inside it (``parent`` chain)."""
        work: WorkUnit | None = self
        while work is not None:
            if work is other:
                return True
            work = work.parent
        return False

    def lend_to(self, task: asyncio.Future[Any]) -> None:
        """Let ``task`` run in this work until it ends (the opening thread waits for it)."""
        self.task = task
        task.add_done_callback(self.task_ended)
        from ._work_end import lent_on_loop  # (that module imports this one)

        lent_on_loop(task.get_loop(), self)

    def task_ended(self, task: asyncio.Future[Any]) -> None:
        if self.task is task:
            self.task = None  # free for the next task the thread runs

    def unit_ended(self, *_: Any) -> None:
        """The end signal of the unit that opened an implicit work (a task, a gevent greenlet).

        It runs in a new, empty context: an asyncio loop's end callbacks share one context (see
        ``_units._asyncio.watch_end``), and what the end runs (the application's session event
        listeners) must not leave variables there for the next unit's end.

        A gevent greenlet's link runs in the hub, which must never block: there the end runs
        in a fresh greenlet if it may reach the database (a session in a transaction to roll
        back), and in the hub itself otherwise (closing a session in none only forgets its
        objects). A fresh greenlet per ended unit was most of what a gevent unit's end cost.
        """
        Context().run(self._end_off_the_hub)

    def _end_off_the_hub(self) -> None:
        spawn = hub_spawner()
        if spawn is not None and _may_block_to_end(self):
            spawn(self.end)
        else:
            self.end()

    __call__ = unit_ended
    """The work is its own end-of-unit callback (``add_done_callback(work)``, ``rawlink(work)``):
    no bound method is made and kept per unit."""


def _may_block_to_end(work: WorkUnit) -> bool:
    """``_work_end.may_block_to_end``, imported on first use (that module imports this one),
    then called directly: this function replaces itself (an import statement per gevent unit's
    end went through importlib's Python code)."""
    global _may_block_to_end
    from ._work_end import may_block_to_end

    _may_block_to_end = may_block_to_end
    return may_block_to_end(work)


def _weak_root(root: Any) -> Any:
    """``root`` held weakly if it can be (a trio task cannot, and holds no cycle to its work)."""
    try:
        return weakref.ref(root)
    except TypeError:
        return root


def running_task() -> Any:
    """The running asyncio or trio task, or None in plain thread or greenlet code."""
    loop = _get_running_loop()
    if loop is not None:
        return current_task_of_loop(loop)
    if "trio" in _modules:
        return _trio.running_task()
    return None


def current_work() -> WorkUnit | None:
    """The unit of work the running code belongs to, or None if it has none yet."""
    # running_task(), inlined: this runs for every scope and every new session
    loop = _get_running_loop()
    if loop is not None:
        return work_of_task(current_task_of_loop(loop))
    if "trio" in _modules:
        return work_of_task(_trio.running_task())
    return work_of_task(None)


def work_of_task(task: Any) -> WorkUnit | None:
    """:func:`current_work` for a caller that has just looked up the running task (or None)."""
    work: Any = work_var.get()
    if type(work) is weakref.CallableProxyType:  # a pool job's work (see _hold_in_the_pool_thread)
        try:
            work = work.myself()
        except ReferenceError:
            return None
    if work is None or work.ended or work.generation != _fork.generation:
        return None
    if task is not None and task is not work.task:
        # a task that did not open it: a child task (a unit of its own), or a task inside a
        # thread's work (asyncio.run() inside a request thread) ...
        if work.lends and asyncio.isfuture(task) and _is_free(work):
            work.lend_to(task)  # ... unless the thread lends its work to the tasks it runs
            return work  # type: ignore[no-any-return]
        return None
    return work  # type: ignore[no-any-return]


def _is_free(work: WorkUnit) -> bool:
    holder = work.task
    return holder is None or (asyncio.isfuture(holder) and holder.done())


def current_or_new_work() -> WorkUnit:
    """The running code's unit of work, opening an implicit one for the running unit if none."""
    return unit_and_work()[1]


def unit_and_work() -> tuple[Unit, WorkUnit]:
    """The running unit and its unit of work (an implicit one is opened if it has none): what a
    scope asks as it begins, with one lookup of the running task for both.

    The usual answer first, without calls: the running thread, greenlet or task is in a unit
    of work already (a request's, or its own), which its context holds (what
    :func:`work_of_task` would conclude for these cases).
    """
    work: Any = work_var.get()
    if type(work) is WorkUnit and not work.ended and work.generation == _fork.generation:
        loop = _get_running_loop()
        if loop is None:
            if "trio" not in _modules:
                return unit_outside_tasks(), work
        else:
            task = current_task_of_loop(loop)
            if task is not None and task is work.task:  # the task that opened it
                return task, work
    task = running_task()
    unit = task if task is not None else unit_outside_tasks()
    work = work_of_task(task)
    if work is None:
        work = open_implicit_work(unit, task)
    return unit, work


def open_implicit_work(unit: Unit, task: Any) -> WorkUnit:
    """Open the implicit unit of work of the running ``unit`` (``task``: the running task, or
    None), which has none: set in its context, ended with it."""
    work = WorkUnit(unit, task, False)  # not explicit
    work_var.set(work)
    watch_unit_end(unit, work)  # a task's end, a gevent/eventlet greenlet's, a thread's (weakly)
    if isinstance(unit, ThreadUnit) and is_pool_worker():
        _hold_in_the_pool_thread(work)
    return work


def open_task_work(task: asyncio.Task[Any]) -> WorkUnit:
    """:func:`open_implicit_work` for the running asyncio ``task`` (what it does for a task,
    without asking which model the unit is: a registry's miss opens one per task)."""
    work = WorkUnit(task, task, False)  # not explicit
    work_var.set(work)
    watch_task_end(task, work)
    return work


class _JobToken:
    """Held by a pool job's context: ends the job's work when the pool drops the context."""

    __slots__ = ("work_ref",)

    def __init__(self, work: WorkUnit) -> None:
        self.work_ref = weakref.ref(work)

    def __del__(self, _interpreter: dict[str, bool] = INTERPRETER) -> None:
        work = self.work_ref()
        if work is None or work.ended or _interpreter["shutting_down"]:
            return
        if _collecting:
            # freed by the garbage collector (a failed job's context, in a cycle): closing a
            # session here could take a lock the interrupted code holds. The thread's next job,
            # or its end, ends the work instead.
            return
        work.end()


_collecting = False


def _track_collections(phase: str, info: dict[str, Any]) -> None:
    global _collecting
    _collecting = phase == "start"


gc.callbacks.append(_track_collections)


_job_token: ContextVar[_JobToken | None] = ContextVar("sessionscope.job", default=None)


def _hold_in_the_pool_thread(work: WorkUnit) -> None:
    """A pool job's work: held by its thread, reached from the job's context only weakly.

    The job's context is normally dropped as the job returns, and the work ends with it (the
    token). But a job that *failed* leaves its context in a reference cycle (the exception, its
    traceback, the pool's future) until the garbage collector runs; the work, its sessions and
    their connections must not be in that cycle. So the thread holds the work, the context holds
    a weak proxy and the token, and the thread's next job (one job at a time) ends what its
    previous job left.
    """
    previous = replace_last_job(work)
    work.via = weakref.proxy(work)  # (a CallableProxyType: a WorkUnit is callable)
    work_var.set(work.via)
    _job_token.set(_JobToken(work))
    if previous is not None:
        previous.end()


class UnitOfWork:
    """A boundary: one request or job inside a long-lived thread, greenlet or task.

    Inside the block the running code (and work it hands off with its context and waits for) has
    fresh implicit sessions; when the block ends they are closed, rolled back if uncommitted, and
    so is every guarded session the block created and did not hand off. Nothing carries over
    into the next block. ``with`` in threads and greenlets; ``async with`` in tasks, where
    AsyncSessions are closed awaited and sync sessions are closed off the event loop.
    """

    # Class-level defaults: a block sets only what it was given (the WSGI integration's request
    # derives from this class, and makes one per request).
    work: WorkUnit | None = None
    """The unit of work the block opened (None until entered)."""
    _token: Token[WorkUnit | None] | None = None
    _lends = False

    def __init__(self, *, lend_to_tasks: bool = False) -> None:
        if lend_to_tasks:
            self._lends = True

    def _open(self) -> WorkUnit:
        if self.work is not None:
            from sqlalchemy import exc as sa_exc

            raise sa_exc.InvalidRequestError(
                "This unit_of_work() was already entered; call sessionscope.unit_of_work() again "
                "for another block."
            )
        # inside another unit of work (which waits for this block), whose sessions stay usable
        # (running_task(), inlined: a request opens one)
        loop = _get_running_loop()
        if loop is not None:
            task = current_task_of_loop(loop)
        elif "trio" in _modules:
            task = _trio.running_task()
        else:
            task = None
        parent = work_var.get()  # (outside any work, as a server's loop is: no more to ask)
        self.work = work = WorkUnit(
            task if task is not None else unit_outside_tasks(),
            task,
            True,  # explicit
            None if parent is None else work_of_task(task),
            self._lends,
        )
        self._token = work_var.set(work)
        return work

    def _reset(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            try:  # noqa: SIM105 - (contextlib.suppress costs more, once per request)
                work_var.reset(token)
            except ValueError:
                pass  # ended from another context: it keeps an ended work, which applies nowhere

    __enter__ = _open

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        work = self.work
        try:
            if work is not None:
                work.end()
        finally:
            self._reset()

    async def __aenter__(self) -> WorkUnit:
        return self._open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from ._work_end import end_awaited

        work = self.work
        try:
            if work is not None:
                await end_awaited(work)
        finally:
            self._reset()


def unit_of_work(*, lend_to_tasks: bool = False) -> UnitOfWork:
    """Mark one request or job: ``with sessionscope.unit_of_work():`` (``async with`` in tasks).

    For servers and workers that reuse a thread or greenlet for many requests or jobs (gunicorn's
    gthread, gevent and eventlet workers, Celery pools, hand-written worker loops), and for asyncio
    code whose thread-pool jobs must share the request's session. See :class:`UnitOfWork`.

    :param lend_to_tasks: opened in a thread, let the asyncio tasks that thread runs to completion
     inside the block (``asyncio.run()``, asgiref's ``async_to_sync``) take part in the work, one
     task at a time; tasks *they* start remain units of their own.
    """
    if lend_to_tasks is not True and lend_to_tasks is not False:
        from ._arguments import refuse

        refuse(
            TypeError,
            "sessionscope.unit_of_work()",
            "lend_to_tasks",
            lend_to_tasks,
            "True or False",
        )
    return UnitOfWork(lend_to_tasks=lend_to_tasks)


def _forget_works_after_fork() -> list[Any]:
    """In a forked child: the parent's greenlets' works hold nothing, and nothing of theirs is
    touched (a greenlet's work may be ended by the sweep, from any greenlet).

    (The other works need nothing: their generation is the parent's, so :func:`current_work`
    and the lookups never return them or their values, their guards are refused in the child,
    and their end abandons what they hold and own: ``_fork.abandon_if_parents``.)
    """
    abandoned: list[Any] = []
    for ref in list(holding_values):
        work = ref()
        if work is None:
            continue
        _fork.abandon(work)
        work.ended = True
        abandoned.append(work)
    holding_values.clear()
    return abandoned


_fork.on_fork_in_child(_forget_works_after_fork)
