"""Calls that start another concurrent unit, and what they hand to it.

A ``Spawn`` names the new unit (for the message), the callable it will run (``target``: a module-
level session used in it is shared, SS103) and the values given to it (``handed``: a session or
ORM object among them crosses units, SS104). Recognised, by qualified name or by method name when
the receiver cannot be known from source (an executor, a loop, a task group, a Celery task):

- threads and processes: ``threading.Thread(target=, args=, kwargs=)``, ``threading.Timer``,
  ``multiprocessing.Process``;
- greenlets: ``gevent.spawn``/``spawn_later``/``spawn_raw``, ``gevent.Greenlet``,
  ``eventlet.spawn``/``spawn_n``/``spawn_after``, ``greenlet.greenlet``, ``<pool>.spawn(f, ...)``;
- tasks: ``asyncio.create_task(coro(...))``, ``<loop or task group>.create_task(coro(...))``,
  ``asyncio.ensure_future(coro(...))``, ``<nursery or task group>.start_soon(f, ...)``;
- executor jobs: ``<executor>.submit(f, ...)``, ``<loop>.run_in_executor(executor, f, ...)``,
  ``<pool>.apply_async(f, args)``;
- Celery tasks: ``<task>.delay(...)``, ``<task>.apply_async(args, kwargs)``.

``asyncio.to_thread`` (and anyio's ``to_thread.run_sync``) runs its function in a copy of the
caller's context while the caller waits: it is part of the caller's unit of work, so a value
handed to it does not cross units (its target still counts for SS103: concurrent callers share a
module-level session through it). ``asyncio.gather`` is not a hand-off either: it wraps coroutines
the caller already made.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

from ._module import SourceModule

_THREADS = {
    "threading.Thread": "thread",
    "threading.Timer": "thread",
    "multiprocessing.Process": "process",
    "multiprocessing.context.Process": "process",
}
_GREENLETS = {
    "gevent.spawn": 0,
    "gevent.spawn_raw": 0,
    "gevent.spawn_later": 1,
    "gevent.Greenlet": 0,
    "gevent.Greenlet.spawn": 0,
    "gevent.greenlet.Greenlet": 0,
    "eventlet.spawn": 0,
    "eventlet.spawn_n": 0,
    "eventlet.spawn_after": 1,
    "eventlet.greenthread.spawn": 0,
    "eventlet.greenthread.spawn_n": 0,
    "greenlet.greenlet": 0,
}  # qualified name -> index of the function among the positional arguments
_TASK_FACTORIES = {"asyncio.create_task", "asyncio.ensure_future"}
_IN_CONTEXT = {"asyncio.to_thread", "anyio.to_thread.run_sync"}


@dataclass
class Spawn:
    call: ast.Call
    unit: str  # "thread", "greenlet", "task", "executor job", "Celery task", "process"
    target: ast.expr | None
    handed: list[ast.expr] = field(default_factory=list)
    concurrent: bool = True  # False: the caller waits, in the same unit of work (to_thread)


def spawn_of(call: ast.Call, module: SourceModule) -> Spawn | None:
    qualname = module.qualname(call.func) or ""
    method = call.func.attr if isinstance(call.func, ast.Attribute) else None
    args, keywords = call.args, {kw.arg: kw.value for kw in call.keywords if kw.arg}
    extra = [kw.value for kw in call.keywords if kw.arg]
    if qualname in _THREADS:
        index = 1
        target = keywords.get("function" if qualname == "threading.Timer" else "target")
        if target is None and len(args) > index:
            target = args[index]
        handed = _elements(keywords.get("args")) + _values(keywords.get("kwargs"))
        return Spawn(call, _THREADS[qualname], target, handed)
    if qualname in _GREENLETS or method in ("spawn", "spawn_n"):
        index = _GREENLETS.get(qualname, 0)
        if len(args) <= index:
            return None
        return Spawn(call, "greenlet", args[index], [*args[index + 1 :], *extra])
    if qualname in _TASK_FACTORIES or method in ("create_task", "ensure_future"):
        if not args or not isinstance(args[0], ast.Call):
            return None
        coroutine = args[0]
        kw_values = [kw.value for kw in coroutine.keywords if kw.arg]
        return Spawn(call, "task", coroutine.func, [*coroutine.args, *kw_values])
    if method == "start_soon" and args:
        return Spawn(call, "task", args[0], list(args[1:]))
    if qualname in _IN_CONTEXT and args:
        return Spawn(call, "thread", args[0], [], concurrent=False)
    if method == "submit" and args:
        return Spawn(call, "executor job", args[0], [*args[1:], *extra])
    if method == "run_in_executor" and len(args) >= 2:
        return Spawn(call, "executor job", args[1], list(args[2:]))
    if method == "delay":
        return Spawn(call, "Celery task", None, [*args, *extra])
    if method == "apply_async":
        if args and isinstance(args[0], (ast.Tuple, ast.List)) or not args:
            first = args[0] if args else keywords.get("args")
            second = args[1] if len(args) > 1 else keywords.get("kwargs")
            return Spawn(call, "Celery task", None, _elements(first) + _values(second))
        second = args[1] if len(args) > 1 else keywords.get("args")  # multiprocessing Pool
        return Spawn(call, "executor job", args[0], _elements(second))
    return None


def _elements(node: ast.expr | None) -> list[ast.expr]:
    if isinstance(node, (ast.Tuple, ast.List)):
        return [e for e in node.elts if not isinstance(e, ast.Starred)]
    return []


def _values(node: ast.expr | None) -> list[ast.expr]:
    if isinstance(node, ast.Dict):
        return list(node.values)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        return [kw.value for kw in node.keywords if kw.arg]
    return []
