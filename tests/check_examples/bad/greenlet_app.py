"""Greenlets using db.Session (thread-local): every greenlet gets the same Session."""

import gevent
from db import Session

from models import User


def handle(name: str) -> None:
    Session.add(User(name=name))
    Session.commit()


def serve(names: list[str]) -> None:
    gevent.joinall([gevent.spawn(handle, name) for name in names])
