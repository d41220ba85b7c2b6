"""sessionscope: one SQLAlchemy Session per concurrent unit, enforced.

``scoped_session`` is a drop-in for SQLAlchemy's whose default scope is the unit actually running:
a thread, a greenlet (gevent, eventlet, raw), an asyncio task or a trio task. A unit never receives
another unit's implicit session, and its session is closed when it ends. ``Session.scope()`` gives a
block its own session that commits, rolls back and closes. ``async_scoped_session`` does the same
for AsyncSession, one per task.
"""

from __future__ import annotations

from ._async_scoping import async_scoped_session
from ._copy import copy_to
from ._scope import AsyncSessionScope, SessionScope
from ._scoping import scoped_session
from ._units import ThreadUnit, Unit, current_unit, describe_unit
from .exc import CrossUnitError, ScopeEndedError, ShareNothingError

__version__ = "0.1.0"

__all__ = [
    "AsyncSessionScope",
    "CrossUnitError",
    "ScopeEndedError",
    "SessionScope",
    "ShareNothingError",
    "ThreadUnit",
    "Unit",
    "async_scoped_session",
    "copy_to",
    "current_unit",
    "describe_unit",
    "scoped_session",
]
