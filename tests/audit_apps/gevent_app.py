"""A WSGI application for gunicorn ``-k gevent``: ``tests.audit_apps.gevent_app:app``.

Configured by environment variables: ``AUDIT_APP_VARIANT`` (``planted`` or ``clean``) and
``AUDIT_APP_DB`` (a database URL). Each request runs in a greenlet of its own.

planted: ``/items`` uses a session made when the module was imported (every request's greenlet
crosses into the worker's session), and ``/leak`` makes a session it never ends (left open when
the request's greenlet ends); clean: SQLAlchemy's ``scoped_session`` (thread-local, which gevent's
patching makes greenlet-local) with ``remove()`` at the end of every request, as Flask-SQLAlchemy
does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, scoped_session, sessionmaker

VARIANT = os.environ.get("AUDIT_APP_VARIANT", "clean")
engine = create_engine(os.environ["AUDIT_APP_DB"])
module_session = Session(engine)  # audit: cross-unit created
Scoped = scoped_session(sessionmaker(engine))


def items() -> int:
    if VARIANT == "planted":
        return int(module_session.scalar(text("select 1")) or 0)  # audit: cross-unit crossed
    try:
        return int(Scoped.scalar(text("select 1")) or 0)
    finally:
        Scoped.remove()


def leak() -> int:
    if VARIANT == "planted":
        session = Session(engine)  # audit: left-open created
        return int(session.scalar(text("select 2")) or 0)
    with Session(engine) as session:
        return int(session.scalar(text("select 2")) or 0)


ROUTES: dict[str, Callable[[], int]] = {"/items": items, "/leak": leak}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/health":
        body: Any = {"ok": True}
    elif path in ROUTES:
        body = {"value": ROUTES[path]()}
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(body).encode()]
