"""sessionscope's errors, in SQLAlchemy's style: what happened, why it matters, what to do.

All of them subclass :class:`sqlalchemy.exc.InvalidRequestError`, so code that already catches
SQLAlchemy's misuse errors catches these too. Each message ends with a pointer into
``docs/errors.md``, where the pattern behind it is explained.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm.exc import StaleDataError

DOCS = "docs/errors.md"


def background(anchor: str) -> str:
    return f"(Background on this error: sessionscope {DOCS}#{anchor})"


class ShareNothingError(sa_exc.InvalidRequestError):
    """A session, or an object attached to it, was used outside the unit that owns it.

    A Session and every object attached to it are proxies for one database connection, so the
    whole graph belongs to one concurrent unit at a time ("share nothing").
    """


class CrossUnitError(ShareNothingError):
    """A unit used (or ended) something that belongs to another unit."""


class ConcurrentUseError(ShareNothingError):
    """Two units were inside one session at the same time.

    Raised for the second unit before SQLAlchemy or the driver see its call, so the first unit's
    work and the connection are left as they were.
    """


class ShareNothingWarning(sa_exc.SAWarning):
    """What ``guard="warn"`` emits instead of raising a :class:`ShareNothingError`."""


class ScopeEndedError(sa_exc.ResourceClosedError):
    """The session of a ``Session.scope()`` block was asked for after the block ended."""


class NotShippableError(sa_exc.InvalidRequestError):
    """``ship()`` was given an object whose state is not its row's: pending, deleted or dirty.

    The receiver trusts shipped state as what the database holds, so only clean persistent
    objects (and values with an exact JSON form) can be shipped.
    """


class ShippedVersionError(StaleDataError, sa_exc.InvalidRequestError):
    """``receive(check_version=True)``: a shipped object's row changed (or went) after shipping.

    A :class:`sqlalchemy.orm.exc.StaleDataError`, as a version conflict at flush is (and an
    ``InvalidRequestError``, as every sessionscope error).
    """
