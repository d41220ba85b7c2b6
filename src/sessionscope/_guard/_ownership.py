"""Who owns a guarded session, who is inside it now, and what happens to everybody else.

One :class:`SessionGuard` per guarded session (for an AsyncSession, per its ``sync_session``,
where all the work happens). Every guarded call asks :meth:`SessionGuard.admit`:

- the owner is recognised on a fast path (its task, or its greenlet: a thread's main greenlet for a
  thread) that costs a couple of attribute reads, because it runs on every session call;
- anyone else goes through :func:`sessionscope.current_unit`: a unit that inherited the owner's
  context (see ``_lineage``) borrows legitimately, sessionscope's own cleanup passes, and any other
  unit gets :class:`~sessionscope.CrossUnitError` (or a warning in ``"warn"`` mode);
- admitted units take a one-entry slot (``dict.setdefault`` is atomic under the GIL) with a depth
  for re-entry, so a second unit entering while another is inside gets
  :class:`~sessionscope.ConcurrentUseError`, before SQLAlchemy or the driver see the call.

Owners are held by weak reference: a session kept in its own greenlet's ``__dict__`` must not keep
that greenlet alive.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Literal

from greenlet import getcurrent, greenlet
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session
from sqlalchemy.orm.session import _sessions as _live_sessions

from .. import _fork
from .._session_state import closed_already
from .._units import Unit, current_unit, describe_unit
from .._units._asyncio import _get_running_loop, current_task_of_loop
from .._units._thread import THREAD_UNIT_ATTRIBUTE
from .._work import WorkUnit, current_or_new_work, current_work, running_task, work_var
from ..exc import (
    ConcurrentUseError,
    CrossUnitError,
    ShareNothingError,
    ShareNothingWarning,
    background,
)
from . import _lineage
from ._lineage import ITSELF, inherits, is_cleanup, lend_from_here
from ._site import Site, describe_site, warn_at_application
from ._state import ENDED, HANDED_OFF, INSIDE, OWNED, SHARED, GuardState, speedups

if speedups is not None:
    # the C check lets sessionscope's own cleanup of an ended unit's session through, as
    # _admit_slow() does first (every implicit session is closed so, from outside its unit)
    speedups.configure_cleanup(_lineage._cleaning_up, _fork)

Mode = Literal["raise", "warn", "off"]
MODES: tuple[Mode, ...] = ("raise", "warn", "off")


try:  # SQLAlchemy >= 2.0.22: a closed session can refuse further use (what scopes seal)
    from sqlalchemy.orm.session import _SessionCloseState

    _SEALED: Any = _SessionCloseState.CLOSED
except ImportError:  # pragma: no cover
    _SEALED = object()

_modules = sys.modules


def live_session(key: int) -> Session | None:
    """The live Session of ``hash_key`` ``key`` in SQLAlchemy's registry, or None.

    Read from the registry's dict of weak references, as ``WeakValueDictionary.get()`` does
    without its Python frame (a dead reference left there reads as None, as ``get()`` answers).
    """
    ref = _live_session_refs.get(key)
    return None if ref is None else ref()


_live_session_refs: dict[int, weakref.ref[Session]] = _live_sessions.data  # type: ignore[attr-defined]
"""The dict behind SQLAlchemy's ``WeakValueDictionary`` of live sessions (which keeps it for
its lifetime: ``clear()`` empties it in place)."""


_MARK_THE_REQUEST = (
    " If the session was made in a thread-pool job of a request (a FastAPI/Starlette sync "
    "dependency or endpoint, asyncio.to_thread), the request must open "
    "`async with sessionscope.unit_of_work():` (a pure ASGI wrapper, or the framework's "
    "integration) before its first job: then all its jobs are one unit of work and may pass "
    "the session on, one after another."
)
_CLOSING = frozenset({"close", "invalidate", "reset"})
"""What any unit may do to a session whose owner is gone: closing is how users recover."""

violation_sink: Callable[[SessionGuard, str, ShareNothingError | None], None] | None = None
"""The runtime audit's recorder (``sessionscope._audit``), None unless an audit runs: called with
the guard, the kind and the error instead of warning (it raises in "raise" mode), and with
``"left-open"`` and no error when an owner's unit ends. Only refusals and ends test it."""


