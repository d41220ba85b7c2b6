"""The ``sessionscope`` serializers: Celery's JSON, with ORM objects shipped.

Passing an ORM object to ``.delay()`` gets a ``TypeError`` from the JSON serializer, and with
pickle it arrives detached (``DetachedInstanceError``) or stale. These serializers are kombu's JSON
(the same output for everything JSON and kombu's JSON carry: datetimes, UUIDs, Decimals, bytes)
plus one shape: an ORM object becomes ``{"__sessionscope__": <what ship() makes of it>}``. No
pickle: a message can make the receiver build only objects of classes it has mapped.

Two names, because where a decoded object must arrive differs (docs/design.md, "Celery"):

- ``sessionscope`` (task messages): decoding happens before the task runs, in a process or
  thread where the task's session does not exist yet, so shipped objects decode to
  :class:`~sessionscope._orm_values.Shipped` markers, and the task's ``__call__`` receives them
  into the execution's own session (``sessionscope.celery``).
- ``sessionscope-result`` (results): decoded where ``AsyncResult.get()`` runs, so shipped objects
  are received at once into the current session of the registry given to ``install()``: the
  caller's own session.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from .._orm_values import Shipped, contains_marked, is_orm_object, receive_shipped
from .._shipping import ship

TASK_SERIALIZER = "sessionscope"
TASK_CONTENT_TYPE = "application/x-sessionscope+json"
RESULT_SERIALIZER = "sessionscope-result"
RESULT_CONTENT_TYPE = "application/x-sessionscope-result+json"
_KEY = "__sessionscope__"

_result_registry: Any = None
"""The registry whose current session results are received into (the last ``install()``'s)."""


def _kombu_json() -> Any:
    return importlib.import_module("kombu.utils.json")  # Celery's dependency; ships no type hints


def _encoder_class() -> type[json.JSONEncoder]:
    base: type[json.JSONEncoder] = _kombu_json().JSONEncoder

    class ShippingEncoder(base):  # type: ignore[valid-type,misc]
        """kombu's JSON encoder, which also ships ORM objects."""

        def default(self, o: Any) -> Any:
            if isinstance(o, Shipped):
                return {_KEY: o.payload}
            if is_orm_object(o):
                return {_KEY: ship(o)}
            return super().default(o)

    return ShippingEncoder


def _object_hook() -> Any:
    kombu_hook = _kombu_json().object_hook

    def hook(value: dict[str, Any]) -> Any:
        if len(value) == 1 and _KEY in value:
            return Shipped(value[_KEY])
        return kombu_hook(value)

    return hook


def register(registry: Any) -> None:
    """Register both serializers with kombu (again: harmless); results arrive in ``registry``."""
    global _result_registry
    _result_registry = registry
    kombu_json = _kombu_json()
    serialization: Any = importlib.import_module("kombu.serialization")
    encoder = _encoder_class()
    hook = _object_hook()

    def dumps(value: Any) -> str:
        text: str = kombu_json.dumps(value, cls=encoder)
        return text

    def loads_task(data: Any) -> Any:
        return kombu_json.loads(data, object_hook=hook)

    def loads_result(data: Any) -> Any:
        return receive_results(kombu_json.loads(data, object_hook=hook))

    serialization.register(TASK_SERIALIZER, dumps, loads_task, TASK_CONTENT_TYPE, "utf-8")
    serialization.register(RESULT_SERIALIZER, dumps, loads_result, RESULT_CONTENT_TYPE, "utf-8")


def receive_results(value: Any) -> Any:
    """``value`` with its shipped objects received into the current session of the registry."""
    registry = _result_registry
    if registry is None or not contains_marked(value, Shipped):
        return value
    return receive_shipped(registry(), value, populate_existing=True)
