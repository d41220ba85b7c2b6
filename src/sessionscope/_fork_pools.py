"""Give a forked child empty connection pools for the engines sessionscope's sessions use.

A pool's idle connections are copies of the parent's sockets. A child that checks one out speaks
on the parent's connection: two processes interleave requests and read each other's replies
(``ResourceClosedError``, or another task's row). Forgetting the parent's *sessions*
(:mod:`sessionscope._fork`) is not enough, because the next session in the child checks a pooled
connection out again. SQLAlchemy's remedy is ``engine.dispose(close=False)`` in the child: a new,
empty pool, and the old one left alone, so nothing is said to the server on the parent's behalf (a
plain ``dispose()`` would close, that is end, the parent's connections). Prefork servers (Celery,
gunicorn ``--preload``) and ``multiprocessing`` fork where the application cannot easily call it,
so sessionscope calls it for every engine it has seen.

Which engines: those bound (``bind`` and ``binds``) to a session sessionscope guards or hands out
(registries, scopes, guarded sessionmakers, whatever the guard mode), and those in the ``kw`` of a
sessionmaker given to a registry or to ``guard()``. Engines are held weakly: being seen by
sessionscope never keeps one alive. Remembering is one ``WeakSet.add`` per engine of a new session.

The old pools are returned to :mod:`sessionscope._fork`, which keeps them for the life of the
process: if they were dropped, garbage collection of their connections could close a socket the
parent still uses. In-memory SQLite engines are skipped: their connection is no socket and no
file, the child's copy is its own, and an empty pool would give the child an empty database.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from . import _fork

log = logging.getLogger("sessionscope")

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _engine_of(bind: object) -> Engine | None:
    """The sync Engine behind a bind; None for what is not one (a custom bind, ``None``)."""
    if isinstance(bind, Engine):
        return bind
    if isinstance(bind, Connection):
        return bind.engine
    if isinstance(bind, (AsyncEngine, AsyncConnection)):
        return bind.sync_engine
    return None


def _remember(binds: Iterable[object]) -> None:
    for bind in binds:
        engine = _engine_of(bind)
        if engine is not None:
            _engines.add(engine)


def _binds_of(kw: Mapping[str, Any]) -> list[object]:
    """``bind`` and the values of ``binds`` in a Session's ``__dict__`` or a sessionmaker's kw.

    A Session keeps its per-mapper binds in ``binds`` (SQLAlchemy 2.1) or in the private
    ``_Session__binds`` (2.0); reading them does not run ``get_bind()``, which may be overridden.
    """
    per_key: Mapping[Any, object] | None = kw.get("binds") or kw.get("_Session__binds")
    found = [kw.get("bind")]
    if per_key:
        found.extend(per_key.values())
    return found


_last_bind: weakref.ref[Any] | None = None
"""The ``bind`` of the last session remembered that had no per-mapper binds (weakly)."""


def remember_session(session: Session) -> None:
    """Remember the engines a new session is bound to (called for every session sessionscope
    guards or makes; an AsyncSession is passed as its ``sync_session``).

    Sessions come from a few sessionmakers, so a session bound like the previous one (the same
    ``bind``, no per-mapper binds) was remembered already: one weak-reference call, no WeakSet.
    """
    global _last_bind
    # read as attributes, never through __dict__ (see _guard._checks.checked_assignment)
    bind = getattr(session, "bind", None)
    per_key = getattr(session, "binds", None)  # SQLAlchemy 2.1
    if per_key is None:
        per_key = getattr(session, "_Session__binds", None)  # 2.0
    if bind is not None and _last_bind is not None and _last_bind() is bind and not per_key:
        return
    binds = _binds_of({"bind": bind, "binds": per_key})
    _remember(binds)
    if len(binds) == 1 and bind is not None:
        try:
            _last_bind = weakref.ref(bind)
        except TypeError:  # a bind that takes no weak reference: no shortcut
            _last_bind = None


def remember_factory(factory: object) -> None:
    """Remember the engines a sessionmaker or async_sessionmaker is configured with.

    Done when a registry or ``guard()`` receives the maker, so an engine the parent uses directly
    (``engine.connect()`` before forking) is covered even before the first session is made. Other
    factories are left alone: their sessions are remembered as they are made.
    """
    if isinstance(factory, (sessionmaker, async_sessionmaker)):
        _remember(_binds_of(factory.kw))


def _in_memory_sqlite(engine: Engine) -> bool:
    if engine.dialect.name != "sqlite":
        return False
    database = engine.url.database or ""
    return not database or ":memory:" in database or engine.url.query.get("mode") == "memory"


def _drop_pools_after_fork() -> list[Any]:
    """In a forked child: give every remembered engine a new pool; return the old pools."""
    one_engine_per_pool = {id(engine.pool): engine for engine in list(_engines)}
    abandoned: list[Any] = []
    for engine in one_engine_per_pool.values():  # engine.execution_options() shares a pool
        if _in_memory_sqlite(engine):
            continue
        old_pool = engine.pool
        try:
            engine.dispose(close=False)
        except Exception:  # noqa: BLE001 - one engine's failure must not leave others shared
            log.warning("could not replace the pool of %r in a forked child", engine, exc_info=True)
        abandoned.append(old_pool)
    return abandoned


_fork.on_fork_in_child(_drop_pools_after_fork)
