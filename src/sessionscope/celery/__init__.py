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

from .._arguments import expect_flags, refuse
from .._expect_registry import expect_registry
from .._fan_out import CELERY_MARK, ship_committed
from .._orm_values import contains_orm, receive_shipped, replace_orm, shipped
from .._scoping import scoped_session
from .._work import unit_of_work
from ._serializer import RESULT_SERIALIZER, TASK_SERIALIZER, receive_results, register

__all__ = ["install"]

_MARK = CELERY_MARK
_lock = threading.Lock()


def _scoped_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The ``__call__`` of tasks ``install()`` covers (``self`` is the task)."""
    cls = type(self)
    call = cls.__sessionscope_call__
    if self.request.called_directly or self.name.startswith("celery."):
        # a plain function call runs in its caller's session; Celery's own tasks use none
        return call(self, *args, **kwargs)
    registry: scoped_session[Any] = getattr(cls, _MARK)
    commit: bool = cls.__sessionscope_commit__
    ships: bool = cls.__sessionscope_ships__
    eager = bool(self.request.is_eager)
    with unit_of_work(), registry.scope(new=True, commit=False) as session:
        if ships:
            args, kwargs = _arrived(session, (args, kwargs), eager)
        result = call(self, *args, **kwargs)
        if ships and contains_orm(result):
            result = _departing(session, result, commit)
        if commit:
            session.commit()
    if ships and eager:  # no message carries it: the caller receives it as from a result
        return receive_results(result)
    return result


def _arrived(session: Any, value: Any, eager: bool) -> Any:
    """Arguments with shipped objects received into the execution's own ``session``.

    In eager mode (``apply()``, ``task_always_eager``) no message carries the arguments: ORM
    objects are the caller's own, so they are copied the same way (shipped, then received).
    """
    if eager:
        value = replace_orm(value, shipped)
    return receive_shipped(session, value)


def _departing(session: Any, result: Any, commit: bool) -> Any:
    """A result's ORM objects shipped while the execution's session still holds their state.

    Shipped before the commit (after a flush) because a commit expires them; with
    ``commit=False`` an object the task flushed but did not commit is refused, as its row is
    rolled back.
    """
    if commit:
        session.flush()
        return replace_orm(result, shipped)
    return replace_orm(result, ship_committed)


def _scoped_class(
    base: type[Any], registry: scoped_session[Any], commit: bool, ships: bool
) -> type[Any]:
    """A subclass of the task class ``base`` whose executions run in a scope of ``registry``."""
    return type(
        base.__name__,
        (base,),
        {
            "__call__": _scoped_call,
            "__sessionscope_call__": base.__call__,
            "__sessionscope_commit__": commit,
            "__sessionscope_ships__": ships,
            _MARK: registry,
            "__module__": base.__module__,
            "__qualname__": getattr(base, "__qualname__", base.__name__),
        },
    )


def _cover(task: Any, registry: scoped_session[Any], commit: bool, ships: bool) -> None:
    """Give a registered task the scoped ``__call__`` (once; its class is swapped in place)."""
    cls = type(task)
    if cls.__dict__.get(_MARK) is not None or getattr(cls, _MARK, None) is registry:
        return
    task.__class__ = _scoped_class(cls, registry, commit, ships)
    task.__trace__ = None  # a tracer built before would call the old __call__


def install(
    celery_app: Any, session: Any, *, commit: bool = False, serializer: bool = True
) -> None:
    """Run every task execution of ``celery_app`` in its own scope of ``session``.

    :param celery_app: the ``celery.Celery`` application. Tasks registered already and tasks
        defined later (``@app.task``, ``app.Task`` subclasses) are covered; a task class derived
        from ``celery.Task`` directly and registered after the app is finalized is not.
    :param session: the application's ``sessionscope.scoped_session``; inside a task,
        ``session()`` and its proxies return the execution's own session.
    :param commit: ``True`` commits when the task returns (before its result is stored) and rolls
        back when it raises or retries; ``False`` (default) rolls back what the task did not
        commit itself.
    :param serializer: ``True`` (default) registers the ``sessionscope`` serializers and makes
        them the app's task and result serializers: kombu's JSON, plus ORM objects, which are
        shipped (``sessionscope.ship``) in arguments and results and arrive attached to the
        task's session (arguments) or the caller's current session (results). ``False`` leaves
        the app's serializers alone.
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
    expect_flags(call, commit=commit, serializer=serializer)

    with _lock:
        if serializer:
            _use_serializers(celery_app, session)
        base = celery_app.Task
        if getattr(base, _MARK, None) is not session:
            celery_app.Task = _scoped_class(base, session, commit, serializer)

        def cover_all(**_: Any) -> None:
            for task in list(celery_app.tasks.values()):
                if not task.name.startswith("celery."):  # Celery's own (chord unlock, ...)
                    _cover(task, session, commit, serializer)

        celery_app.on_after_finalize.connect(cover_all, weak=False)
        if celery_app.finalized:
            cover_all()


def _use_serializers(celery_app: Any, session: Any) -> None:
    """Register the serializers; the app sends with them and accepts them (and what it did)."""
    register(session)
    conf = celery_app.conf
    conf.task_serializer = TASK_SERIALIZER
    conf.result_serializer = RESULT_SERIALIZER
    accepted = list(conf.accept_content or ["json"])
    conf.accept_content = accepted + [
        name for name in (TASK_SERIALIZER, RESULT_SERIALIZER) if name not in accepted
    ]
    if conf.result_accept_content is not None:
        results = list(conf.result_accept_content)
        if RESULT_SERIALIZER not in results:
            conf.result_accept_content = [*results, RESULT_SERIALIZER]
