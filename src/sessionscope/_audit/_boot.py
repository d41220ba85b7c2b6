"""What runs at the start of every audited process: each new Session and AsyncSession guarded.

The program is not changed, so its sessions cannot be handed to ``sessionscope.guard()`` by
anyone: instead ``Session.__init__`` and ``AsyncSession.__init__`` are wrapped, once, and every
session is guarded as it is made (owned by the unit of work that made it), whatever made it:
``Session(engine)``, a ``sessionmaker``, SQLAlchemy's ``scoped_session``, Flask-SQLAlchemy's
subclass, a FastAPI dependency. The guard's existing checks then fire; its one hook
(``_guard._ownership.violation_sink``) hands each violation to :func:`_record`, which writes it
down (``_records``) and, in ``"raise"`` mode, raises the guard's error in the program.

Thread-pool jobs a task hands out (``anyio.to_thread``, ``asyncio.to_thread``: FastAPI's sync
dependencies and endpoints) join the task's unit of work, as sessionscope's integrations arrange
(``_thread_pools``).

An AsyncSession makes its ``sync_session`` inside its own ``__init__``: that inner Session is
left to the AsyncSession's wrapper (a context variable says so), so the guard is labelled
``AsyncSession`` and closes it on its loop when its unit ends, as ``guard()`` would.

``python -m sessionscope audit`` starts it through a ``sitecustomize`` module
(:func:`start_from_environment`); the pytest plugin calls :func:`start` itself.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .._guard import _ownership
from .._guard._install import install
from .._guard._ownership import Mode, SessionGuard, _as_unit, _describe_inside
from .._guard._state import INSIDE
from .._units import current_unit, describe_unit
from ..exc import ShareNothingError
from ._records import Record, Recorder
from ._sites import application_site
from ._thread_pools import mark_thread_pool_jobs

MODE_VARIABLE = "SESSIONSCOPE_AUDIT"
DIRECTORY_VARIABLE = "SESSIONSCOPE_AUDIT_DIR"

recorder: Recorder | None = None
"""This process's records once the audit started (the pytest plugin reads ``records``)."""
_mode: Mode = "warn"
_making_async: ContextVar[bool] = ContextVar("sessionscope.audit.async_init", default=False)


def start(mode: Mode, directory: str | None = None) -> Recorder:
    """Guard every session made from now on in ``mode``; record violations (in ``directory``)."""
    global recorder, _mode
    _mode = mode
    if recorder is None:
        recorder = Recorder(directory)
        _wrap_constructors()
        mark_thread_pool_jobs()
    _ownership.violation_sink = _record
    return recorder


def start_from_environment() -> None:
    """Start as the ``audit`` command asked through the environment (a no-op if it did not)."""
    mode = os.environ.get(MODE_VARIABLE)
    if mode in ("warn", "raise"):
        start(mode, os.environ.get(DIRECTORY_VARIABLE) or None)  # type: ignore[arg-type]


def _wrap_constructors() -> None:
    session_init: Callable[..., None] = Session.__init__
    async_init: Callable[..., None] = AsyncSession.__init__

    @functools.wraps(session_init)
    def guarded_session_init(self: Session, *args: Any, **kw: Any) -> None:
        session_init(self, *args, **kw)
        if not _making_async.get():
            install(self, _mode, site=application_site())

    @functools.wraps(async_init)
    def guarded_async_session_init(self: AsyncSession, *args: Any, **kw: Any) -> None:
        token = _making_async.set(True)
        try:
            async_init(self, *args, **kw)
        finally:
            _making_async.reset(token)
        install(self, _mode, site=application_site())

    Session.__init__ = guarded_session_init  # type: ignore[method-assign]
    AsyncSession.__init__ = guarded_async_session_init  # type: ignore[method-assign]


def _record(guard: SessionGuard, kind: str, error: ShareNothingError | None) -> None:
    """The guard's violation sink: write the violation down; raise it in ``"raise"`` mode."""
    if recorder is None:
        return
    if kind == "left-open":
        record = _left_open(guard)
        if record is not None:
            recorder.add(record)
        return
    if kind == "concurrent":
        owner = _describe_inside(guard, _as_unit(INSIDE.get(guard)))
    elif kind == "forked":
        owner = f"a unit of the parent process (pid {os.getppid()})"
    else:
        work = guard.owner_ref()
        owner = work.describe() if work is not None else f"nobody (the session was {guard.state})"
    recorder.add(
        _new_record(
            guard,
            kind,
            owner=owner,
            offender=describe_unit(current_unit()),
            crossed_at=application_site(),
            message=str(error),
        )
    )
    if guard.mode == "raise" and error is not None:
        raise error


def _left_open(guard: SessionGuard) -> Record | None:
    """A session whose owner's unit ended while it was still in a transaction, or None."""
    session = guard.session_ref()
    if session is None or not session.in_transaction():
        return None
    work = guard.owner_ref()
    owner = work.describe() if work is not None else "its unit"
    return _new_record(
        guard,
        "left-open",
        owner=owner,
        offender=None,
        crossed_at=None,
        message=(
            f"{guard.label} was still in a transaction when {owner} ended: it was never "
            "committed, rolled back or closed there. sessionscope closed it (rolled back)."
        ),
    )


def _new_record(
    guard: SessionGuard,
    kind: str,
    *,
    owner: str,
    offender: str | None,
    crossed_at: Any,
    message: str,
) -> Record:
    return {
        "kind": kind,
        "label": guard.label,
        "created_at": None if guard.created_at is None else list(guard.created_at),
        "crossed_at": None if crossed_at is None else list(crossed_at),
        "owner": owner,
        "offender": offender,
        "message": message,
        "pid": os.getpid(),
    }
