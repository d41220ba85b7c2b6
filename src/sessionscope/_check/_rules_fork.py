"""SS105: an engine that holds pooled connections when the process forks.

A forked child inherits the parent's pool, sockets included; parent and child then talk on one
connection and corrupt each other's conversations (SQLAlchemy: "Using Connection Pools with
Multiprocessing or os.fork()"). This rule is deliberately conservative. It reports an engine only
when all of these hold:

- it is created at module level with ``create_engine``/``create_async_engine``;
- it is *used at import*: a module-level statement (not in a function) connects
  (``engine.connect()``, ``begin()``, ``raw_connection()``, ``execute()``), hands the engine to
  ``create_all``/``drop_all``/``reflect``/``inspect``, or runs a query on a module-level session;
- the process forks after the import: ``os.fork()`` or a ``multiprocessing`` Process/Pool/
  ``ProcessPoolExecutor`` in the same module (unless it selects the "spawn" or "forkserver" start
  method), or ``preload_app = True`` in a scanned gunicorn config file;
- nothing disposes it: no ``<engine>.dispose(...)`` call anywhere in the module, no fork hook in
  the project that disposes something (``os.register_at_fork``, gunicorn ``post_fork`` or
  ``post_worker_init``, Celery ``worker_process_init``), and the module does not use sessionscope,
  whose registries give a forked child fresh pools themselves.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

from . import _known
from ._findings import Finding
from ._module import SourceModule
from ._project import Project

_CONNECTING_METHODS = frozenset({"connect", "begin", "raw_connection", "execute"})
_SCHEMA_CALLS = frozenset({"create_all", "drop_all", "reflect", "inspect", "has_table"})
_QUERY_METHODS = frozenset(
    {"execute", "scalars", "scalar", "get", "query", "commit", "flush", "connection", "merge"}
)
_HOOK_FUNCTIONS = frozenset({"post_fork", "post_worker_init", "child_init"})


def check_fork(project: Project, module: SourceModule) -> Iterator[Finding]:
    scope = project.scopes[module.path]
    engines = {name for name, kind in scope.kinds.items() if kind == "engine"}
    if (
        not engines
        or _uses_sessionscope(module)
        or project.memo("fork hook", lambda: _hooked(project))
    ):
        return
    fork = _fork_in(module) or project.memo("preload", lambda: _preload(project))
    if fork is None:
        return
    disposed = _disposed(module)
    sessions = {name for name, kind in scope.kinds.items() if kind == "session"}
    reported: set[str] = set()
    for node in _import_time_nodes(module):
        if not isinstance(node, ast.Call):
            continue
        engine = _connected_engine(node, engines, sessions)
        if engine is None or engine in disposed or engine in reported:
            continue
        reported.add(engine)
        yield Finding(
            module.path,
            node.lineno,
            node.col_offset + 1,
            "SS105",
            f"engine {engine!r} opens a pooled connection at import, before {fork}: the forked "
            "child inherits it, and parent and child talk on one connection",
            f"call {engine}.dispose(close=False) in the child (os.register_at_fork("
            "after_in_child=...), gunicorn post_fork, Celery worker_process_init), or do the "
            "import-time work in a function run after the fork; sessionscope's registries do "
            "this themselves for the engines they use",
        )


def _import_time_nodes(module: SourceModule) -> Iterator[ast.AST]:
    """The nodes a module runs at import: everything outside function and class bodies."""
    stack: list[ast.AST] = list(reversed(module.tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        yield node
        stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _connected_engine(node: ast.Call, engines: set[str], sessions: set[str]) -> str | None:
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        receiver = func.value.id
        if receiver in engines and func.attr in _CONNECTING_METHODS:
            return receiver
        if receiver in sessions and func.attr in _QUERY_METHODS:
            return _engine_argument(node, engines) or (
                next(iter(engines)) if len(engines) == 1 else None
            )
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in _SCHEMA_CALLS:
        return _engine_argument(node, engines)
    return None


def _engine_argument(call: ast.Call, engines: set[str]) -> str | None:
    for value in [*call.args, *(kw.value for kw in call.keywords)]:
        if isinstance(value, ast.Name) and value.id in engines:
            return value.id
    return None


def _fork_in(module: SourceModule) -> str | None:
    other_start = False
    fork: str | None = None
    for node in module.nodes:
        if not isinstance(node, ast.Call):
            continue
        qualname = module.qualname(node.func)
        if qualname in _known.START_METHOD_SETTERS and any(
            isinstance(arg, ast.Constant) and arg.value in ("spawn", "forkserver")
            for arg in node.args
        ):
            other_start = True
        elif fork is None and qualname in _known.FORKS:
            return f"{qualname}() at line {node.lineno}"
        elif fork is None and qualname in _known.PROCESS_STARTERS:
            fork = f"{qualname} at line {node.lineno} (the 'fork' start method)"
    return None if other_start else fork


def _preload(project: Project) -> str | None:
    for module in project.modules:
        for stmt in module.tree.body:
            if (
                isinstance(stmt, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "preload_app" for t in stmt.targets)
                and isinstance(stmt.value, ast.Constant)
                and stmt.value.value is True
            ):
                return f"gunicorn forks its workers (preload_app = True in {module.path})"
    return None


def _disposed(module: SourceModule) -> set[str]:
    return {
        node.func.value.id
        for node in module.nodes
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "dispose"
        and isinstance(node.func.value, ast.Name)
    }


def _uses_sessionscope(module: SourceModule) -> bool:
    return module.uses_module("sessionscope") is not None


def _hooked(project: Project) -> bool:
    """Whether some fork hook in the project disposes an engine (any: conservative)."""
    for module in project.modules:
        hooks: set[str] = set(_HOOK_FUNCTIONS)
        for node in module.nodes:
            if isinstance(node, ast.Call):
                qualname = module.qualname(node.func) or ""
                registering = qualname == "os.register_at_fork" or qualname.endswith(
                    "worker_process_init.connect"
                )
                if registering:
                    for value in [*node.args, *(kw.value for kw in node.keywords)]:
                        if isinstance(value, ast.Name):
                            hooks.add(value.id)
                        elif _calls_dispose(value):
                            return True
        for node in module.nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                decorated = any(
                    "worker_process_init" in ast.unparse(d) for d in node.decorator_list
                )
                if (node.name in hooks or decorated) and _calls_dispose(node):
                    return True
    return False


def _calls_dispose(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "dispose"
        for n in ast.walk(node)
    )
