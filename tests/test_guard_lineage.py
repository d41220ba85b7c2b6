"""The borrower bookkeeping stays small however many sessions a unit makes or keeps."""

from __future__ import annotations

import asyncio
import contextvars
import gc

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import sessionscope
from sessionscope._guard._lineage import current_lineage


def chain_length() -> int:
    head = current_lineage.get()
    return head.length if head is not None else 0


def select_one_in_each(sessions: list[Session]) -> list[int]:
    return [session.execute(text("select 1")).scalar_one() for session in sessions]


def test_a_unit_keeping_many_sessions_keeps_a_chain_proportional_to_them(engine: Engine) -> None:
    def body() -> None:
        kept = [sessionscope.guard(Session(engine)) for _ in range(2000)]
        assert chain_length() <= 2 * len(kept) + 16
        # every one of them is still lendable to a context copied now
        borrowed = contextvars.copy_context().run(select_one_in_each, kept[::100])
        assert borrowed == [1] * 20
        for session in kept:
            session.close()
        del kept
        gc.collect()
        longest = 0
        for _ in range(100):  # sessions made and dropped, as one per request
            sessionscope.guard(Session(engine)).close()
            longest = max(longest, chain_length())
        assert longest <= 2 * 2000 + 16  # dead tokens wait for the next rebuild, no longer
        assert chain_length() < 100  # which dropped them

    contextvars.Context().run(body)  # a context of its own: the test's is left as it was


def test_a_session_made_after_a_task_was_created_is_not_lendable_to_that_task(
    engine: Engine,
) -> None:
    async def body() -> None:
        first = sessionscope.guard(Session(engine))
        started = asyncio.Event()
        handed: asyncio.Queue[Session] = asyncio.Queue()

        async def earlier() -> None:
            started.set()
            assert first.execute(text("select 1")).scalar() == 1  # inherited: a borrower
            second_in_task = await handed.get()
            try:
                second_in_task.execute(text("select 1"))
            except sessionscope.CrossUnitError as error:
                assert "belongs to asyncio task" in str(error)
            else:
                raise AssertionError("a task made before `second` borrowed it")

        task = asyncio.create_task(earlier())
        await started.wait()
        second = sessionscope.guard(Session(engine))
        await handed.put(second)
        await task
        # a copy of the owner's context run in the owner's thread is part of its work
        assert contextvars.copy_context().run(lambda: second.execute(text("select 2")).scalar())
        first.close()
        second.close()

    asyncio.run(body())