class _Is:
    """A callable returning one object, as a weak reference returns its referent."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __call__(self) -> Any:
        return self.value


def _nobody() -> None:
    """Stands in for a weak reference when there is no owner (or no fast way to see it)."""
    return None


class SessionGuard(GuardState):
    """The ownership record and the entry check of one guarded session.

    What every check reads (``depth``, ``entered``, ``inside``, ``fast_key``, ``state``,
    ``after_leave``) is in its base, :data:`~sessionscope._guard._state.GuardState`.
    """

    __slots__ = (
        "mode",
        "label",
        "created_at",
        "owner_ref",
        "session_key",
        "token",
        "parent",
        "on_hand_off",
        "__weakref__",
    )

    owner_ref: Callable[[], WorkUnit | None]
    token: Any
    """The lineage link it owns by (see ``sessionscope._lineage_node``): ``ITSELF`` (the guard
    is its own link), a :class:`BorrowToken` (owned anew), or None (nobody owns it)."""
    parent: Any
    """As a link of lineages: the next older link (see ``_lineage``). Its ``length`` (0 while
    it has never been one) and ``rebuild_at`` are in its base, with ``generation``,
    ``of_async`` and ``owned_by_job``."""

    def __init__(
        self,
        mode: Mode,
        label: str,
        created_at: Site | None,
        work: WorkUnit | None = None,
        on_hand_off: Callable[[Any], None] | None = None,
        session_key: int | None = None,
        of_async: bool = False,
    ) -> None:
        """``work``: the running code's unit of work, when the caller has just looked it up.

        ``depth``, ``entered`` and ``after_leave`` start as their base makes them (0, None,
        None); the rest is set here once (a guard is made for every session: each assignment
        more costs every request).
        """
        self.mode = mode
        self.label = label
        self.created_at = created_at
        self.on_hand_off = on_hand_off
        """Called with the session when it is handed off or shared: its registry forgets it."""
        self.session_key = session_key
        """The guarded session's ``hash_key`` (see :meth:`session_ref`), set as it is installed."""
        self.of_async = of_async
        """Whether the guarded session is an AsyncSession's (the one :meth:`session_ref` finds)."""
        self.own(work)

    def session_ref(self) -> Any:
        """The guarded Session or AsyncSession, or None once it is gone (for closing it when its
        owner ends).

        Found where SQLAlchemy finds them: a Session in its registry of live sessions by its
        ``hash_key`` (as ``object_session()`` finds an object's), an AsyncSession as the proxy
        of its sync session. A weak reference held by the guard would be about 80 bytes and an
        object for the collector per session, for a lookup made once, at the end.
        """
        return self._session(unsealed_only=False)

    def unsealed_session(self) -> Any:
        """:meth:`session_ref`, but None also for a session its scope closed for good (sealed):
        one that holds no connection and was not left open, so its owner's end has nothing to
        do with it. Sealing is read on the Session (an AsyncSession's ``sync_session``), before
        an AsyncSession's proxy is looked up."""
        return self._session(unsealed_only=True)

    def _session(self, *, unsealed_only: bool) -> Any:
        key = self.session_key
        if key is None:
            return None
        session = live_session(key)
        if session is None:
            return None
        if unsealed_only and getattr(session, "_close_state", None) is _SEALED:
            return None
        if not self.of_async:
            return session
        return AsyncSession._retrieve_proxy_for_target(session, regenerate=False)

    # -- ownership -----------------------------------------------------------------------------

    def own(self, work: WorkUnit | None = None) -> None:
        """Make the running code's unit of work the owner, and mark its context for borrowers.

        The owner is a :class:`~sessionscope._work.WorkUnit`, not a thread or task: jobs the unit
        waits for (pool jobs running in a copy of its context) are part of it, and a pool thread's
        next job (another request's) is not. ``work`` is that unit of work when the caller has
        just looked it up (a scope's ``enter()``), which saves a second lookup per session.
        """
        if work is None:
            work = current_or_new_work()
        self.owner_ref = weakref.ref(work)
        # what the fast path finds in the context: the work, or a pool job's weak proxy of it
        self.fast_key: Callable[[], Any] = self.owner_ref if work.via is None else _Is(work.via)
        self.owned_by_job = not work.explicit and work.task is None
        """Whether the (last) owner was a thread's or pool job's own work, for the refusal's fix."""
        self.generation = _fork.generation
        token = self.token = lend_from_here(self)
        work.owns(self if token is ITSELF else token)  # (the link: no other reference is made)
        self.state = OWNED

    def disown(self, state: str) -> None:
        """Nobody owns the session until :meth:`own` (handed off, or shared between blocks)."""
        self.owner_ref = self.fast_key = _nobody
        self.token = None
        self.state = state

    def owner(self) -> Unit | None:
        """The unit that opened the owning unit of work (for messages), None if gone."""
        work = self.owner_ref()
        return None if work is None else work.root_unit()

    def is_owned_by_current(self) -> bool:
        work = self.owner_ref()
        return self.generation == _fork.generation and work is not None and work is current_work()

    def owner_ended(self, work: WorkUnit) -> None:
        """The owning unit of work ended: close the session (now, or when the unit inside
        leaves); from then on nobody may use it."""
        if self.owner_ref() is not work:
            return  # handed off, shared, or ended already
        # (unsealed_session(), live_session() and disown(), inlined: every request's session
        # ends here)
        key = self.session_key
        ref = None if key is None else _live_session_refs.get(key)
        session: Any = None if ref is None else ref()
        if session is not None and getattr(session, "_close_state", None) is not _SEALED:
            if self.of_async:
                session = AsyncSession._retrieve_proxy_for_target(session, regenerate=False)
        else:
            session = None
        if session is None:
            # gone, or closed for good by its scope (a sealed session holds nothing, and was
            # not left open): what the close below would conclude, without its calls
            self.owner_ref = self.fast_key = _nobody
            self.token = None
            self.state = ENDED
            return
        if violation_sink is not None:
            violation_sink(self, "left-open", None)
        if not self.of_async:
            # (end()'s first step, then: with nobody inside, a session that remove() closed and
            # that has held nothing since is not closed again; asked after disowning, so that no
            # borrower can enter after the question)
            self.disown(ENDED)
            if INSIDE.get(self) is None and closed_already(session):
                return
        close, close_later = _closers_for(session)
        self.end(close, close_later)

    # -- the entry check -----------------------------------------------------------------------

    def admit(self, operation: str, of_class: type | None = None) -> bool:
        """Check the running unit may enter; True when it entered (then :meth:`leave` after).

        ``operation`` is a method name, or with ``of_class`` the attribute written on an object
        of that class; both only go into messages.
        """
        work = work_var.get()
        if work is None or work is not self.fast_key():
            return self._admit_slow(operation, of_class)
        current = getcurrent()  # (nested calls were recognised by the callers already)
        loop = _get_running_loop()
        if loop is None:
            if "trio" in _modules:
                return self._admit_slow(operation, of_class)
            running: Any = current  # a thread (its main greenlet) or a greenlet, in the work
        else:
            running = current_task_of_loop(loop)
            if running is not work.task:  # a child task: not the owner (maybe a borrower)
                return self._admit_slow(operation, of_class)
        holder = INSIDE.setdefault(self, running)
        if holder is not running:
            return self._overlap(running, holder, operation, of_class)
        if not self.depth:
            self.entered = current  # before depth: who sees depth > 0 sees who entered
        self.depth += 1
        return True

    def leave(self) -> None:
        self.depth -= 1
        if not self.depth:
            self.entered = None
            INSIDE.pop(self, None)
            if self.after_leave:
                self.run_after_leave()

    def run_after_leave(self) -> None:
        try:
            callback = self.after_leave.pop()  # type: ignore[union-attr]
        except (IndexError, AttributeError):  # the other side took it
            return
        callback()

    def end(self, close: Callable[[], object], close_later: Callable[[], object]) -> None:
        """The owner's unit ended: nobody may use the session now; close it once nobody is inside.

        A borrower still inside (a thread or greenlet that outlived its owner) keeps running; the
        session is closed as it leaves (by ``close_later``, from the borrower's unit), never under
        it. Any later use, by a borrower too, is refused: it would reopen a transaction nobody
        closes.
        """
        self.disown(ENDED)
        if INSIDE.get(self) is not None:
            pending = self.after_leave = [close_later]
            if INSIDE.get(self) is not None:
                return
            try:  # it left meanwhile: close here, unless its leaving took the close already
                pending.pop()
            except IndexError:
                return
        close()

    def check_write(self, attribute: str, of_class: type) -> None:
        """A write to a mapped attribute of an attached object: the same rules, no stay inside.

        A write does no I/O and takes a few bytecodes, so the owner's write (the fast path of
        :meth:`admit`) does not take the slot: it only looks that nobody else is inside. That
        halves the cost of the most frequent check of an ORM workload.
        """
        current = getcurrent()
        if self.depth and current is self.entered:
            return  # SQLAlchemy's own writes inside a call (foreign keys synced during a flush)
        work = work_var.get()
        if work is not None and work is self.fast_key() and INSIDE.get(self) is None:
            loop = _get_running_loop()
            if loop is None:
                if "trio" not in _modules:
                    return
            elif current_task_of_loop(loop) is work.task:
                return
        if self.admit(attribute, of_class):
            self.leave()

    def check_use(self, operation: str) -> None:
        """A use that does not stay inside (a result's fetch, a state read): the same rules."""
        if self.depth and getcurrent() is self.entered:
            return  # inside a call of the session (its own fetches, its own state reads)
        if self.admit(operation):
            self.leave()

    def _admit_slow(self, operation: str, of_class: type | None) -> bool:
        if self.mode == "off":
            return False
        if self.state == ENDED and self.generation == _fork.generation and is_cleanup():
            # sessionscope closing the session of a unit of work that ended (every implicit
            # session's end): what the checks below conclude too (nobody owns it, no lineage
            # holds its token), without looking up the unit
            return False
        unit = current_unit()
        identity: Any = unit
        owner = self.owner_ref()
        if self.generation != _fork.generation:
            self._refuse(unit, operation, of_class, forked=True)
        elif owner is not None and _in_work(owner):
            # the owning work (or one running inside it), off the fast path: take the slot as the
            # fast path would, by the running task or greenlet
            identity = running_task() or getcurrent()
        # a unit that inherited the owner's context while it held the session (a child task):
        # a legitimate borrower
        elif not inherits(self):
            if is_cleanup():
                return False
            if not (operation in _CLOSING and self._owner_gone(owner)):
                self._refuse(unit, operation, of_class)
            # closing is how users recover a session whose owner is gone: let it through
        holder = INSIDE.setdefault(self, identity)
        if holder is not identity:
            return self._overlap(unit, holder, operation, of_class)
        if not self.depth:
            self.entered = getcurrent()
        self.depth += 1
        return True

    def _owner_gone(self, owner: WorkUnit | None) -> bool:
        return self.state in (ENDED, HANDED_OFF) or owner is None or owner.ended

    # -- refusals ------------------------------------------------------------------------------

    def _did(self, operation: str, of_class: type | None) -> str:
        if of_class is None:
            if operation == "(result)":
                return f"fetched rows of a result of this {self.label}"
            if operation.startswith("."):
                return f"read {self.label}{operation}"
            if operation.startswith("="):
                return f"assigned {self.label}.{operation[1:]}"
            return f"called {self.label}.{operation}()"
        if operation.startswith("(lazy load)"):
            return f"lazy-loaded {of_class.__name__}.{operation[11:]} through this {self.label}"
        if operation == "(flag_dirty)":
            return f"flagged a {of_class.__name__} attached to it as modified"
        if operation.startswith("(set_committed_value)"):
            return (
                f"set the committed value of {of_class.__name__}.{operation[21:]} on an object "
                "attached to it"
            )
        return f"wrote {of_class.__name__}.{operation} on an object attached to it"

    def _refuse(
        self, unit: Unit, operation: str, of_class: type | None, *, forked: bool = False
    ) -> None:
        did = self._did(operation, of_class)
        this = f"{self.label} created at {describe_site(self.created_at)}"
        who = describe_unit(unit)
        if forked:
            message = (
                f"{this} was created before os.fork(), in the parent process, and {who} of the "
                f"child {did}. Its connection belongs to the parent. Create new sessions in "
                "the child (the engines sessionscope knows got fresh pools there; call "
                "engine.dispose(close=False) in the child for any other engine). "
                + background("guard-forked")
            )
        else:
            state, fix = self._ownership_and_fix(unit, who)
            message = (
                f"{this} {state}, but {who} {did}. A session and every object attached to it "
                f'belong to one concurrent unit at a time ("share nothing"). {fix} '
                + background("guard-cross-unit")
            )
        kind = "forked" if forked else "cross-unit" if of_class is None else "object"
        self._violation(CrossUnitError(message), kind)

    def _ownership_and_fix(self, unit: Unit, who: str) -> tuple[str, str]:
        if self.state == HANDED_OFF:
            return (
                "was handed off with sessionscope.hand_off() and nobody has adopted it yet",
                "Call sessionscope.adopt(session) in the unit taking it over, then use it there.",
            )
        if self.state == ENDED:
            return (
                "belonged to a unit of work that has ended; sessionscope closed it then",
                f"Give {who} its own session (the registry's Session() or Session.scope()); wait "
                "for work you hand off before the unit that owns the session ends."
                + (_MARK_THE_REQUEST if self.owned_by_job else ""),
            )
        if self.state == SHARED:
            return (
                "belongs to a SharedSession",
                "Use it, and its objects, inside `with shared as session:` (`async with` in "
                "tasks), which gives the units turns.",
            )
        owner = self.owner_ref()
        fix = (
            f"Give {who} its own session (the registry's Session() or Session.scope()) and copy "
            "objects into it with sessionscope.copy_to(); to move this session on purpose, call "
            "sessionscope.hand_off(session) in its owner and sessionscope.adopt(session) in the "
            "unit taking it; to share it deliberately, use sessionscope.SharedSession."
        )
        if owner is None or owner.ended:
            return "belonged to a unit of work that has ended", fix
        if owner.root_unit() is unit:
            return (
                f"belongs to {owner.describe()} as it ran an earlier request or job (a reused "
                "thread or greenlet, or a thread-pool job of another unit)",
                "A session made in one request or job belongs to it. If the jobs of one request "
                "must share a session, mark the request before it hands them out: "
                "sessionscope.unit_of_work() (or the framework's integration) in the unit that "
                "waits for the jobs; or move it with sessionscope.hand_off()/adopt().",
            )
        if self.owned_by_job or running_task() is None:
            fix += _MARK_THE_REQUEST
        return f"belongs to {owner.describe()}", fix

    def unit_inside(self) -> Unit | None:
        """The unit inside the session now (a thread is held by its main greenlet)."""
        unit: Unit | None = _as_unit(INSIDE.get(self))
        return unit

    def _overlap(
        self, unit: Unit | None, holder: Unit, operation: str, of_class: type | None
    ) -> bool:
        holder = _as_unit(holder)
        if isinstance(unit, greenlet) and unit.parent is None:
            unit = current_unit()  # the running thread, entered on the fast path: name it
        message = (
            f"{describe_unit(unit)} {self._did(operation, of_class)} while "
            f"{_describe_inside(self, holder)} was inside the same {self.label} (created at "
            f"{describe_site(self.created_at)}). A "
            "session runs one operation of one unit at a time; the second call was stopped "
            "before it reached SQLAlchemy or the driver. Give each concurrent unit its own "
            "session (copy objects with sessionscope.copy_to()), or serialize the units with "
            "sessionscope.SharedSession. Jobs of one unit that run in parallel (gather of "
            "to_thread calls) share its unit of work: give each job `with Session.scope(new=True)"
            " as session:`. " + background("guard-concurrent")
        )
        return self._violation(ConcurrentUseError(message), "concurrent")

    def _violation(self, error: ShareNothingError, kind: str) -> bool:
        if violation_sink is not None:  # an audit records it, and raises in "raise" mode
            violation_sink(self, kind, error)
            return False
        if self.mode == "raise":
            raise error
        warn_at_application(str(error), ShareNothingWarning)
        return False


