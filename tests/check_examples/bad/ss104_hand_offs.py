"""Sessions and ORM objects handed to other threads, greenlets, tasks, jobs and Celery tasks."""

import asyncio
import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import eventlet
import gevent
from sqlalchemy import create_engine, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, sessionmaker

from models import Order, User, VipUser

SessionLocal = sessionmaker(create_engine("sqlite://"))


def send_mail(user: User) -> None: ...


def audit(session: Session, order: Order) -> None: ...


def threads() -> None:
    session = SessionLocal()
    user = session.get(User, 1)
    threading.Thread(target=send_mail, args=(user,)).start()  # expect: SS104
    threading.Thread(target=audit, kwargs={"session": session, "order": None})  # expect: SS104
    threading.Thread(target=session.commit).start()  # expect: SS104
    multiprocessing.Process(target=send_mail, args=[user]).start()  # expect: SS104


def greenlets() -> None:
    with Session(create_engine("sqlite://")) as session:
        first = session.scalars(select(User).where(User.id > 0)).first()
        gevent.spawn(send_mail, first)  # expect: SS104
        order = session.query(Order).filter_by(id=3).one()
        eventlet.spawn(audit, session, order)  # expect: SS104, SS104


def executors(pool: ThreadPoolExecutor) -> None:
    with SessionLocal.begin() as session:
        for user in session.scalars(select(User)):
            pool.submit(send_mail, user)  # expect: SS104
        everyone = session.execute(select(User)).scalars().all()
        pool.submit(print, everyone)  # expect: SS104


async def process(session: AsyncSession) -> None: ...


async def tasks(session: AsyncSession, user: User) -> None:
    asyncio.create_task(process(session))  # expect: SS104
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, send_mail, user)  # expect: SS104
    async with asyncio.TaskGroup() as group:
        group.create_task(process(session=session))  # expect: SS104


async def nursery(session: Session, task_group: Any) -> None:
    task_group.start_soon(audit, session, None)  # expect: SS104


def celery(send_welcome: Any, session: Session) -> None:
    new = VipUser(name="ann")
    session.add(new)
    send_welcome.delay(new)  # expect: SS104
    send_welcome.apply_async(
        (session.merge(new),),  # expect: SS104
        countdown=5,
    )
