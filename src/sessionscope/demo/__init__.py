"""The demo behind ``python -m sessionscope demo``: what sharing one Session between units costs.

The same small workload (concurrent "requests", one of which fails and rolls back) runs under
threads, gevent greenlets and asyncio tasks, once with SQLAlchemy's ``scoped_session`` and once with
``sessionscope.scoped_session``, and the damage is measured: sessions shared, rows lost or
duplicated, errors, connections leaked.

The web section puts the same kind of load on real servers (gunicorn ``-k gevent --preload`` and
uvicorn) over HTTP, SQLAlchemy's registry behind a hand-written wrapper against sessionscope's
behind ``SessionScopeMiddleware``, and measures rows lost, failed requests' rows committed,
requests that saw other requests' objects, and errors.

Modules, one concept each: :mod:`.workload` (the request), :mod:`.runners` (one per concurrency
model), :mod:`.measure` (one run, measured), :mod:`.database` (where it writes), :mod:`.report`
(tables and words), :mod:`.cli` (options and exit code); for the web section :mod:`.web_app` (the
application the servers load), :mod:`.servers` (a server in a subprocess, shared with the test
suite), :mod:`.web` (the load, measured) and :mod:`.web_report` (its tables and words).
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
