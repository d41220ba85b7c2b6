"""Writes to mapped attributes of objects attached to a guarded session.

Lazy loads and expired-attribute refreshes reach the session and are checked there; a plain
write (``user.name = ...``, ``del user.name``, ``parent.children.append(child)``, ``parent.children
= [...]``) does not, so SQLAlchemy's attribute events ``set``, ``remove``, ``append`` and
``bulk_replace`` are listened to on every mapped attribute, once guarding is first used. A listener
costs one dict lookup for objects of unguarded sessions (keyed by SQLAlchemy's ``session_id``) and
nothing more for objects attached to no session.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent
from sqlalchemy import event
from sqlalchemy.event.api import _event_key
from sqlalchemy.orm import Mapper
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.base import NO_VALUE, PASSIVE_NO_RESULT
from sqlalchemy.orm.mapper import _all_registries

from .. import _fork
from .._units._asyncio import _get_running_loop
from .._work import work_var
from . import _lazy_loads, _lineage
from ._lineage import BorrowToken
from ._ownership import SessionGuard, _nobody
from ._state import speedups

_guard_of_session_id: dict[int, BorrowToken] = {}
_installed = False
_install_lock = threading.Lock()
_modules = sys.modules


def register(session_id: int, token: BorrowToken) -> None:
    """Check writes to objects attached to the session ``session_id`` with the guard that
    ``token`` (its borrow token, a weak reference) refers to.

    The token was made with ``_lineage.on_guard_death`` as its callback: the entry goes with
    the guard, and no other weak reference is made per session.
    """
    if not _installed:
        _install()
    token.key = session_id
    _guard_of_session_id[session_id] = token


def _forget(token: BorrowToken) -> None:
    """A guard died: forget the session id registered under its token, if any."""
    session_id = getattr(token, "key", None)
    if session_id is not None and _guard_of_session_id.get(session_id) is token:
        del _guard_of_session_id[session_id]


_lineage.on_guard_death = _forget


def unregister(session_id: int) -> None:
    _guard_of_session_id.pop(session_id, None)


def _forget_owners_after_fork() -> list[Any]:
    """In a forked child no guard made before the fork may take its fast path (its owner's
    unit of work is a copy of the parent's); the slow path refuses them (``_fork.generation``)."""
    for ref in list(_guard_of_session_id.values()):
        guard = ref()
        if guard is not None:
            guard.owner_ref = guard.fast_key = _nobody
    return []


_fork.on_fork_in_child(_forget_owners_after_fork)


_listened: weakref.WeakKeyDictionary[type, set[str]] = weakref.WeakKeyDictionary()
"""Mapped class -> attribute names whose writes are checked already."""

_NO_PARENT = (None, NO_VALUE, PASSIVE_NO_RESULT)


def guard_of_state(state: Any) -> SessionGuard | None:
    """The guard of the session an object's state is attached to; None if none or unguarded."""
    session_id = state.session_id
    if session_id is not None:
        ref = _guard_of_session_id.get(session_id)
        if ref is not None:
            guard: SessionGuard | None = ref()
            return guard
    return None


def _check_in_python(state: Any, key: str, prefix: str = "") -> None:
    session_id = state.session_id
    if session_id is not None:
        ref = _guard_of_session_id.get(session_id)
        if ref is not None:
            guard = ref()
            if guard is None:
                return
            # SessionGuard.check_write()'s fast paths, inlined (writes are an ORM workload's most
            # frequent check): SQLAlchemy's own writes inside a call of the session (the
            # loaders' set_committed_value() too: no name is made), and the owner's writes in a
            # thread or greenlet while nobody is inside
            if guard.depth and getcurrent() is guard.entered:
                return
            work = work_var.get()
            if (
                work is not None
                and work is guard.fast_key()
                and guard.inside.get(0) is None
                and _get_running_loop() is None
                and "trio" not in _modules
            ):
                return
            guard.check_write(prefix + key, state.class_)


_check: Callable[..., None] = _check_in_python
"""``_check(state, key[, prefix])``, the check every listener below calls: the C module's
``check_write`` (the same, in C) when it is built, else ``_check_in_python``. ``prefix + key``
names the operation in a refusal."""
if speedups is not None:
    speedups.configure_writes(_guard_of_session_id)
    _check = speedups.check_write

_COMMITTED = "(set_committed_value)"


def _patch_set_committed_value() -> None:
    """``set_committed_value()`` writes an attribute and fires no event: check it at its impl.

    SQLAlchemy's loaders call it too, inside the session's own calls, where the check is one
    comparison; for objects of unguarded sessions it is one dict lookup.
    """
    for impl_class in vars(orm_attributes).values():
        if isinstance(impl_class, type) and "set_committed_value" in impl_class.__dict__:
            original = impl_class.__dict__["set_committed_value"]
            if getattr(original, "_sessionscope_checked", False):
                continue

            def checked(
                self: Any, state: Any, dict_: Any, value: Any, _original: Any = original
            ) -> Any:
                _check(state, self.key, _COMMITTED)
                return _original(self, state, dict_, value)

            checked._sessionscope_checked = True  # type: ignore[attr-defined]
            impl_class.set_committed_value = checked  # type: ignore[attr-defined]


def _listeners_for(key: str, impl: Any) -> dict[str, Callable[..., Any]]:
    """The raw listeners checking writes to one attribute, by event name.

    Registered as SQLAlchemy registers its own raw listeners: ``set`` and ``append`` return the
    value to store, and collection events pass a ``key`` keyword. SQLAlchemy clears the "has a
    parent" flag of an object being removed or replaced *before* running listeners (for
    delete-orphan); a refused write puts it back, so that it changes nothing.
    """

    def on_set(state: Any, value: Any, previous: Any, initiator: Any, **_: Any) -> Any:
        try:
            _check(state, key)
        except BaseException:
            if impl.trackparent and previous is not value and previous not in _NO_PARENT:
                impl.sethasparent(instance_state(previous), state, True)
            raise
        return value

    def on_remove(state: Any, value: Any, initiator: Any, **_: Any) -> None:
        try:
            _check(state, key)
        except BaseException:
            if impl.trackparent and value not in _NO_PARENT:
                impl.sethasparent(instance_state(value), state, True)
            raise

    def on_append(state: Any, value: Any, initiator: Any, **_: Any) -> Any:
        _check(state, key)
        return value

    def on_bulk_replace(state: Any, values: Any, initiator: Any, **_: Any) -> None:
        # before SQLAlchemy swaps in the new collection, which it does before append/remove
        _check(state, key)

    def on_modified(state: Any, initiator: Any, **_: Any) -> None:
        _check(state, key)  # flag_modified()

    listeners: dict[str, Callable[..., Any]] = {
        "set": on_set,
        "remove": on_remove,
        "modified": on_modified,
    }
    if impl.collection:
        listeners.update(append=on_append, bulk_replace=on_bulk_replace)
    return listeners


def _listen_to(mapper: Mapper[Any]) -> None:
    done = _listened.setdefault(mapper.class_, set())
    for key, attribute in mapper.class_manager.items():
        if key in done:
            continue
        done.add(key)
        _lazy_loads.wrap_attribute_loader(attribute.impl, guard_of_state)
        for name, listener in _listeners_for(key, attribute.impl).items():
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
        _patch_set_committed_value()
        _lazy_loads.install(guard_of_state)
        for registry in _all_registries():
            for mapper in registry.mappers:
                if mapper.configured:
                    _listen_to(mapper)
        _installed = True
