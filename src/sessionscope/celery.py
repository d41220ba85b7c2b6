"""Celery: every task execution in its own unit of work and session scope.

Celery's pools reuse their processes (prefork), threads (``threads``), greenlets (``gevent``,
``eventlet``) and the main thread (``solo``) for task after task, so none of them is the task. A
task that failed after flushing leaves its transaction open on a thread-keyed session, and the next
task on that thread commits it. :func:`install` marks the task instead:

- The task body runs *inside* ``with unit_of_work(): with session.scope(new=True):``, by a task
  class whose ``__call__`` wraps Celery's. Celery's tracer calls a custom ``__call__`` in the
  thread or greenlet that runs the task, under every pool, and ``apply()`` / ``task_always_eager``
  go through the same tracer: one mechanism everywhere. ``task_prerun``/``task_postrun`` signals
  cannot wrap a ``with``, and run after the result is stored: a commit failing there would leave a
  task reported successful whose write was lost.
- ``commit=True`` commits as the body returns, before Celery stores the result: a failed commit is
  the task's failure. A body that raises (``self.retry()`` raises ``Retry``) is rolled back;
  ``commit=False`` rolls back what the body did not commit itself.
- A task called as a plain function (``add(2, 2)``, or from another task's body) is no execution:
  it runs in its caller's session, as any function would.
- Prefork children: the engines of sessionscope's registries get fresh, empty pools in every
  forked child (``sessionscope._fork_pools``, at ``os.fork``), so no child speaks on a connection
  the parent opened before forking. Nothing Celery-specific is needed for that.

Celery is imported only when :func:`install` runs: the core never imports it.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from ._arguments import expect_flags, refuse
from ._expect_registry import expect_registry
from ._scoping import scoped_session
from ._work import unit_of_work

__all__ = ["install"]

_MARK = "__sessionscope_registry__"
_lock = threading.Lock()


def _scoped_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The ``__call__`` of tasks ``install()`` covers (``self`` is the task)."""
    call = type(self).__sessionscope_call__
    if self.request.called_directly or self.name.startswith("celery."):
        # a plain function call runs in its caller's session; Celery's own tasks use none
        return call(self, *args, **kwargs)
    registry: scoped_session[Any] = getattr(type(self), _MARK)
    commit: bool = type(self).__sessionscope_commit__
    with unit_of_work(), registry.scope(new=True, commit=False) as session:
        result = call(self, *args, **kwargs)
        if commit:
            session.commit()
        return result


def _scoped_class(base: type[Any], registry: scoped_session[Any], commit: bool) -> type[Any]:
    """A subclass of the task class ``base`` whose executions run in a scope of ``registry``."""
    return type(
        base.__name__,
        (base,),
        {
            "__call__": _scoped_call,
            "__sessionscope_call__": base.__call__,
            "__sessionscope_commit__": commit,
            _MARK: registry,
            "__module__": base.__module__,
            "__qualname__": getattr(base, "__qualname__", base.__name__),
        },
    )


def _cover(task: Any, registry: scoped_session[Any], commit: bool) -> None:
    """Give a registered task the scoped ``__call__`` (once; its class is swapped in place)."""
    cls = type(task)
    if cls.__dict__.get(_MARK) is not None or getattr(cls, _MARK, None) is registry:
        return
    task.__class__ = _scoped_class(cls, registry, commit)
    task.__trace__ = None  # a tracer built before would call the old __call__


def install(celery_app: Any, session: Any, *, commit: bool = False) -> None:
    """Run every task execution of ``celery_app`` in its own scope of ``session``.

    :param celery_app: the ``celery.Celery`` application. Tasks registered already and tasks
        defined later (``@app.task``, ``app.Task`` subclasses) are covered; a task class derived
        from ``celery.Task`` directly and registered after the app is finalized is not.
    :param session: the application's ``sessionscope.scoped_session``; inside a task,
        ``session()`` and its proxies return the execution's own session.
    :param commit: ``True`` commits when the task returns (before its result is stored) and rolls
        back when it raises or retries; ``False`` (default) rolls back what the task did not
        commit itself.
    """
    call = "sessionscope.celery.install()"
    try:
        celery_base: Any = importlib.import_module("celery.app.base")  # ships no type hints
    except ImportError as error:  # pragma: no cover - the extra is missing
        raise ImportError(
            "sessionscope.celery needs Celery: pip install 'sessionscope[celery]'"
        ) from error
    if not isinstance(celery_app, celery_base.Celery):
        refuse(TypeError, call, "celery_app", celery_app, "a Celery app")
    expect_registry(call, session, synchronous="Celery tasks are", reusers="Celery pools")
    expect_flags(call, commit=commit)

    with _lock:
        base = celery_app.Task
        if getattr(base, _MARK, None) is not session:
            celery_app.Task = _scoped_class(base, session, commit)

        def cover_all(**_: Any) -> None:
            for task in list(celery_app.tasks.values()):
                if not task.name.startswith("celery."):  # Celery's own (chord unlock, ...)
                    _cover(task, session, commit)

        celery_app.on_after_finalize.connect(cover_all, weak=False)
        if celery_app.finalized:
            cover_all()
