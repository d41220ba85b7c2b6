"""A Celery application: ``celery -A tests.audit_apps.celery_app worker --pool prefork``.

Configured by ``AUDIT_APP_VARIANT`` (``planted`` or ``clean``), ``AUDIT_APP_DB``,
``AUDIT_APP_BROKER``, ``AUDIT_APP_BACKEND`` and ``AUDIT_APP_QUEUE``. The worker's main process
imports this module and queries the database at import (a warm-up, a health check), then its
pool forks the children that run the tasks. planted: the tasks use the session the main process
made at import (used across the fork); clean: each task makes its own.
"""

from __future__ import annotations

import os

from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

VARIANT = os.environ.get("AUDIT_APP_VARIANT", "clean")
app = Celery(
    "audit_app",
    broker=os.environ.get("AUDIT_APP_BROKER", "redis://127.0.0.1:6379/0"),
    backend=os.environ.get("AUDIT_APP_BACKEND", "redis://127.0.0.1:6379/1"),
)
app.conf.update(
    task_default_queue=os.environ.get("AUDIT_APP_QUEUE", "audit"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)
engine = create_engine(os.environ.get("AUDIT_APP_DB", "sqlite://"))
warm_up = Session(engine)  # audit: forked created
warm_up.execute(text("select 1"))


@app.task(name="audit.answer")
def answer() -> int:
    if VARIANT == "planted":
        return int(warm_up.scalar(text("select 42")) or 0)  # audit: forked crossed
    with Session(engine) as session:
        return int(session.scalar(text("select 42")) or 0)
