"""What a link of a lineage is, and when it can never be lent again.

A lineage (``_guard._lineage``) is a chain of the guarded sessions a context may borrow, newest
first. Its links are of two kinds:

- **The guard itself**, for the ownership a guard starts with (almost every session's only one).
  A guard holds no session (only its ``hash_key``), so a chain holding it strongly keeps nothing
  big alive, and no separate link object is made: a separate one was about 100 bytes per live
  session, a fifth of what a unit's bookkeeping was (issue 14's bar is 500 bytes).
- **A** :class:`BorrowToken`, for a guard owned anew (handed off, adopted, re-owned after
  sharing): contexts holding an older link of the guard must not borrow through the new
  ownership, and links are compared by identity, so the new ownership needs a new one.

The guard's ``token`` says which link it owns by now: :data:`ITSELF`, a ``BorrowToken``, or None
(nobody owns it). A link can be lent while its guard still owns by it and its session is alive;
once false that stays false (a guard never owns by an old link again, a session never comes
back), so dropping such links from a chain in place changes nothing any context may borrow.

A unit of work keeps the links of the sessions it owns (:meth:`WorkUnit.owns`) by the same rule.
This module imports nothing of sessionscope: the units of work and the guard both use it.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy.orm.session import _sessions as _live_sessions


class _Itself:
    """The type of :data:`ITSELF` (its repr says what it stands for)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "sessionscope.ITSELF"


ITSELF: Any = _Itself()
"""A guard's ``token`` when the guard is its own lineage link (``guard.token = guard`` would be a
reference cycle, freed only by the collector)."""


class BorrowToken(weakref.ref):  # type: ignore[type-arg]
    """The link of a guard owned anew: a weak reference to the guard, and a node of the lineage
    it was lent from.

    Compared by identity, never by referent: a guard owned anew again gets a new token, and
    contexts holding the old one must not borrow through it.
    """

    __slots__ = ("parent", "length", "rebuild_at")
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    parent: Any
    """The next older link of the lineage this one was lent from (None: the oldest)."""
    length: int
    """How many links the chain from this one holds (dead ones until they are dropped)."""
    rebuild_at: int
    """The length at which the next link lent here first drops the dead ones."""


def guard_of_link(link: Any) -> Any:
    """The guard a link stands for (None: a token whose guard is gone)."""
    return link() if isinstance(link, weakref.ref) else link


def still_lendable(link: Any) -> bool:
    """Whether ``link`` may still be lent: its guard owns by it and its session is alive."""
    if isinstance(link, weakref.ref):
        guard = link()
        if guard is None or guard.token is not link:
            return False
    else:
        guard = link
        if guard.token is not ITSELF:
            return False
    ref = _live_session_refs.get(guard.session_key)
    return ref is not None and ref() is not None


_live_session_refs: dict[int, weakref.ref[Any]] = _live_sessions.data  # type: ignore[attr-defined]
"""The dict behind SQLAlchemy's ``WeakValueDictionary`` of live sessions (which keeps it for
its lifetime: ``clear()`` empties it in place), by ``hash_key``."""
