"""Which units inherited an owner's context: the legitimate borrowers of its sessions.

When a unit comes to own a guarded session it sets, in its own context, a context variable to a
:class:`Lineage`: the set of sessions (their :class:`BorrowToken`) that work started from this
context may borrow. Work that the owner hands off *with its context* sees it:
``asyncio.to_thread``, the thread pools of Starlette/FastAPI (anyio) and asgiref, the helper tasks
of ``wait_for`` and ``shield`` on Python 3.10/3.11, children of ``gather`` and ``create_task``, and
SQLAlchemy's own helper task in ``AsyncSession.__aexit__`` all run in a copy of the caller's
context. A thread started by hand, a gevent/eventlet greenlet or ``loop.run_in_executor`` starts
from an empty context and does not see it, so it is not a borrower.

A context copied *before* a session was made does not hold its token: a task created earlier that
receives the session through a queue is not a borrower of it. Lineages are immutable, so copies
never change; a new one keeps the still-lendable tokens of the old (the owner's other sessions, and
what it inherited) and adds the new session's, so their number stays that of live sessions. A node
and its token take about 130 bytes.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any


class BorrowToken(weakref.ref):  # type: ignore[type-arg]
    """Stands for one guarded session's ownership in lineages: a weak reference to its guard.

    Compared by identity, never by referent: a guard owned anew (adopted) gets a new token, and
    contexts holding the old one must not borrow through it.
    """

    __slots__ = ("key",)
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    key: int
    """Set for the token a session was registered under for write checks (its session id)."""

    def still_lendable(self) -> bool:
        guard = self()
        return guard is not None and guard.token is self


class Lineage:
    """What the running context may borrow: a chain of tokens, newest first, shared by copies.

    Immutable, so a context copied earlier keeps exactly what it could borrow then. A session made
    costs one node; dead tokens are dropped by rebuilding the chain once it has grown to twice its
    live length (amortised O(1) per session, and never O(n) memory per guard).
    """

    __slots__ = ("token", "parent", "length", "rebuild_at")

    def __init__(
        self, token: BorrowToken, parent: Lineage | None, rebuild_at: int, length: int = 0
    ) -> None:
        """``length``: the chain's, when the caller knows it (else counted from ``parent``)."""
        self.token = token
        self.parent = parent
        self.length: int = length or (parent.length + 1 if parent is not None else 1)
        self.rebuild_at = rebuild_at

    def tokens(self) -> Iterator[BorrowToken]:
        node: Lineage | None = self
        while node is not None:
            yield node.token
            node = node.parent


_MIN_REBUILD = 16

current_lineage: ContextVar[Lineage | None] = ContextVar("sessionscope.lineage", default=None)
_cleaning_up: ContextVar[bool] = ContextVar("sessionscope.cleaning_up", default=False)


def _live_chain(head: Lineage) -> Lineage | None:
    live = [token for token in head.tokens() if token.still_lendable()]
    rebuild_at = max(_MIN_REBUILD, 2 * len(live))
    chain: Lineage | None = None
    for token in reversed(live):
        chain = Lineage(token, chain, rebuild_at)
    return chain


def _nothing(token: BorrowToken) -> None:
    return None


on_guard_death: Callable[[BorrowToken], None] = _nothing
"""Called with a token whose guard died (``_writes`` forgets the session id it registered)."""


def lend_from_here(guard: Any) -> BorrowToken:
    """Let contexts copied from the running one from now on borrow ``guard``'s session."""
    token = BorrowToken(guard, on_guard_death)
    head = current_lineage.get()
    if head is not None and head.length >= head.rebuild_at:
        head = _live_chain(head)
    if head is None:
        current_lineage.set(Lineage(token, None, _MIN_REBUILD, 1))
    else:
        current_lineage.set(Lineage(token, head, head.rebuild_at, head.length + 1))
    return token


def inherits(token: BorrowToken | None) -> bool:
    """Whether the running context may borrow the session of ``token``."""
    node = current_lineage.get()
    while node is not None:
        if node.token is token:
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
