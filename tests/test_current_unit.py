"""current_unit(): the real concurrent unit, for every model, with identities that are objects."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import greenlet
import pytest

from sessionscope import ThreadUnit, current_unit, describe_unit
from tests.conftest import in_new_thread


def test_a_thread_is_its_own_unit_and_stable_within_it() -> None:
    main = current_unit()
    assert isinstance(main, ThreadUnit)
    assert current_unit() is main
    other = in_new_thread(current_unit, name="worker-x")
    assert isinstance(other, ThreadUnit) and other is not main
    assert "worker-x" in describe_unit(other)


def test_each_raw_greenlet_is_a_unit_and_the_main_greenlet_is_the_thread() -> None:
    seen: list[Any] = []
    children = [greenlet.greenlet(lambda: seen.append(current_unit())) for _ in range(3)]
    for child in children:
        child.switch()
    assert seen == children  # the greenlet objects themselves, not id()s
    assert isinstance(current_unit(), ThreadUnit)


def test_each_asyncio_task_is_a_unit_and_to_thread_is_a_thread() -> None:
    async def main() -> None:
        me = current_unit()
        assert me is asyncio.current_task()
        children = await asyncio.gather(*(_unit() for _ in range(3)))
        assert len({id(c) for c in children}) == 3 and me not in children
        in_thread = await asyncio.to_thread(current_unit)
        assert isinstance(in_thread, ThreadUnit)

    async def _unit() -> Any:
        await asyncio.sleep(0)
        return current_unit()

    asyncio.run(main())


def test_a_trio_task_is_a_unit() -> None:
    trio = pytest.importorskip("trio")
    seen: list[Any] = []

    async def child() -> None:
        seen.append(current_unit())

    async def main() -> None:
        seen.append(current_unit())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
            nursery.start_soon(child)

    trio.run(main)
    assert len({id(u) for u in seen}) == 3
    assert all(type(u).__name__ == "Task" for u in seen)
    assert "trio task" in describe_unit(seen[0])
    assert isinstance(current_unit(), ThreadUnit)


def test_sqlalchemy_internal_greenlets_belong_to_the_task_that_drives_them() -> None:
    pytest.importorskip("aiosqlite")
    from sqlalchemy import event, text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    seen: list[Any] = []

    async def main() -> Any:
        engine = create_async_engine("sqlite+aiosqlite://")
        async with AsyncSession(engine) as session:

            @event.listens_for(session.sync_session, "do_orm_execute")
            def hook(_: Any) -> None:
                seen.append((current_unit(), greenlet.getcurrent()))

            await session.execute(text("select 1"))
        await engine.dispose()
        return asyncio.current_task()

    task = asyncio.run(main())
    unit, in_greenlet = seen[0]
    assert unit is task
    assert getattr(in_greenlet, "__sqlalchemy_greenlet_provider__", False)


def test_sqlalchemy_greenlet_outside_a_task_belongs_to_its_driver() -> None:
    class ProviderGreenlet(greenlet.greenlet):  # what SQLAlchemy's greenlet_spawn creates
        __sqlalchemy_greenlet_provider__ = True

    seen: list[Any] = []

    def drive() -> None:
        ProviderGreenlet(lambda: seen.append(current_unit()), greenlet.getcurrent()).switch()

    driver = greenlet.greenlet(drive)
    driver.switch()
    assert seen == [driver]
    ProviderGreenlet(lambda: seen.append(current_unit())).switch()  # driven by the main greenlet
    assert seen[1] is current_unit()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_shares_a_unit_with_its_parent() -> None:
    parent_unit = current_unit()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, then leave without running pytest's teardown
        ok = current_unit() is not parent_unit and isinstance(current_unit(), ThreadUnit)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"
    assert current_unit() is parent_unit


def test_units_are_held_weakly_a_finished_thread_leaves_nothing_behind() -> None:
    import weakref

    ref = in_new_thread(lambda: weakref.ref(current_unit()))
    assert ref() is None


if sys.version_info >= (3, 11):

    def test_taskgroup_children_are_units_of_their_own() -> None:
        async def main() -> None:
            me = current_unit()
            results: list[Any] = []

            async def child() -> None:
                results.append(current_unit())

            async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined]
                group.create_task(child())
                group.create_task(child())
            assert me not in results and results[0] is not results[1]

        asyncio.run(main())
