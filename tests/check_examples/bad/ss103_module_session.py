"""One Session for the whole process, used by tasks, threads and greenlets."""

import threading
from concurrent.futures import ThreadPoolExecutor

import gevent
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from models import User

engine = create_engine("sqlite://")
SessionLocal = sessionmaker(engine)
session = SessionLocal()
plain = Session(engine)


async def list_users() -> list[User]:
    users = session.scalars(select(User)).all()  # expect: SS103
    session.commit()  # reported once per function and name
    return list(users)


def worker(user_id: int) -> None:
    plain.get(User, user_id)  # expect: SS103


def job() -> None:
    session.rollback()  # expect: SS103


def start() -> None:
    threading.Thread(target=worker, args=(1,)).start()
    gevent.spawn(job)
    with ThreadPoolExecutor() as pool:
        pool.submit(lambda: plain.close())  # expect: SS103
