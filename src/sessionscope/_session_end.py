"""How a session is let go of when nobody will use it again: closed, or at worst invalidated.

Used when a unit ends without ``remove()``. The point is that the connection goes back to the pool
through the front door (``close()`` rolls back and checks it in), never through the garbage
collector, which SQLAlchemy reports as "The garbage collector is trying to clean up non-checked-in
connection".
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

from ._guard._install import guard_of
from ._guard._lineage import cleanup

try:  # SQLAlchemy >= 2.0.22: a closed session can refuse further use
    from sqlalchemy.orm.session import _SessionCloseState

    _CLOSED: Any = _SessionCloseState.CLOSED
except ImportError:  # pragma: no cover
    _CLOSED = None


def close_at_unit_end(session: Any) -> None:
    """End-of-unit hook of the sync registry: close now, or as the borrower inside leaves."""
    guard = guard_of(session)
    if guard is None:
        close_quietly_or_invalidate(session)
    else:  # (one partial for both: no closure, and no frame of its own when called)
        close = functools.partial(close_quietly_or_invalidate, session)
        guard.end(close, close)


def close_quietly_or_invalidate(session: Any) -> None:
    """Close ``session``; if closing fails (a dead connection), invalidate it, then re-raise.

    A sealed session was closed already (its scope ended) and refuses any use since: closing it
    again would only cost a guarded call.
    """
    if is_sealed(session):
        return
    with cleanup():  # sessionscope's own cleanup may close a session from any unit
        try:
            session.close()
        except BaseException:
            invalidate = getattr(session, "invalidate", None)
            if invalidate is not None:
                with contextlib.suppress(Exception):  # the original error is the one to report
                    invalidate()
            raise


def seal(session: Any) -> None:
    """Make a closed session refuse further use, as ``Session(close_resets_only=False)`` does.

    Any later use then fails with SQLAlchemy's own "This Session has been permanently closed"
    instead of silently opening a new transaction behind a scope that has ended.
    """
    if _CLOSED is not None and hasattr(session, "_close_state"):
        session._close_state = _CLOSED


def is_sealed(session: Any) -> bool:
    """Whether a Session (or an AsyncSession's ``sync_session``) was closed for good."""
    return _CLOSED is not None and getattr(session, "_close_state", None) is _CLOSED


def needs_io_to_close(session: Any) -> bool:
    """Whether closing a sync ``session`` can reach the database: only in a transaction (a
    session in none holds no connection; closing it only clears its identity map)."""
    return not is_sealed(session) and bool(session.in_transaction())
