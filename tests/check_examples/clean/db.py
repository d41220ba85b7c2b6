"""sessionscope's registries: one session per thread, greenlet or task."""

from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker

import sessionscope

engine = create_engine("sqlite:///app.db")
Session = sessionscope.scoped_session(sessionmaker(engine))
AsyncSession = sessionscope.async_scoped_session(
    async_sessionmaker(create_async_engine("sqlite+aiosqlite://"))
)
