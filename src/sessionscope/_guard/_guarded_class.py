"""The guarded variant of a Session class, which a guarded session is switched to.

A session is guarded by assigning ``session.__class__`` to a subclass of its own class (cached per
class) whose public methods first ask the session's :class:`SessionGuard`. A subclass rather than
events: SQLAlchemy has no event for ``add``, ``get`` or ``close``, and the check must run *before*
the call, not after. Only guarded sessions pay for it; the class keeps its name, module and
docstrings, so ``repr()`` and tracebacks read as before, and unguarding switches the class back.

Refreshes of expired attributes go through ``Session.execute``, so they are checked too. Lazy
loads are checked whole, around their loader (``_lazy_loads``), including a many-to-one answered
from the identity map (``Session._identity_lookup``), which is therefore not wrapped here: every
``get()`` calls it, and a wrapper inside a checked call is still a cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from ._checks import checked

GUARD_ATTRIBUTE = "_sessionscope_guard"
_CACHE_ATTRIBUTE = "_sessionscope_guarded_class"

GUARDED_METHODS = (
    "add",
    "add_all",
    "begin",
    "begin_nested",
    "bulk_insert_mappings",
    "bulk_save_objects",
    "bulk_update_mappings",
    "close",
    "commit",
    "connection",
    "delete",
    "delete_all",  # SQLAlchemy 2.1
    "enable_relationship_loading",
    "expire",
    "expire_all",
    "expunge",
    "expunge_all",
    "flush",
    "get",
    "get_one",
    "invalidate",
    "merge",
    "merge_all",  # SQLAlchemy 2.1
    "prepare",
    "query",
    "refresh",
    "reset",
    "rollback",
    "scalar",
    "__iter__",  # the session's pending and persistent objects, which change under its owner
)
"""Checked methods of a guarded session (``execute`` and ``scalars`` also guard their results)."""

F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", bound=Session)
T = TypeVar("T")


def checked_subclass(
    base: type[T], namespace_for: Callable[[type[T]], dict[str, Any]], cache_attribute: str
) -> type[T]:
    """The checked subclass of ``base`` (made once per class and kind), for class switching.

    It keeps the class's name, module and docstring, takes no attributes of its own
    (``__slots__ = ()``, so instances can switch to it and back), and remembers ``base``.
    """
    if is_guarded_class(base):
        return base
    cached: type[T] | None = base.__dict__.get(cache_attribute)
    if cached is not None:
        return cached
    namespace = namespace_for(base)
    namespace.update(
        __slots__=(),
        __module__=base.__module__,
        __qualname__=base.__qualname__,
        __doc__=base.__doc__,
        _sessionscope_unguarded_class=base,
    )
    guarded = type(base.__name__, (base,), namespace)
    setattr(base, cache_attribute, guarded)
    return guarded


def checked_methods(base: type, names: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    """``_checked`` versions of those of ``names`` that ``base`` has (``prefix``: for messages)."""
    return {
        name: checked(prefix + name, getattr(base, name))
        for name in names
        if callable(getattr(base, name, None))
    }


def guarded_class(base: type[S]) -> type[S]:
    """The guarded subclass of a Session class ``base`` (made once per class)."""
    cached: type[S] | None = base.__dict__.get(_CACHE_ATTRIBUTE)
    if cached is not None:  # every session but the first: no import machinery per session
        return cached
    from ._handles import session_namespace  # the handles module builds on this one

    return checked_subclass(base, session_namespace, _CACHE_ATTRIBUTE)


def is_guarded_class(cls: type) -> bool:
    return "_sessionscope_unguarded_class" in cls.__dict__


def unguarded_class(cls: type[S]) -> type[S]:
    base: type[S] = cls.__dict__.get("_sessionscope_unguarded_class", cls)
    return base
