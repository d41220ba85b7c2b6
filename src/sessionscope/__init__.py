"""sessionscope: one SQLAlchemy Session per concurrent unit, enforced.

``scoped_session`` is a drop-in for SQLAlchemy's whose default scope is the unit actually running:
a thread, a greenlet (gevent, eventlet, raw), an asyncio task or a trio task. A unit never receives
another unit's implicit session, and its session is closed when it ends. ``Session.scope()`` gives a
block its own session that commits, rolls back and closes. ``async_scoped_session`` does the same
for AsyncSession, one per task.

Their sessions are guarded: used from another unit (or by two units at once) they raise
``CrossUnitError`` (``ConcurrentUseError``). ``guard()`` guards any session or sessionmaker;
``copy_to()``, ``hand_off()``/``adopt()`` and ``SharedSession`` are the ways to cross units;
``ship()``/``receive()`` move clean objects as JSON-safe data (to another process, too);
``fan_out()`` runs a function over many items, each in a unit and session of its own.
"""

from __future__ import annotations

from ._async_scoping import async_scoped_session
from ._copy import copy_to
from ._fan_out import fan_out
from ._guard import SharedSession, adopt, guard, hand_off
from ._scope import AsyncSessionScope, SessionScope
from ._scoping import scoped_session
from ._shipping import receive, ship
from ._units import ThreadUnit, Unit, current_unit, describe_unit
from ._work import UnitOfWork, unit_of_work
from .exc import (
    ConcurrentUseError,
    CrossUnitError,
    NotShippableError,
    ScopeEndedError,
    ShareNothingError,
    ShareNothingWarning,
    ShippedVersionError,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncSessionScope",
    "ConcurrentUseError",
    "CrossUnitError",
    "NotShippableError",
    "ScopeEndedError",
    "SessionScope",
    "ShareNothingError",
    "ShareNothingWarning",
    "ShippedVersionError",
    "SharedSession",
    "ThreadUnit",
    "Unit",
    "UnitOfWork",
    "adopt",
    "async_scoped_session",
    "copy_to",
    "current_unit",
    "describe_unit",
    "fan_out",
    "guard",
    "hand_off",
    "receive",
    "scoped_session",
    "ship",
    "unit_of_work",
]
