"""Writes to mapped attributes of objects attached to a guarded session.

Lazy loads and expired-attribute refreshes reach the session and are checked there; a plain
write (``user.name = ...``, ``del user.name``, ``parent.children.append(child)``, ``parent.children
= [...]``) does not, so the methods of SQLAlchemy's attribute implementations that write are
checked, once guarding is first used (see :func:`_patch_writing_methods`), and so is the
``modified`` event of every mapped attribute (``flag_modified()``). A check finds the object's
session by its ``session_id`` in SQLAlchemy's own registry of sessions (a dict lookup and a weak
reference), and its guard as its attribute; for objects of unguarded sessions that is all, for
objects attached to no session nothing.
"""

from __future__ import annotations

import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from greenlet import getcurrent
from sqlalchemy import event
from sqlalchemy.event.api import _event_key
from sqlalchemy.orm import Mapper
from sqlalchemy.orm import attributes as orm_attributes
from sqlalchemy.orm import dynamic as orm_dynamic
from sqlalchemy.orm import writeonly as orm_writeonly
from sqlalchemy.orm.mapper import _all_registries

from .. import _fork
from .._units._asyncio import _get_running_loop
from .._work import work_var
from . import _lazy_loads
from ._guarded_class import GUARD_ATTRIBUTE
from ._ownership import SessionGuard, _live_session_refs, _nobody
from ._state import INSIDE, speedups

_installed = False
_install_lock = threading.Lock()
_modules = sys.modules


def register() -> None:
    """A session is being guarded: check writes from now on (installed once).

    A written object's session is found in SQLAlchemy's own registry of sessions by id
    (:data:`_live_session_refs`), and its guard as its attribute: no table of sessionscope's own,
    whose entry per guarded session (about 45 bytes) and whose clean-up on a guard's death (a
    callback on its borrow token) every unit of work paid.
    """
    if not _installed:
        _install()


def _forget_owners_after_fork() -> list[Any]:
    """In a forked child no guard made before the fork may take its fast path (its owner's
    unit of work is a copy of the parent's); the slow path refuses them (``_fork.generation``)."""
    for ref in list(_live_session_refs.values()):
        guard = _guard_of_session(ref())
        if guard is not None:
            guard.owner_ref = guard.fast_key = _nobody
    return []


_fork.on_fork_in_child(_forget_owners_after_fork)


_listened: weakref.WeakKeyDictionary[type, set[str]] = weakref.WeakKeyDictionary()
"""Mapped class -> attribute names whose writes are checked already."""


def _guard_of_session(session: Any) -> SessionGuard | None:
    """A live session's guard, if it is guarded (a guarded class has the attribute: None until
    its guard is set; an unguarded session's class has none)."""
    guard: SessionGuard | None = getattr(session, GUARD_ATTRIBUTE, None)
    return guard


def guard_of_state(state: Any) -> SessionGuard | None:
    """The guard of the session an object's state is attached to; None if none or unguarded."""
    session_id = state.session_id
    if session_id is not None:
        ref = _live_session_refs.get(session_id)
        if ref is not None:
            return _guard_of_session(ref())
    return None


def _check_in_python(state: Any, key: str, prefix: str = "") -> None:
    session_id = state.session_id
    if session_id is not None:
        ref = _live_session_refs.get(session_id)
        if ref is not None:
            guard = _guard_of_session(ref())
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
                and INSIDE.get(guard) is None
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
    speedups.configure_writes(_live_session_refs)
    _check = speedups.check_write

_COMMITTED = "(set_committed_value)"
_WRITING_METHODS = {
    "set": "",
    "delete": "",
    "fire_append_event": "",
    "fire_remove_event": "",
    "fire_pre_remove_event": "",
    "set_committed_value": _COMMITTED,
}
"""The methods of SQLAlchemy's attribute implementations that write (and the prefix naming the
operation in a refusal): every write to a mapped attribute reaches one of them first."""


def _write_checked(method: Callable[..., Any], prefix: str) -> Callable[..., Any]:
    """``method(impl, state, ...)``, after ``_check(state, impl.key, prefix)``."""
    if speedups is not None:
        wrapper = speedups.CheckedMethod(prefix, method, speedups.KIND_WRITE)
        functools.update_wrapper(wrapper, method)
        return wrapper  # type: ignore[no-any-return]

    @functools.wraps(method)
    def checked(self: Any, state: Any, *args: Any, **kw: Any) -> Any:
        _check(state, self.key, prefix)
        return method(self, state, *args, **kw)

    return checked


def _impl_classes() -> Iterator[type]:
    names = vars(orm_attributes)  # SQLAlchemy 2.1 names the base _AttributeImpl, 2.0 AttributeImpl
    base: type = names.get("_AttributeImpl") or names["AttributeImpl"]
    for module in (orm_attributes, orm_writeonly, orm_dynamic):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, base):
                yield value


def _patch_writing_methods() -> None:
    """Check writes where SQLAlchemy's attribute implementations make them.

    ``obj.attr = value``, ``del obj.attr``, a collection's append/remove (by the application or
    a backref) and ``parent.children = [...]`` all reach an implementation's ``set``,
    ``delete`` or ``fire_*_event`` before anything changes; ``set_committed_value()`` (which
    SQLAlchemy's loaders call too, inside the session's own calls) fires no event at all. Checked
    here, once per class, a write to an object of no session costs one attribute read, one of an
    unguarded session one dict lookup. (Attribute events would do, but any listener makes every
    write of every object in the process run SQLAlchemy's event loop in Python: about twice as
    slow as without, guarded or not.)
    """
    for impl_class in set(_impl_classes()):
        for name, prefix in _WRITING_METHODS.items():
            original = impl_class.__dict__.get(name)
            if original is None or getattr(original, "_sessionscope_checked", False):
                continue
            checked = _write_checked(original, prefix)
            checked._sessionscope_checked = True  # type: ignore[attr-defined]
            setattr(impl_class, name, checked)


def _on_modified(key: str) -> Callable[..., None]:
    """The raw listener checking ``flag_modified()`` of one attribute (it fires an event only)."""

    def on_modified(state: Any, initiator: Any, **_: Any) -> None:
        _check(state, key)

    return on_modified


def _listen_to(mapper: Mapper[Any]) -> None:
    done = _listened.setdefault(mapper.class_, set())
    for key, attribute in mapper.class_manager.items():
        if key in done:
            continue
        done.add(key)
        _lazy_loads.wrap_attribute_loader(attribute.impl, guard_of_state)
        # First in line, before any other listener, as a raw listener (``event.listen`` does not
        # take ``insert`` for attribute events; this is what it does for ``raw=True``, plus it).
        _event_key(attribute, "modified", _on_modified(key)).base_listen(insert=True)


def _on_mapper_configured(mapper: Mapper[Any], class_: type) -> None:
    _listen_to(mapper)


def _install() -> None:
    """Listen to mappers configured from now on, and to those configured already."""
    global _installed
    with _install_lock:
        if _installed:
            return
        event.listen(Mapper, "mapper_configured", _on_mapper_configured)
        _patch_writing_methods()
        _lazy_loads.install(guard_of_state)
        for registry in _all_registries():
            for mapper in registry.mappers:
                if mapper.configured:
                    _listen_to(mapper)
        _installed = True
