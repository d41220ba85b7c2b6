"""Finding ORM objects inside plain values: arguments and results that cross units.

``fan_out`` ships the ORM objects among a unit's arguments and results, and the Celery serializer
does the same for task arguments and results. Both walk the same shapes: an ORM object itself,
or lists, tuples, sets and dict values holding them (nested). Anything else passes as it is, so a
value without ORM objects costs one type test per container element and is returned unchanged
(the same object, not a copy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from ._shipping import receive, ship

_CONTAINERS = (list, tuple, set, frozenset, dict)


class Shipped:
    """An ORM object on its way to another unit: what :func:`sessionscope.ship` made of it.

    A marker rather than the bare payload, so that a dict the application passes is never taken
    for an object, and so that sets of objects stay sets (the marker hashes by identity).
    """

    __slots__ = ("payload",)

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:  # Celery's prefork pool pickles decoded arguments
        return (Shipped, (self.payload,))


def is_orm_object(value: Any) -> bool:
    """Whether ``value`` is an instance of a mapped class (cheap: one attribute lookup, and for
    plain values no exception: fan_out asks it of every item and every result)."""
    return getattr(value, _STATE, None) is not None and not isinstance(value, type)


_STATE = "_sa_instance_state"  # what SQLAlchemy's instance_state() reads


def contains_orm(value: Any) -> bool:
    """Whether ``value`` is, or holds (in lists, tuples, sets, dict values), an ORM object."""
    if isinstance(value, _CONTAINERS):
        items = value.values() if isinstance(value, dict) else value
        return any(contains_orm(item) for item in items)
    return is_orm_object(value)


def replace_orm(value: Any, convert: Callable[[Any], Any]) -> Any:
    """``value`` with each ORM object in it replaced by ``convert(obj)``; unchanged if none."""
    if isinstance(value, _CONTAINERS):
        if not contains_orm(value):
            return value
        if isinstance(value, dict):
            return type(value)((k, replace_orm(v, convert)) for k, v in value.items())
        return type(value)(replace_orm(item, convert) for item in value)
    return convert(value) if is_orm_object(value) else value


def shipped(obj: Any) -> Shipped:
    """``obj`` on its way to another unit (see :func:`sessionscope.ship`)."""
    return Shipped(ship(obj))


def receive_shipped(session: Session, value: Any, *, populate_existing: bool = False) -> Any:
    """``value`` with each :class:`Shipped` in it received into ``session`` (a sync Session; an
    AsyncSession passes this to ``run_sync``)."""
    return replace_marked(
        value,
        Shipped,
        lambda marker: receive(session, marker.payload, populate_existing=populate_existing),
    )


def contains_marked(value: Any, marker: type) -> bool:
    """Whether ``value`` is, or holds (in lists, tuples, sets, dict values), a ``marker``."""
    if isinstance(value, marker):
        return True
    if isinstance(value, _CONTAINERS):
        items = value.values() if isinstance(value, dict) else value
        return any(contains_marked(item, marker) for item in items)
    return False


def replace_marked(value: Any, marker: type, convert: Callable[[Any], Any]) -> Any:
    """``value`` with each instance of ``marker`` in it replaced by ``convert(instance)``."""
    if isinstance(value, marker):
        return convert(value)
    if isinstance(value, _CONTAINERS):
        items = value.values() if isinstance(value, dict) else value
        if not any(isinstance(item, (marker, *_CONTAINERS)) for item in items):
            return value
        if isinstance(value, dict):
            return type(value)((k, replace_marked(v, marker, convert)) for k, v in value.items())
        return type(value)(replace_marked(item, marker, convert) for item in value)
    return value
