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
what it inherited) and adds the new session's, so their number stays that of live sessions.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any


class BorrowToken:
    """Stands for one guarded session's ownership in lineages (holding its guard weakly)."""

    __slots__ = ("guard_ref",)

    def __init__(self, guard: Any) -> None:
        self.guard_ref: Callable[[], Any] = weakref.ref(guard)

    def still_lendable(self) -> bool:
        guard = self.guard_ref()
        return guard is not None and guard.token is self


class Lineage:
    """What the running context may borrow: an immutable set of tokens."""

    __slots__ = ("tokens",)

    def __init__(self, tokens: frozenset[BorrowToken]) -> None:
        self.tokens = tokens


current_lineage: ContextVar[Lineage | None] = ContextVar("sessionscope.lineage", default=None)
_cleaning_up: ContextVar[bool] = ContextVar("sessionscope.cleaning_up", default=False)


def lend_from_here(guard: Any) -> tuple[BorrowToken, Lineage]:
    """Let contexts copied from the running one from now on borrow ``guard``'s session."""
    token = BorrowToken(guard)
    head = current_lineage.get()
    if head is None:
        tokens = frozenset((token,))
    else:
        kept = [old for old in head.tokens if old.still_lendable()]
        kept.append(token)
        tokens = frozenset(kept)
    lineage = Lineage(tokens)
    current_lineage.set(lineage)
    return token, lineage


def inherits(token: BorrowToken | None) -> bool:
    """Whether the running context may borrow the session of ``token``."""
    head = current_lineage.get()
    return head is not None and token in head.tokens


def is_cleanup() -> bool:
    """True inside sessionscope's own closing of a session whose unit or scope has ended."""
    return _cleaning_up.get()


@contextlib.contextmanager
def cleanup() -> Iterator[None]:
    """Mark sessionscope's own end-of-unit (or misused scope) cleanup, which any unit may run."""
    token = _cleaning_up.set(True)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # reset from another context (a killed greenlet)
            _cleaning_up.reset(token)
