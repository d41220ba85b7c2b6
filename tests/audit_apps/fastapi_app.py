"""A FastAPI application for uvicorn: ``uvicorn --factory tests.audit_apps.fastapi_app:create_app``.

Configured by ``AUDIT_APP_VARIANT`` (``planted`` or ``clean``) and ``AUDIT_APP_DB``. Both use the
pattern of FastAPI's tutorial: a sync dependency yielding a session, a sync endpoint using it
(FastAPI runs them as separate thread-pool jobs of the request's task: the audit must not call
that a crossing). planted: the dependency keeps the first request's session, never closed there
(left open), and hands it to every later request (cross-unit); clean: a session per request,
closed by the dependency.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from fastapi import Depends, FastAPI
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

VARIANT = os.environ.get("AUDIT_APP_VARIANT", "clean")
engine = create_engine(os.environ.get("AUDIT_APP_DB", "sqlite://"))
SessionLocal = sessionmaker(engine)
_kept: list[Session] = []


def get_db() -> Iterator[Session]:
    if VARIANT == "planted":
        if not _kept:
            _kept.append(SessionLocal())  # audit: cross-unit left-open created
        yield _kept[0]
        return
    db = SessionLocal()
    try:
        yield db
    finally:
        db.close()


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/items")
    def items(db: Session = Depends(get_db)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        return {"value": db.scalar(text("select 1"))}  # audit: cross-unit crossed

    return app
