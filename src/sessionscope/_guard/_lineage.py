"""Which units inherited an owner's context: the legitimate borrowers of its sessions.

When a unit comes to own a guarded session it sets, in its own context, a context variable to a
lineage: the chain of sessions (their guards, or a :class:`BorrowToken` for a guard owned anew:
see ``sessionscope._lineage_node``) that work started from this context may borrow. Work that
the owner hands off *with its context* sees it: ``asyncio.to_thread``, the thread pools of
Starlette/FastAPI (anyio) and asgiref, the helper tasks of ``wait_for`` and ``shield`` on Python
3.10/3.11, children of ``gather`` and ``create_task``, and SQLAlchemy's own helper task in
``AsyncSession.__aexit__`` all run in a copy of the caller's context. A thread started by hand,
a gevent/eventlet greenlet or ``loop.run_in_executor`` starts from an empty context and does not
see it, so it is not a borrower.

A context copied *before* a session was made does not hold its link: a task created earlier that
receives the session through a queue is not a borrower of it. A lineage only ever grows at its
head, so what a copy may borrow never changes; a new link points to the old head (the owner's
other sessions, and what it inherited), and links that can never be lent again are dropped from
the chain as it grows, so its length stays proportional to that of live sessions. A guard that
is its own link costs it three slots (24 bytes); a token about 100 bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from .._lineage_node import ITSELF, BorrowToken, still_lendable

__all__ = ["ITSELF", "BorrowToken", "current_lineage", "inherits", "lend_from_here"]


Link = Any
"""A link of a lineage: a guard (its first ownership) or a :class:`BorrowToken` (see
``sessionscope._lineage_node``)."""


def _links(head: Link | None) -> Iterator[Link]:
    node = head
    while node is not None:
        yield node
        node = node.parent


_MIN_REBUILD = 16

current_lineage: ContextVar[Link | None] = ContextVar("sessionscope.lineage", default=None)
"""The running context's lineage: its newest link."""
_cleaning_up: ContextVar[bool] = ContextVar("sessionscope.cleaning_up", default=False)


def _drop_dead(head: Link) -> Link | None:
    """Link the chain from ``head`` past the links that can no longer be lent; its newest live
    link (None: none left). Other chains through these links lose only those too."""
    live = [link for link in _links(head) if still_lendable(link)]
    rebuild_at = max(_MIN_REBUILD, 2 * len(live))
    parent: Link | None = None
    for length, link in enumerate(reversed(live), 1):
        link.parent, link.length, link.rebuild_at = parent, length, rebuild_at
        parent = link
    return parent


def lend_from_here(guard: Any) -> Link:
    """Let contexts copied from the running one from now on borrow ``guard``'s session; the link
    to give the guard's ``token``: :data:`ITSELF` for its first ownership (the guard is its own
    link), else a new :class:`BorrowToken`. The caller sets it."""
    link: Link = guard if not guard.length else BorrowToken(guard)
    head = current_lineage.get()
    if head is not None and head.length >= head.rebuild_at:
        head = _drop_dead(head)
    if head is None:
        link.parent, link.length, link.rebuild_at = None, 1, _MIN_REBUILD
    else:
        link.parent, link.length, link.rebuild_at = head, head.length + 1, head.rebuild_at
    current_lineage.set(link)
    return ITSELF if link is guard else link


def inherits(guard: Any) -> bool:
    """Whether the running context may borrow the session of ``guard`` (by its current link)."""
    token = guard.token
    link = guard if token is ITSELF else token
    if link is None:
        return False
    node = current_lineage.get()
    while node is not None:
        if node is link:
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
