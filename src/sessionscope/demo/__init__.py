"""The demo behind ``python -m sessionscope demo``: what sharing one Session between units costs.

The same small workload (concurrent "requests", one of which fails and rolls back) runs under
threads, gevent greenlets and asyncio tasks, once with SQLAlchemy's ``scoped_session`` and once with
``sessionscope.scoped_session``, and the damage is measured: sessions shared, rows lost or
duplicated, errors, connections leaked.

Modules, one concept each: :mod:`.workload` (the request), :mod:`.runners` (one per concurrency
model), :mod:`.measure` (one run, measured), :mod:`.database` (where it writes), :mod:`.report`
(tables and words), :mod:`.cli` (options and exit code).
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
