"""Celery tasks given ids or shipped data, never ORM objects."""

from typing import Any

from db import Session
from sqlalchemy import select

import sessionscope
from models import User


def enqueue(send_welcome: Any, reindex: Any) -> None:
    with Session.scope() as session:
        user = session.scalars(select(User).limit(1)).one()
        send_welcome.delay(user.id)
        reindex.apply_async((sessionscope.ship(user),), countdown=5)
