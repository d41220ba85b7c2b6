"""Which units inherited an owner's context: the legitimate borrowers of its sessions.

When a unit comes to own a guarded session it sets, in its own context, a context variable to a
lineage: the chain of sessions (their :class:`BorrowToken`, each its own link) that work started
from this context may borrow. Work that the owner hands off *with its context* sees it:
``asyncio.to_thread``, the thread pools of Starlette/FastAPI (anyio) and asgiref, the helper tasks
of ``wait_for`` and ``shield`` on Python 3.10/3.11, children of ``gather`` and ``create_task``, and
SQLAlchemy's own helper task in ``AsyncSession.__aexit__`` all run in a copy of the caller's
context. A thread started by hand, a gevent/eventlet greenlet or ``loop.run_in_executor`` starts
from an empty context and does not see it, so it is not a borrower.

A context copied *before* a session was made does not hold its token: a task created earlier that
receives the session through a queue is not a borrower of it. A lineage only ever grows at its
head, so what a copy may borrow never changes; a new token links to the old head (the owner's
other sessions, and what it inherited), and tokens that can never be lent again are dropped from
the chain as it grows, so its length stays proportional to that of live sessions. A token takes
about 100 bytes.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any


class BorrowToken(weakref.ref):  # type: ignore[type-arg]
    """Stands for one guarded session's ownership in lineages: a weak reference to its guard, and
    a node of the lineage it was lent from.

    Compared by identity, never by referent: a guard owned anew (adopted) gets a new token, and
    contexts holding the old one must not borrow through it.

    A lineage is what the running context may borrow: a chain of tokens, newest first
    (``parent``), shared by the contexts copied from it. Each token is its own node (a separate
    node object was about 64 bytes and an object more for the collector per session). A context
    copied earlier keeps exactly what it could borrow then: a chain only ever loses tokens that
    can never be lent again (:meth:`still_lendable` turns false for good), dropped in place once
    a chain has grown to twice its live length (amortised O(1) per session, and never O(n)
    memory per guard), which changes nothing any context may borrow.
    """

    __slots__ = ("parent", "length", "rebuild_at")
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    parent: BorrowToken | None
    """The next older token of the lineage this one was lent from (None: the oldest)."""
    length: int
    """How many tokens the chain from this one holds (dead ones until they are dropped)."""
    rebuild_at: int
    """The length at which the next token lent here first drops the dead ones."""

    def still_lendable(self) -> bool:
        guard = self()
        return guard is not None and guard.token is self


def _tokens(head: BorrowToken | None) -> Iterator[BorrowToken]:
    node = head
    while node is not None:
        yield node
        node = node.parent


_MIN_REBUILD = 16

current_lineage: ContextVar[BorrowToken | None] = ContextVar("sessionscope.lineage", default=None)
"""The running context's lineage: its newest token (see :class:`BorrowToken`)."""
_cleaning_up: ContextVar[bool] = ContextVar("sessionscope.cleaning_up", default=False)


def _drop_dead(head: BorrowToken) -> BorrowToken | None:
    """Link the chain from ``head`` past the tokens that can no longer be lent; its newest live
    token (None: none left). Other chains through these tokens lose only those too."""
    live = [token for token in _tokens(head) if token.still_lendable()]
    rebuild_at = max(_MIN_REBUILD, 2 * len(live))
    parent: BorrowToken | None = None
    for length, token in enumerate(reversed(live), 1):
        token.parent, token.length, token.rebuild_at = parent, length, rebuild_at
        parent = token
    return parent


def lend_from_here(guard: Any) -> BorrowToken:
    """Let contexts copied from the running one from now on borrow ``guard``'s session."""
    token = BorrowToken(guard)
    head = current_lineage.get()
    if head is not None and head.length >= head.rebuild_at:
        head = _drop_dead(head)
    if head is None:
        token.parent, token.length, token.rebuild_at = None, 1, _MIN_REBUILD
    else:
        token.parent, token.length, token.rebuild_at = head, head.length + 1, head.rebuild_at
    current_lineage.set(token)
    return token


def inherits(token: BorrowToken | None) -> bool:
    """Whether the running context may borrow the session of ``token``."""
    node = current_lineage.get()
    while node is not None:
        if node is token:
            return True
        node = node.parent
    return False


def is_cleanup() -> bool:
    """True inside sessionscope's own closing of a session whose unit or scope has ended."""
    return _cleaning_up.get()


class _Cleanup:
    """``with cleanup():``, as a class: it runs for every session closed at a unit's end, and a
    generator-based context manager costs several times as much."""

    __slots__ = ("token",)

    def __enter__(self) -> None:
        self.token = _cleaning_up.set(True)

    def __exit__(self, *exc_info: object) -> None:
        try:  # noqa: SIM105 - (contextlib.suppress is a context manager more, on this path)
            _cleaning_up.reset(self.token)
        except ValueError:  # reset from another context (a killed greenlet)
            pass


def cleanup() -> contextlib.AbstractContextManager[None]:
    """Mark sessionscope's own end-of-unit (or misused scope) cleanup, which any unit may run."""
    return _Cleanup()
