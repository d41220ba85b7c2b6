"""``copy_to``: the share-nothing way to move ORM objects from one unit to another.

A Session and every object attached to it belong to one unit. Work that spans units gives each
unit its own session and *copies* objects across with ``Session.merge()``, as SQLAlchemy's
documentation describes; ``copy_to`` is that, spelled once:

- the copy lives in the target session (one of the current unit), with the same identity
  (primary key), so it is the object that session already has, or is loaded into it;
- relationships that were loaded on the source follow, recursively; unloaded ones stay unloaded
  and load lazily in the target session, from the database;
- ``load=False`` trusts the source state as clean and copies it without a SELECT (SQLAlchemy's
  ``merge(load=False)``, which refuses objects with pending changes);
- the source session is never touched: ``merge`` reads the source object's loaded state only,
  and emits nothing on the source session's connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import Any, NoReturn, TypeVar, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm import Session, scoped_session
from sqlalchemy.orm.exc import UnmappedInstanceError
from sqlalchemy.orm.state import InstanceState

from ._arguments import expect_flags, message, refuse, what_it_is

_O = TypeVar("_O")
_TARGETS = (Session, AsyncSession, scoped_session, async_scoped_session)


def _is_mapped_instance(obj: Any) -> bool:
    return isinstance(inspect(obj, raiseerr=False), InstanceState)


@overload
def copy_to(
    session: AsyncSession | async_scoped_session[Any], objects: Iterable[_O], load: bool = True
) -> Awaitable[list[_O]]: ...


@overload
def copy_to(
    session: AsyncSession | async_scoped_session[Any], objects: _O, load: bool = True
) -> Awaitable[_O]: ...


@overload
def copy_to(
    session: Session | scoped_session[Any], objects: Iterable[_O], load: bool = True
) -> list[_O]: ...


@overload
def copy_to(session: Session | scoped_session[Any], objects: _O, load: bool = True) -> _O: ...


def copy_to(session: Any, objects: Any, load: bool = True) -> Any:
    """Copy ORM objects into ``session`` with ``merge`` semantics; return the copies.

    :param session: the target, a session of the current unit: a ``Session`` or a scoped
     session (sessionscope's or SQLAlchemy's), or an ``AsyncSession`` / ``async_scoped_session``,
     in which case the result is awaitable.
    :param objects: one mapped object, or an iterable of them.
    :param load: ``False`` copies trusted clean state without querying the database.
    :return: the copy of one object, or a list of copies in the order given.
    """
    if not isinstance(session, _TARGETS):
        refuse(
            sa_exc.ArgumentError,
            "copy_to()",
            "session",
            session,
            "a Session, an AsyncSession or a scoped session (the target)",
            what_it_is(session),
        )
    expect_flags("copy_to()", load=load)
    single = _is_mapped_instance(objects)
    if single:
        sources = [objects]
    elif isinstance(objects, Iterable) and not isinstance(objects, str | bytes):
        sources = list(objects)
        for position, source in enumerate(sources):
            if not _is_mapped_instance(source):
                _refuse_unmapped(f"objects[{position}]", source)
    else:
        _refuse_unmapped("objects", objects)

    if isinstance(session, AsyncSession | async_scoped_session):
        return _copy_async(session, sources, load, single)
    copies = [session.merge(source, load=load) for source in sources]
    return copies[0] if single else copies


def _refuse_unmapped(name: str, value: Any) -> NoReturn:
    """SQLAlchemy's own error for what ``merge`` cannot take, naming the argument."""
    raise UnmappedInstanceError(
        value,
        message(
            "copy_to()",
            name,
            value,
            "a mapped instance, or an iterable of them",
            f"{UnmappedInstanceError(value)}.",
        ),
    )


async def _copy_async(session: Any, sources: list[Any], load: bool, single: bool) -> Any:
    copies = [await session.merge(source, load=load) for source in sources]
    return copies[0] if single else copies
