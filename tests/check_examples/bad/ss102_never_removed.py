"""Per-task AsyncSessions that are never removed: they pile up, one per finished task."""

from asyncio import current_task

from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker, create_async_engine

engine = create_async_engine("sqlite+aiosqlite://")
AsyncSession = async_scoped_session(  # expect: SS102
    async_sessionmaker(engine), scopefunc=current_task
)


async def handler() -> None:
    await AsyncSession.commit()
