"""asyncio: ``python asyncio_app.py planted|clean DATABASE_URL`` (an async driver's URL).

planted: a module-level AsyncSession is used by two tasks of a ``gather()`` at once (concurrent
use), and a session made in one task is handed to another through a queue (cross-unit);
clean: each task opens its own session, and the queue carries a primary key.
"""

from __future__ import annotations

import asyncio
import sys

from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "audit_async_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


engine = create_async_engine(sys.argv[2])
Local = async_sessionmaker(engine)
shared = AsyncSession(engine)  # audit: concurrent created


async def planted() -> None:
    async def read() -> None:
        await shared.execute(select(Item))  # audit: concurrent crossed

    await asyncio.gather(read(), read())
    await shared.close()

    queue: asyncio.Queue[AsyncSession] = asyncio.Queue()

    async def consumer() -> None:
        session = await queue.get()
        await session.scalars(select(Item))  # audit: cross-unit crossed

    async def producer() -> None:
        session = Local()  # audit: cross-unit created
        await session.scalars(select(Item))
        await queue.put(session)
        await asyncio.sleep(0.1)  # the producer is alive while its session is used elsewhere
        await session.close()

    await asyncio.gather(consumer(), producer())


async def clean() -> None:
    async def read() -> None:
        async with Local() as session:
            await session.execute(select(Item))

    await asyncio.gather(read(), read())

    queue: asyncio.Queue[int] = asyncio.Queue()

    async def consumer() -> None:
        item_id = await queue.get()
        async with Local() as session:
            await session.get(Item, item_id)

    async def producer() -> None:
        async with Local() as session:
            item = (await session.scalars(select(Item))).first()
            assert item is not None
            await queue.put(item.id)

    await asyncio.gather(consumer(), producer())


async def main(variant: str) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    async with Local() as session, session.begin():
        session.add(Item(name="first"))
    await (planted() if variant == "planted" else clean())
    await engine.dispose()
    print(f"asyncio_app {variant}: done")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
