"""Which units inherited an owner's context: the legitimate borrowers of its sessions.

When a unit comes to own a guarded session it puts a :class:`Lineage` node at the head of a
context variable in its own context. Work that the owner hands off *with its context* sees that
node: ``asyncio.to_thread``, the thread pools of Starlette/FastAPI (anyio) and asgiref, the
helper tasks of ``wait_for`` and ``shield`` on Python 3.10/3.11, children of ``gather`` and
``create_task``, and SQLAlchemy's own helper task in ``AsyncSession.__aexit__`` all run in a copy
of the caller's context.
A thread started by hand, a gevent/eventlet greenlet or ``loop.run_in_executor`` starts from an
empty context and does not see it, so it is not a borrower.

Nodes hold their unit weakly: a task's context holding the task would make a reference cycle.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextvars import ContextVar

from .._units import Unit


class Lineage:
    """One owner in a context's chain of owners (innermost first)."""

    __slots__ = ("unit_ref", "parent")

    def __init__(self, unit: Unit, parent: Lineage | None) -> None:
        self.unit_ref = weakref.ref(unit)
        self.parent = parent


current_lineage: ContextVar[Lineage | None] = ContextVar("sessionscope.lineage", default=None)
_cleaning_up: ContextVar[bool] = ContextVar("sessionscope.cleaning_up", default=False)


def mark_owner(unit: Unit) -> Lineage:
    """The node that makes contexts copied from now on borrowers of ``unit`` (the current unit)."""
    head = current_lineage.get()
    if head is not None and head.unit_ref() is unit:
        return head
    node = Lineage(unit, head)
    current_lineage.set(node)
    return node


def inherits(node: Lineage | None) -> bool:
    """Whether the running context descends from the context where ``node`` was marked."""
    if node is None:
        return False
    current = current_lineage.get()
    while current is not None:
        if current is node:
            return True
        current = current.parent
    return False


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
