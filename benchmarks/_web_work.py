"""What one request of the web benchmark does, shared by its WSGI and ASGI applications.

The endpoint's work is the same in every application and both variants: a SELECT by primary key
(``session.get`` in a fresh session always reaches the database), one INSERT and a commit. The row
it inserts is tagged with the server's tag (its variant), so the driver can count what each server
really wrote.

The applications are configured by environment variables:

    BENCH_WEB_URL       the database URL (sync driver; the async one is derived from it)
    BENCH_WEB_VARIANT   ``sessionscope``, ``by-hand``, or (WSGI only) ``registry``: sessionscope's
                        registry without the integration, ``Session()`` then ``remove()`` in
                        a ``finally`` (a layer of the sessionscope variant, to tell its costs
                        apart); or (WSGI only) ``imported``: the by-hand app in a process that
                        imported sessionscope and its WSGI integration and made a registry it
                        never calls (a control: what importing sessionscope costs by itself)
    BENCH_WEB_TAG       what the rows and answers are tagged with (default: the variant); two
                        servers of one variant (``--same``) need two tags
    BENCH_WEB_SESSION   ASGI only: ``sync`` (``def`` endpoint, Session) or ``async``
                        (``async def`` endpoint, AsyncSession)
    BENCH_WEB_POOL      the engine's pool size
    BENCH_WEB_GUARD     the sessionscope registry's ``guard`` (default ``raise``, its default)
"""

from __future__ import annotations

import os
from typing import Any, Literal

from sqlalchemy import ForeignKey, String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

SESSIONSCOPE = "sessionscope"
BY_HAND = "by-hand"
REGISTRY = "registry"
IMPORTED = "imported"
VARIANTS = (SESSIONSCOPE, BY_HAND)
"""What the benchmarks compare. Served on request (WSGI only): ``REGISTRY``, a layer of the
first, and ``IMPORTED``, the second in a process that imported the first (a control)."""
KNOWN_VARIANTS = (*VARIANTS, REGISTRY, IMPORTED)
LAYERS = (REGISTRY, IMPORTED)
"""The variants only the WSGI app serves."""
Guard = Literal["raise", "warn", "off"]
GUARDS = ("raise", "warn", "off")
ITEMS = 100
"""Rows of ``web_items``; requests read item ``1 + n % ITEMS``."""


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "web_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Hit(Base):
    """One row per request served, tagged with the server that served it."""

    __tablename__ = "web_hits"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("web_items.id"))
    tag: Mapped[str] = mapped_column(String(20), index=True)


def item_name(item_id: int) -> str:
    return f"item-{item_id}"


class Config:
    """The application's settings, read from the environment when the server builds its app."""

    def __init__(self) -> None:
        self.url = os.environ["BENCH_WEB_URL"]
        self.variant = os.environ["BENCH_WEB_VARIANT"]
        if self.variant not in KNOWN_VARIANTS:
            raise ValueError(f"BENCH_WEB_VARIANT={self.variant!r}: not one of {KNOWN_VARIANTS}")
        self.tag = os.environ.get("BENCH_WEB_TAG", self.variant)
        self.session = os.environ.get("BENCH_WEB_SESSION", "sync")
        self.pool = int(os.environ.get("BENCH_WEB_POOL", "10"))
        guard = os.environ.get("BENCH_WEB_GUARD", "raise")
        if guard not in GUARDS:
            raise ValueError(f"BENCH_WEB_GUARD={guard!r}: not one of {GUARDS}")
        self.guard: Guard = guard  # type: ignore[assignment]

    def engine_options(self) -> dict[str, Any]:
        if self.url.startswith("sqlite"):
            return {
                "pool_size": self.pool,
                "max_overflow": 0,
                "pool_timeout": 30,
                "connect_args": {"timeout": 30},  # writers wait for each other's lock
            }
        return {"pool_size": self.pool, "max_overflow": 10, "pool_timeout": 30}

    @property
    def async_url(self) -> str:
        return self.url.replace("sqlite://", "sqlite+aiosqlite://", 1)


def work(session: Session, item_id: int, tag: str) -> dict[str, str]:
    """The endpoint's work: read an item by primary key, insert a hit tagged ``tag``, commit."""
    item = session.get(Item, item_id)
    if item is None:
        raise LookupError(item_id)
    name = item.name  # before the commit expires it
    session.add(Hit(item_id=item_id, tag=tag))
    session.commit()
    return {"variant": tag, "item": name}


async def work_async(session: AsyncSession, item_id: int, tag: str) -> dict[str, str]:
    """:func:`work` on an AsyncSession."""
    item = await session.get(Item, item_id)
    if item is None:
        raise LookupError(item_id)
    name = item.name
    session.add(Hit(item_id=item_id, tag=tag))
    await session.commit()
    return {"variant": tag, "item": name}
