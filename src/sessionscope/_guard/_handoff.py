"""Moving a guarded session to another unit on purpose: ``hand_off()`` in the owner, ``adopt()``
in the unit that takes it.

The pair is for the cases where the receiving unit does not inherit the owner's context (a thread
started by hand, ``loop.run_in_executor``, a gevent greenlet, a job queue in-process) and the owner
stops using the session: between the two calls nobody may use it, and after ``adopt()`` only the
adopter (and units inheriting *its* context) may. Like ``Session.merge()`` and
``make_transient()``, they are plain functions that take the session and return it::

    executor.submit(work, sessionscope.hand_off(session))

    def work(session):
        with sessionscope.adopt(session):  # a Session is a context manager that closes it
            ...

A registry's implicit session that is handed off is no longer the unit's: the registry forgets it
(the unit's next ``Session()`` makes a new one) and does not close it when the unit ends; the
adopter does. A ``Session.scope()`` session cannot be handed off: its block closes it.
"""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import exc as sa_exc

from .. import _fork
from .._arguments import expect_session
from .._units import current_unit, describe_unit
from ..exc import ConcurrentUseError, CrossUnitError, background
from ._install import guard_of
from ._ownership import SessionGuard
from ._state import HANDED_OFF, INSIDE, SHARED

S = TypeVar("S")


def hand_off(session: S) -> S:
    """Give up ownership of a guarded ``session`` so that another unit can :func:`adopt` it.

    Called in the owning unit, outside any call into the session. Until it is adopted, nobody may
    use the session or its objects. An unguarded session (a ``guard="off"`` registry's) is returned
    unchanged; anything that is not a session is refused with ``ArgumentError``.
    """
    expect_session("hand_off()", "session", session)
    guard = guard_of(session)
    if guard is None:
        return session
    if guard.state == SHARED:
        raise sa_exc.InvalidRequestError(
            "This session belongs to a SharedSession, which is used inside `with shared as "
            "session:` blocks; it cannot be handed off."
        )
    if guard.state == HANDED_OFF:
        raise sa_exc.InvalidRequestError(
            "This session was already handed off; sessionscope.adopt(session) takes it over."
        )
    _check_owner_is_current(guard, "hand it off")
    _check_nobody_inside(guard, "handed off")
    if guard.on_hand_off is not None:
        guard.on_hand_off(session)
        guard.on_hand_off = None
    guard.disown(HANDED_OFF)
    return session


def adopt(session: S) -> S:
    """Make the running unit the owner of a ``session`` handed off with :func:`hand_off`.

    A session whose owner has ended may be adopted too; one still owned by a live unit must be
    handed off by it first. The adopter is responsible for closing it. An unguarded session is
    returned unchanged; anything that is not a session is refused with ``ArgumentError``.
    """
    expect_session("adopt()", "session", session)
    guard = guard_of(session)
    if guard is None:
        return session
    if guard.state == SHARED:
        raise sa_exc.InvalidRequestError(
            "This session belongs to a SharedSession; use it inside `with shared as session:`."
        )
    unit = current_unit()
    owner = guard.owner()
    if guard.is_owned_by_current():
        return session
    if guard.generation != _fork.generation:
        raise CrossUnitError(
            "This session was created before os.fork(), in the parent process; its connection "
            "belongs to the parent and it cannot be adopted in the child. Create a new session. "
            + background("guard-forked")
        )
    owner_work = guard.owner_ref()
    if guard.state != HANDED_OFF and owner_work is not None and not owner_work.ended:
        raise CrossUnitError(
            f"{describe_unit(unit)} tried to adopt a session that belongs to "
            f"{describe_unit(owner)}, which has not handed it off. Call "
            "sessionscope.hand_off(session) in the owner first (when it has stopped using it). "
            + background("guard-hand-off")
        )
    _check_nobody_inside(guard, "adopted")
    guard.own()
    guard.on_hand_off = None
    return session


def _check_owner_is_current(guard: SessionGuard, action: str) -> None:
    if guard.is_owned_by_current():
        return
    owner = guard.owner()
    whose = describe_unit(owner) if owner is not None else "a unit that has ended"
    raise CrossUnitError(
        f"{describe_unit(current_unit())} tried to {action}, but the session belongs to {whose}; "
        "only its owner can. " + background("guard-hand-off")
    )


def _check_nobody_inside(guard: SessionGuard, what: str) -> None:
    holder = guard.unit_inside()
    if INSIDE.get(guard) is not None:
        raise ConcurrentUseError(
            f"The session cannot be {what} while {describe_unit(holder)} is inside it (for "
            "example from an event hook during a flush); do it between calls. "
            + background("guard-hand-off")
        )
