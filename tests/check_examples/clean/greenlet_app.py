"""Greenlets with sessionscope's registry, and ids (not objects) handed to them."""

import gevent
from db import Session

from models import User


def handle(user_id: int) -> None:
    with Session.scope() as session:
        user = session.get(User, user_id)
        if user is not None:
            user.name = user.name.title()


def serve(session_ids: list[int]) -> None:
    gevent.joinall([gevent.spawn(handle, user_id) for user_id in session_ids])


def rename_all() -> None:
    users = Session.scalars(Session.query(User).statement).all()
    gevent.joinall([gevent.spawn(handle, user.id) for user in users])
