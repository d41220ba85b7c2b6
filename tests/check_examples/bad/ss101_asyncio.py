"""SQLAlchemy's thread-local registry in a module that runs asyncio tasks."""

import threading

from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

maker = sessionmaker(create_engine("sqlite://"))
TaskSession = scoped_session(maker)  # expect: SS101
ThreadKeyed = scoped_session(maker, scopefunc=threading.get_ident)  # expect: SS101


async def endpoint() -> int:
    return len(TaskSession().new) + len(ThreadKeyed().new)
