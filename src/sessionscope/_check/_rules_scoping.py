"""SS101 and SS102: registries whose scope does not match the program's units.

SS101. SQLAlchemy's ``scoped_session`` keys sessions by ``threading.local()``. Every greenlet,
asyncio task or trio task of one thread gets the *same* session. It is reported when the module
creating it uses gevent, eventlet, greenlet, asyncio, trio or anyio (an import, or an ``async
def``), or when another scanned module that refers to the registry does: the check works on the
project, since the registry usually lives in ``db.py`` and the greenlets in ``app.py``. A
``scopefunc`` other than a thread identity (``threading.get_ident``...) is taken to know what it
does. gevent and eventlet alone do not count when the same module monkey-patches (``patch_all()``,
``eventlet.monkey_patch()``) at module level before creating the registry: ``threading.local``
is then greenlet-local. Patching in another module cannot be ordered from source, so it does not
excuse anything.

SS102. ``async_scoped_session(factory, scopefunc=current_task)`` keeps a session per task forever
unless ``await registry.remove()`` is called when each task ends: finished tasks' sessions (and
their connections) pile up. Reported when no ``<name>.remove()`` call on the registry's name is
found anywhere in the scanned project.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import partial

from . import _known
from ._findings import Finding
from ._module import SourceModule
from ._project import Project


def check_scoping(project: Project, module: SourceModule) -> Iterator[Finding]:
    removed = project.memo("removed", lambda: _removed_names(project))
    for node in module.nodes:
        if not isinstance(node, ast.Call):
            continue
        qualname = module.qualname(node.func)
        scopefunc = _scopefunc(node)
        if qualname in _known.SA_SCOPED_SESSION and (
            scopefunc is None or module.qualname(scopefunc) in _known.THREAD_SCOPEFUNCS
        ):
            reason = _concurrency(project, module, node)
            if reason is not None:
                yield Finding(
                    module.path,
                    node.lineno,
                    node.col_offset + 1,
                    "SS101",
                    "SQLAlchemy's scoped_session keeps one Session per OS thread "
                    f"(threading.local), but {reason}: all greenlets or tasks of a thread share "
                    "that Session, its transaction and its objects",
                    "use sessionscope.scoped_session (one session per thread, greenlet or task, "
                    "closed when the unit ends), or Session.scope() per request or job",
                )
        elif (
            qualname in _known.ASYNC_SCOPED_SESSIONS
            and scopefunc is not None
            and module.qualname(scopefunc) in _known.CURRENT_TASK
        ):
            name = _assigned_name(module, node)
            if name is not None and name[1] not in removed and name[0] not in removed:
                yield Finding(
                    module.path,
                    node.lineno,
                    node.col_offset + 1,
                    "SS102",
                    "async_scoped_session(scopefunc=current_task) keeps every task's "
                    "AsyncSession (and its connection) until remove() is called, and no "
                    "remove() on it was found: ended tasks' sessions are never closed",
                    "use sessionscope.async_scoped_session(factory) without scopefunc (each "
                    "task's session is closed when the task ends), or await "
                    f"{name[1] if name else 'the registry'}.remove() at the end of every task",
                )


def _scopefunc(call: ast.Call) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == "scopefunc":
            return keyword.value
    return call.args[1] if len(call.args) > 1 else None


def _concurrency(project: Project, module: SourceModule, call: ast.Call) -> str | None:
    """Why the registry's module (or one using it) runs units that share a thread, if it does."""
    reason = _module_concurrency(module, before=call.lineno)
    if reason is not None:
        return f"this module {reason}"
    name = _assigned_name(module, call)
    if name is None or name[0] is None:
        return None
    for other in project.modules:
        referenced = project.memo(f"referenced:{other.path}", partial(_referenced, other))
        if other is module or name[0] not in referenced:
            continue
        reason = _module_concurrency(other, before=None)
        if reason is not None:
            return f"{other.path}, which uses it, {reason}"
    return None


def _module_concurrency(module: SourceModule, before: int | None) -> str | None:
    patched = before is not None and any(
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Call)
        and module.qualname(stmt.value.func) in _known.MONKEY_PATCHES
        and stmt.lineno < before
        for stmt in module.tree.body
    )
    for library in _known.CONCURRENCY_MODULES:
        if patched and library in ("gevent", "eventlet"):
            continue
        imported = module.uses_module(library)
        if imported is not None:
            return f"uses {library} (line {imported.lineno})"
    for node in module.nodes:
        if isinstance(node, ast.AsyncFunctionDef):
            return f"runs asyncio tasks (async def {node.name}, line {node.lineno})"
    return None


def _assigned_name(module: SourceModule, call: ast.Call) -> tuple[str | None, str] | None:
    """(qualified name if bound at module level, plain name) of what ``call`` is assigned to."""
    for stmt in module.nodes:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is call:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    top = any(s is stmt for s in module.tree.body)
                    return (f"{module.name}.{target.id}" if top else None), target.id
                if isinstance(target, ast.Attribute):
                    return None, target.attr
    return None


def _referenced(module: SourceModule) -> set[str]:
    found: set[str] = set()
    for node in module.nodes:
        if isinstance(node, (ast.Name, ast.Attribute)):
            qualname = module.qualname(node)
            if qualname is not None:
                found.add(qualname)
    for qualname in module.aliases.values():
        found.add(qualname)
    return found


def _removed_names(project: Project) -> set[str]:
    """Plain and qualified names of everything ``.remove()`` is called on, project-wide."""
    removed: set[str] = set()
    for module in project.modules:
        for node in module.nodes:
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "remove"
            ):
                receiver = node.func.value
                if isinstance(receiver, ast.Name):
                    removed.add(receiver.id)
                elif isinstance(receiver, ast.Attribute):
                    removed.add(receiver.attr)
                qualname = module.qualname(receiver)
                if qualname is not None:
                    removed.add(qualname)
    return removed
