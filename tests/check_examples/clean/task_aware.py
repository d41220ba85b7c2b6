"""Registries keyed by task, and removed; a per-task scope; a session only the task uses."""

import asyncio
from asyncio import current_task

from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, scoped_session, sessionmaker

engine = create_async_engine("sqlite+aiosqlite://")
Tasks = async_scoped_session(async_sessionmaker(engine), scopefunc=current_task)
SyncTasks = scoped_session(sessionmaker(create_engine("sqlite://")), scopefunc=current_task)


async def handler() -> None:
    try:
        await Tasks.commit()
    finally:
        await Tasks.remove()


def blocking(session: Session) -> None:
    session.commit()


async def offload() -> None:
    session = SyncTasks()
    await asyncio.to_thread(blocking, session)  # the caller waits: same unit of work
    await asyncio.gather(handler(), handler())


async def awaited(session: AsyncSession) -> None:
    await asyncio.create_task(use(session))  # the caller waits for it: sequential use


async def use(session: AsyncSession) -> None:
    await session.commit()
