"""The web benchmark's WSGI application (gunicorn ``gthread`` and ``gevent``), two variants.

    gunicorn --pythonpath benchmarks 'web_wsgi_app:create_app()'   # configured by BENCH_WEB_*

- ``sessionscope``: ``sessionscope.wsgi.SessionScopeMiddleware`` over a
  ``sessionscope.scoped_session(sessionmaker(engine))``; the endpoint uses ``Session()``.
- ``by-hand``: what people write without it: a plain ``Session`` from ``sessionmaker(engine)``
  opened per request, used, and closed in a ``finally``.
- ``registry``: the sessionscope variant's registry alone, with no middleware, unit of work or
  scope: ``Session()``, used, then ``Session.remove()`` in a ``finally`` (what the registry and
  its guard cost, apart from the request's boundary).
- ``imported``: ``by-hand`` in a process that also imported ``sessionscope`` and
  ``sessionscope.wsgi`` and made a ``scoped_session`` it never calls: a control for what merely
  importing sessionscope does to a process (its import-time hooks, its modules' memory).

``POST /work/{item_id}`` does :func:`_web_work.work` (SELECT by primary key, INSERT, commit) and
answers ``{"variant": ..., "item": ...}``; ``GET /health`` answers without touching the database.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from _web_work import BY_HAND, IMPORTED, REGISTRY, Config, work
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

WsgiApp = Callable[[dict[str, Any], Any], Iterable[bytes]]
HEALTH = b'{"ok": true}'


def respond(start_response: Any, status: str, payload: bytes) -> list[bytes]:
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    start_response(status, headers)
    return [payload]


def create_app() -> WsgiApp:
    """The gunicorn factory."""
    config = Config()
    engine = create_engine(config.url, **config.engine_options())
    variant, tag = config.variant, config.tag

    if variant in (BY_HAND, IMPORTED):
        if variant == IMPORTED:
            import sessionscope
            import sessionscope.wsgi  # noqa: F401 - (imported for its side effects, if any)

            unused = sessionscope.scoped_session(sessionmaker(engine), guard=config.guard)
            assert unused.registry is not None
        SessionLocal = sessionmaker(engine)

        def by_hand(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            path: str = environ["PATH_INFO"]
            if not path.startswith("/work/"):
                return respond(start_response, "200 OK", HEALTH)
            session = SessionLocal()
            try:
                body = work(session, int(path[6:]), tag)
            finally:
                session.close()
            return respond(start_response, "200 OK", json.dumps(body).encode())

        return by_hand

    import sessionscope
    from sessionscope.wsgi import SessionScopeMiddleware

    Scoped = sessionscope.scoped_session(sessionmaker(engine), guard=config.guard)

    if variant == REGISTRY:

        def registry_alone(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            path: str = environ["PATH_INFO"]
            if not path.startswith("/work/"):
                return respond(start_response, "200 OK", HEALTH)
            try:
                body = work(Scoped(), int(path[6:]), tag)
            finally:
                Scoped.remove()
            return respond(start_response, "200 OK", json.dumps(body).encode())

        return registry_alone

    def scoped(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path: str = environ["PATH_INFO"]
        if not path.startswith("/work/"):
            return respond(start_response, "200 OK", HEALTH)
        session: Session = Scoped()
        body = work(session, int(path[6:]), tag)
        return respond(start_response, "200 OK", json.dumps(body).encode())

    return SessionScopeMiddleware(scoped, Scoped)
