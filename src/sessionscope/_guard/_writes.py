"""Writes to mapped attributes of objects attached to a guarded session.

Lazy loads and expired-attribute refreshes reach the session and are checked there; a plain
write (``user.name = ...``, ``parent.children.append(child)``) does not, so SQLAlchemy's attribute
events ``set``, ``append`` and ``remove`` are listened to on every mapped attribute, once guarding
is first used. The listener costs one dict lookup for objects of unguarded sessions (keyed by
SQLAlchemy's ``session_id``) and nothing more for objects attached to no session.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.event.api import _event_key
from sqlalchemy.orm import Mapper
from sqlalchemy.orm.mapper import _all_registries

from ._ownership import SessionGuard

_guard_of_session_id: dict[int, weakref.KeyedRef[int, SessionGuard]] = {}
_installed = False
_install_lock = threading.Lock()


def _forget(ref: weakref.KeyedRef[int, SessionGuard]) -> None:
    if _guard_of_session_id.get(ref.key) is ref:
        del _guard_of_session_id[ref.key]


def register(session_id: int, guard: SessionGuard) -> None:
    """Check writes to objects attached to the session ``session_id`` with ``guard``."""
    if not _installed:
        _install()
    _guard_of_session_id[session_id] = weakref.KeyedRef(guard, _forget, session_id)


def unregister(session_id: int) -> None:
    _guard_of_session_id.pop(session_id, None)


_listeners: dict[str, Callable[..., Any]] = {}


def _listener_for(key: str) -> Callable[..., Any]:
    """The write listener of attributes named ``key`` (one function per name, so that
    ``event.contains`` recognises it; the name is the attribute's own, for messages: a backref's
    initiator carries the *other* side's key)."""
    listener = _listeners.get(key)
    if listener is not None:
        return listener

    def on_write(state: Any, value: Any, *_: Any, **__: Any) -> Any:
        """``set`` (state, value, old, initiator) / ``append``, ``remove`` (state, value, ...).

        Registered as SQLAlchemy registers its own raw listeners, so it returns ``value`` (the
        value to store) and accepts the collection events' ``key`` keyword.
        """
        session_id = state.session_id
        if session_id is not None:
            ref = _guard_of_session_id.get(session_id)
            if ref is not None:
                guard = ref()
                if guard is not None:
                    guard.check_write(key, state.class_)
        return value

    return _listeners.setdefault(key, on_write)


def _listen_to(mapper: Mapper[Any]) -> None:
    for key, attribute in mapper.class_manager.items():
        listener = _listener_for(key)
        if event.contains(attribute, "set", listener):
            continue
        names = ("set", "append", "remove") if attribute.impl.collection else ("set",)
        for name in names:
            # First in line, before SQLAlchemy's own backref and cascade listeners, so that a
            # refused write has changed nothing (no backref set, nothing cascaded into the
            # session). ``event.listen`` does not take ``insert`` for attribute events; this is
            # what it does for ``raw=True`` listeners, plus ``insert``.
            _event_key(attribute, name, listener).base_listen(insert=True)


def _on_mapper_configured(mapper: Mapper[Any], class_: type) -> None:
    _listen_to(mapper)


def _install() -> None:
    """Listen to mappers configured from now on, and to those configured already."""
    global _installed
    with _install_lock:
        if _installed:
            return
        event.listen(Mapper, "mapper_configured", _on_mapper_configured)
        for registry in _all_registries():
            for mapper in registry.mappers:
                if mapper.configured:
                    _listen_to(mapper)
        _installed = True
