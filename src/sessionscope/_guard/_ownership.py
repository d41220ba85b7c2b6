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

import asyncio
import weakref
from collections.abc import Callable
from typing import Any, Literal

from greenlet import getcurrent, greenlet

from .. import _fork
from .._units import Unit, current_unit, describe_unit
from .._units._asyncio import _get_running_loop, current_task_of_loop
from .._units._greenlet import main_greenlet
from .._units._thread import ThreadUnit
from ..exc import (
    ConcurrentUseError,
    CrossUnitError,
    ShareNothingError,
    ShareNothingWarning,
    background,
)
from ._lineage import BorrowToken, Lineage, current_lineage, inherits, is_cleanup, lend_from_here
from ._site import Site, describe_site, warn_at_application

Mode = Literal["raise", "warn", "off"]
MODES: tuple[Mode, ...] = ("raise", "warn", "off")

OWNED, HANDED_OFF, SHARED, ENDED = "owned", "handed off", "shared", "ended"


_NOT_A_LINEAGE: Any = object()  # what a disowned guard's fast path compares with: never equal


def _nobody() -> None:
    """Stands in for a weak reference when there is no owner (or no fast way to see it)."""
    return None


class SessionGuard:
    """The ownership record and the entry check of one guarded session."""

    __slots__ = (
        "mode",
        "label",
        "created_at",
        "state",
        "owner_ref",
        "fast_ref",
        "generation",
        "token",
        "lineage",
        "inside",
        "depth",
        "entered",
        "on_hand_off",
        "after_leave",
        "__weakref__",
    )

    def __init__(self, mode: Mode, label: str, created_at: Site | None) -> None:
        self.mode = mode
        self.label = label
        self.created_at = created_at
        self.inside: dict[int, Unit] = {}
        self.depth = 0
        self.entered: greenlet | None = None  # the greenlet whose call took the slot
        self.on_hand_off: Callable[[Any], None] | None = None
        """Called with the session when it is handed off or shared: its registry forgets it."""
        self.after_leave: list[Callable[[], object]] | None = None
        """A close deferred until the unit inside leaves; popped (atomically) by one side only."""
        self.own(current_unit())

    # -- ownership -----------------------------------------------------------------------------

    def own(self, unit: Unit) -> None:
        """Make ``unit`` (the running unit) the owner, and mark its context for borrowers."""
        self.owner_ref: Callable[[], Unit | None] = weakref.ref(unit)
        self.fast_ref: Callable[[], Any]
        if isinstance(unit, (asyncio.Task, greenlet)):
            self.fast_ref = self.owner_ref
        elif isinstance(unit, ThreadUnit):
            self.fast_ref = weakref.ref(main_greenlet())
        else:  # trio: seen on the slow path
            self.fast_ref = _nobody
        self.generation = _fork.generation
        self.token: BorrowToken | None
        self.lineage: Lineage | None  # the owner's lineage last seen: the fast path's context
        self.token, self.lineage = lend_from_here(self)
        self.state = OWNED

    def disown(self, state: str) -> None:
        """Nobody owns the session until :meth:`own` (handed off, or shared between blocks)."""
        self.owner_ref = self.fast_ref = _nobody
        self.token = None
        self.lineage = _NOT_A_LINEAGE
        self.state = state

    def owner(self) -> Unit | None:
        return self.owner_ref()

    def is_owned_by_current(self) -> bool:
        return (
            self.generation == _fork.generation
            and self.owner_ref() is current_unit()
            and inherits(self.token)
        )

    # -- the entry check -----------------------------------------------------------------------

    def admit(self, operation: str, of_class: type | None = None) -> bool:
        """Check the running unit may enter; True when it entered (then :meth:`leave` after).

        ``operation`` is a method name, or with ``of_class`` the attribute written on an object
        of that class; both only go into messages.
        """
        current = getcurrent()  # (nested calls were recognised by the callers already)
        loop = _get_running_loop()
        running = current if loop is None else current_task_of_loop(loop)
        if (
            running is None
            or running is not self.fast_ref()  # (cleared in a forked child: see forget_owners)
            or current_lineage.get() is not self.lineage  # the owner's context, as last seen
        ):
            return self._admit_slow(operation, of_class)
        token = self.token  # the owner's identity in the slot (no weak reference to follow)
        holder = self.inside.setdefault(0, token)
        if holder is not token:
            return self._overlap(self.owner_ref(), holder, operation, of_class)
        if not self.depth:
            self.entered = current  # before depth: who sees depth > 0 sees who entered
        self.depth += 1
        return True

    def leave(self) -> None:
        self.depth -= 1
        if not self.depth:
            self.entered = None
            self.inside.clear()
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
        if self.inside.get(0) is not None:
            pending = self.after_leave = [close_later]
            if self.inside.get(0) is not None:
                return
            try:  # it left meanwhile: close here, unless its leaving took the close already
                pending.pop()
            except IndexError:
                return
        close()

    def check_write(self, attribute: str, of_class: type) -> None:
        """A write to a mapped attribute of an attached object: the same rules, no stay inside."""
        if self.depth and getcurrent() is self.entered:
            return  # SQLAlchemy's own writes inside a call (foreign keys synced during a flush)
        if self.admit(attribute, of_class):
            self.leave()

    def _admit_slow(self, operation: str, of_class: type | None) -> bool:
        if self.mode == "off":
            return False
        unit = current_unit()
        identity: Any = self.token if unit is self.owner_ref() and self.token else unit
        if self.generation != _fork.generation:
            self._refuse(unit, operation, of_class, forked=True)
        # The owner's own context, or one copied from it (a borrower); the owner *unit* in another
        # context is refused too: a pool thread that made a session in one job is not its owner
        # in the next job (another request's).
        elif not inherits(self.token):
            if is_cleanup():
                return False
            if not (self.state == ENDED and operation == "close"):  # closed already: harmless
                self._refuse(unit, operation, of_class)
        elif unit is self.owner_ref():
            # the owner, in a context that made more sessions since: the fast path's again
            self.lineage = current_lineage.get()
        # admitted, or warned about in "warn" mode (then its nested calls are not warned again)
        holder = self.inside.setdefault(0, identity)
        if holder is not identity:
            return self._overlap(unit, holder, operation, of_class)
        if not self.depth:
            self.entered = getcurrent()
        self.depth += 1
        return True

    # -- refusals ------------------------------------------------------------------------------

    def _did(self, operation: str, of_class: type | None) -> str:
        if of_class is None:
            if operation == "_identity_lookup":  # a lazy many-to-one from the identity map
                return f"lazy-loaded a related object through this {self.label}"
            return f"called {self.label}.{operation}()"
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
                f"child {did}. Its connection belongs to the parent. Create new "
                "sessions in the child (and call engine.dispose(close=False) there first). "
                + background("guard-forked")
            )
        else:
            state, fix = self._ownership_and_fix(unit, who)
            message = (
                f"{this} {state}, but {who} {did}. A session and every object attached to it "
                f'belong to one concurrent unit at a time ("share nothing"). {fix} '
                + background("guard-cross-unit")
            )
        self._violation(CrossUnitError(message))

    def _ownership_and_fix(self, unit: Unit, who: str) -> tuple[str, str]:
        if self.state == HANDED_OFF:
            return (
                "was handed off with sessionscope.hand_off() and nobody has adopted it yet",
                "Call sessionscope.adopt(session) in the unit taking it over, then use it there.",
            )
        if self.state == ENDED:
            return (
                "belonged to a unit that has ended; sessionscope closed it then",
                f"Give {who} its own session (the registry's Session() or Session.scope()); wait "
                "for work you hand off before the unit that owns the session ends.",
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
        if owner is None:
            return "belonged to a unit that has ended", fix
        if owner is unit:
            return (
                f"belongs to {who} as it ran other work (another context: an earlier job of a "
                "thread pool, or code under contextvars.copy_context().run)",
                "A session made inside one job of a thread pool belongs to that job: use it "
                "there, or open it in the unit that hands out the jobs (a Session.scope() there "
                "follows into each of them), or move it with sessionscope.hand_off()/adopt().",
            )
        return f"belongs to {describe_unit(owner)}", fix

    def unit_inside(self) -> Unit | None:
        """The unit inside the session now (the slot holds the owner's token for the owner)."""
        holder = self.inside.get(0)
        if isinstance(holder, BorrowToken):
            guard = holder()
            return guard.owner_ref() if guard is not None else None
        return holder

    def _overlap(
        self, unit: Unit | None, holder: Unit, operation: str, of_class: type | None
    ) -> bool:
        if isinstance(holder, BorrowToken):
            holder = self.unit_inside()
        message = (
            f"{describe_unit(unit)} {self._did(operation, of_class)} while "
            f"{describe_unit(holder)} was inside the same {self.label} (created at "
            f"{describe_site(self.created_at)}). A "
            "session runs one operation of one unit at a time; the second call was stopped "
            "before it reached SQLAlchemy or the driver. Give each concurrent unit its own "
            "session (copy objects with sessionscope.copy_to()), or serialize the units with "
            "sessionscope.SharedSession. " + background("guard-concurrent")
        )
        return self._violation(ConcurrentUseError(message))

    def _violation(self, error: ShareNothingError) -> bool:
        if self.mode == "raise":
            raise error
        warn_at_application(str(error), ShareNothingWarning)
        return False