def _closers_for(session: Any) -> tuple[Callable[[], object], Callable[[], object]]:
    """``_work_end.closers_for``, imported on first use (that module imports the guard package),
    then kept: a function-level import runs the import machinery on every call."""
    global _closers_for
    from .._work_end import closers_for

    _closers_for = closers_for
    return closers_for(session)


def _as_unit(holder: Any) -> Any:
    """The unit a slot holder stands for: a thread enters by its main greenlet (fast path)."""
    if isinstance(holder, greenlet) and holder.parent is None:
        thread_ref = holder.__dict__.get(THREAD_UNIT_ATTRIBUTE)
        thread = thread_ref() if thread_ref is not None else None
        return thread if thread is not None else holder
    return holder


def _describe_inside(guard: SessionGuard, holder: Any) -> str:
    """Who is inside: a thread that entered on the fast path is held by its main greenlet, which
    names no thread unless the thread asked for its unit before; find it by its stack, which is
    inside one of this guard's checked calls (a refusal's path, so the scan costs nothing
    elsewhere)."""
    if isinstance(holder, greenlet) and holder.parent is None:
        thread = _thread_inside(guard)
        if thread is not None:
            return f"thread {thread.name!r} (native id {thread.native_id})"
    return describe_unit(holder)


def _thread_inside(guard: SessionGuard) -> threading.Thread | None:
    """The thread whose stack is inside one of ``guard``'s checked calls, if any.

    Only two kinds of frames have their locals read: the Python wrappers' (a local named
    ``guard``) and those of the methods the wrappers check (their ``self`` is the session or
    the handle; the C wrapper leaves no frame of its own). Reading ``f_locals`` of any frame of
    another thread can crash CPython 3.11 (a segmentation fault was seen here, in a frame of a
    thread that was not in a checked call); a frame's code is known without touching its values.
    """
    from ._checks import CHECKED_CODES  # (a refusal's path: that module imports this one)

    me = threading.get_ident()
    threads = {thread.ident: thread for thread in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        if ident == me or ident not in threads:
            continue
        walking: Any = frame
        while walking is not None:
            code = walking.f_code
            if code in CHECKED_CODES:
                if _guard_of_handle(walking.f_locals.get("self")) is guard:
                    return threads[ident]
            elif "guard" in code.co_varnames and walking.f_locals.get("guard") is guard:
                return threads[ident]
            walking = walking.f_back
    return None


def _guard_of_handle(handle: Any) -> Any:
    """The guard a session or handle carries (an engine transaction's, through its
    connection), or None."""
    try:
        return getattr(handle, "_sessionscope_guard", None)
    except Exception:  # a handle half-way through its own teardown
        return None


def _in_work(owner: WorkUnit) -> bool:
    """Whether the running code is in ``owner``'s work, or in a work nested inside it."""
    work = current_work()
    return work is not None and work.within(owner)
