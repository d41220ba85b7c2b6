"""What a sync Session holds, read from its private state (as SQLAlchemy 2.0 and 2.1 keep it).

Kept apart from ``_session_end`` (which imports the guard) so that the guard can ask it too.
"""

from __future__ import annotations

from typing import Any

REMOVED_ATTRIBUTE = "_sessionscope_removed"
"""Set True on a session once ``remove()`` has closed it (``UnitRegistry.close_implicit``); see
:func:`closed_already`."""


def closed_already(session: Any) -> bool:
    """Whether ``close()`` would only repeat itself on a sync ``session``: ``remove()`` closed
    it, and it has held nothing since (no transaction, so no connection; no object to detach).

    The unit that made a session still owns it after ``remove()`` (it may use it again), so its
    end closes what it owns; closing a removed session a second time replaces an empty identity
    map by another, and makes SQLAlchemy build the session's event dispatcher to detach nobody:
    about 29,000 of the 206,000 CPU instructions of an asyncio unit that calls ``remove()``
    (CPython 3.11, ``benchmarks/unit_instructions.py``). A session that was never
    closed is closed, empty or not: ``close()`` is what a Session subclass hooks, and what makes
    a ``close_resets_only=False`` session refuse further use.
    """
    return (
        session._transaction is None
        and not session._new
        and not session._deleted
        and not session.identity_map
        and getattr(session, REMOVED_ATTRIBUTE, False)
    )
