"""Thread-pool jobs a task waits for belong to its unit of work, also in unchanged programs.

FastAPI runs a sync dependency, the endpoint and the dependency's exit as three thread-pool jobs
(``anyio.to_thread.run_sync``) while the request's task waits. Each job runs in a copy of the
task's context; if the task never touched sessionscope before handing out its first job, nothing
ties the jobs together, each is a unit of work of its own, and the dependency's session would be
"crossed" by the endpoint (and closed when the first job ended). sessionscope's integrations mark
the request first; an audited program has none, so the audit marks it: before a task hands out a
job through ``anyio.to_thread.run_sync`` or ``asyncio.to_thread``, it gets its unit of work
(``current_or_new_work()``, what any sessionscope use in the task would do), and its jobs share
it, one after another. Jobs that run *concurrently* on one session are still caught by the guard.

``asyncio`` is imported already when the audit boots; ``anyio.to_thread`` usually is not, so it
is wrapped as it is imported (a finder that only answers for that one module name).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from .._work import current_or_new_work

_ANYIO = "anyio.to_thread"
_WRAPPED = "_sessionscope_audit_wrapped"


def _marking(run: Callable[..., Any]) -> Callable[..., Any]:
    """``run`` (an async function handing a job to a thread), the caller's work opened first."""
    if getattr(run, _WRAPPED, False):
        return run

    @functools.wraps(run)
    async def marked(*args: Any, **kw: Any) -> Any:
        current_or_new_work()
        return await run(*args, **kw)

    setattr(marked, _WRAPPED, True)
    return marked


def _wrap_anyio(module: ModuleType) -> None:
    module.run_sync = _marking(module.run_sync)  # type: ignore[attr-defined]


class _AnyioFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the real finders find ``anyio.to_thread``, then wraps its
    ``run_sync`` as soon as the module has run."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _ANYIO:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _WrappingLoader(spec.loader)
                return spec
        return None


class _WrappingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _wrap_anyio(module)


def mark_thread_pool_jobs() -> None:
    """Wrap ``asyncio.to_thread`` now and ``anyio.to_thread.run_sync`` now or when imported."""
    asyncio.to_thread = asyncio.threads.to_thread = _marking(asyncio.to_thread)
    module = sys.modules.get(_ANYIO)
    if module is not None:
        _wrap_anyio(module)
    elif not any(isinstance(finder, _AnyioFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnyioFinder())
