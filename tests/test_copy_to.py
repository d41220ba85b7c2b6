"""copy_to: objects move between units as copies (merge), never by sharing the source session."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import greenlet
import pytest
from sqlalchemy import Engine, event, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session, selectinload, sessionmaker
from sqlalchemy.orm.exc import UnmappedInstanceError

import sessionscope
from sessionscope import copy_to
from tests.models import Base, Child, Parent


def seed(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        session.add_all(
            [
                Parent(
                    id=1, name="loaded", children=[Child(id=1, name="a"), Child(id=2, name="b")]
                ),
                Parent(id=2, name="unloaded", children=[Child(id=3, name="c")]),
            ]
        )


def statements_by_thread(engine: Engine) -> dict[int, int]:
    """SQL statements sent, per OS thread (greenlets of one thread share the count)."""
    counts: dict[int, int] = {}

    @event.listens_for(engine, "before_cursor_execute")
    def count(*_: Any) -> None:
        ident = threading.get_ident()
        counts[ident] = counts.get(ident, 0) + 1

    return counts


def in_other_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def in_other_greenlet(fn: Callable[[], Any]) -> Any:
    return greenlet.greenlet(fn).switch()


@pytest.mark.parametrize(
    "elsewhere", [in_other_thread, in_other_greenlet], ids=["thread", "greenlet"]
)
def test_copies_keep_identity_bring_loaded_relationships_and_leave_the_source_alone(
    engine: Engine, elsewhere: Callable[[Callable[[], Any]], Any]
) -> None:
    seed(engine)
    Scoped = sessionscope.scoped_session(sessionmaker(engine))
    source_session = Scoped()
    loaded = source_session.scalars(
        select(Parent).where(Parent.id == 1).options(selectinload(Parent.children))
    ).one()
    unloaded = source_session.get(Parent, 2)
    source_statements: list[Any] = []
    event.listen(source_session, "do_orm_execute", source_statements.append)
    before = set(source_session.identity_map.keys())

    def receive() -> dict[str, Any]:
        """Facts gathered in the receiving unit: its session closes when the unit ends."""
        target = Scoped()  # this unit's own session
        copy_loaded, copy_unloaded = copy_to(target, [loaded, unloaded])
        children = copy_loaded.__dict__.get("children", [])
        return {
            "own session": target is not source_session,
            "ids": [copy_loaded.id, copy_unloaded.id],
            "copies": copy_loaded is not loaded and copy_unloaded is not unloaded,
            "in target": inspect(copy_loaded).session is target,
            "loaded children": [c.name for c in children],
            "children in target": all(inspect(c).session is target for c in children),
            "unloaded stays unloaded": "children" not in inspect(copy_unloaded).dict,
        }

    assert elsewhere(receive) == {
        "own session": True,
        "ids": [1, 2],  # identity kept
        "copies": True,
        "in target": True,
        "loaded children": ["a", "b"],  # loaded on the source: followed
        "children in target": True,
        "unloaded stays unloaded": True,  # unloaded on the source: loads lazily where it lands
    }
    assert source_statements == [] and set(source_session.identity_map.keys()) == before
    assert inspect(loaded).session is source_session  # the source objects stay where they were
    Scoped.remove()


def test_load_false_copies_trusted_state_without_sql(engine: Engine) -> None:
    seed(engine)
    with Session(engine) as source:
        parent = source.get(Parent, 1)
        statements = statements_by_thread(engine)

        def receive() -> Any:
            with Session(engine) as target:
                copy = copy_to(target, parent, load=False)
                return copy.name, inspect(copy).persistent

        assert in_other_thread(receive) == ("loaded", True)
        assert sum(statements.values()) == 0


def test_a_single_object_gives_a_copy_and_an_iterable_gives_a_list(engine: Engine) -> None:
    seed(engine)
    with Session(engine) as source, Session(engine) as target:
        parent = source.get(Parent, 1)
        assert copy_to(target, parent) is target.get(Parent, 1)
        assert copy_to(target, (p for p in [parent])) == [target.get(Parent, 1)]
        assert copy_to(target, []) == []


def test_what_is_not_a_mapped_object_is_refused_clearly(engine: Engine) -> None:
    with Session(engine) as target:
        with pytest.raises(UnmappedInstanceError):
            copy_to(target, "not an object")
        with pytest.raises(UnmappedInstanceError):
            copy_to(target, [object()])
        with pytest.raises(UnmappedInstanceError):
            copy_to(target, 42)


def test_copy_to_an_async_session_of_another_task(tmp_path: Any) -> None:
    pytest.importorskip("aiosqlite")

    async def main() -> None:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/copy.db")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        Scoped = sessionscope.async_scoped_session(
            lambda: AsyncSession(engine, expire_on_commit=False)
        )
        async with Scoped.scope():
            Scoped.add(Parent(id=1, name="p", children=[Child(id=1, name="c")]))
        loaded = (await Scoped.scalars(select(Parent).options(selectinload(Parent.children)))).one()

        async def other_task() -> Any:
            copy = await copy_to(Scoped, loaded)
            return copy, Scoped()

        copy, target = await asyncio.create_task(other_task())
        assert copy is not loaded and copy.id == 1 and inspect(copy).session is target.sync_session
        assert [c.name for c in copy.__dict__["children"]] == ["c"]
        assert await copy_to(Scoped(), [loaded]) == [loaded]  # already in this task's session
        await Scoped.remove()
        await engine.dispose()

    asyncio.run(main())
