"""The borrower bookkeeping stays small however many sessions a unit makes or keeps."""

from __future__ import annotations

import asyncio
import contextvars
import gc

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import sessionscope
from sessionscope._guard._install import guard_of
from sessionscope._guard._lineage import ITSELF, BorrowToken, current_lineage


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


def test_dropping_dead_links_changes_nothing_a_context_copied_earlier_may_borrow(
    engine: Engine,
) -> None:
    """Chains are shared by the contexts copied from them, and dead links are dropped from them
    in place: a task created earlier (a copy of the owner's context then) still borrows exactly
    the sessions it could, every live one made before it and none made after, once the owner's
    later sessions have relinked the chain they share."""

    def borrows(session: Session) -> bool:
        try:
            session.execute(text("select 1"))
        except sessionscope.CrossUnitError:
            return False
        return True

    async def body() -> None:
        made = [sessionscope.guard(Session(engine)) for _ in range(40)]
        kept = made[::10]  # four live ones among dead ones
        for session in made:
            if session not in kept:
                session.close()
        del made, session
        gc.collect()
        assert chain_length() == 40
        newest_live = guard_of(kept[-1])
        assert newest_live is not None and newest_live.token is ITSELF  # its own link
        assert newest_live.length == 31
        go = asyncio.Event()

        async def earlier() -> tuple[list[bool], list[bool]]:
            await go.wait()
            return [borrows(s) for s in kept], [borrows(s) for s in later[::25]]

        task = asyncio.create_task(earlier())
        await asyncio.sleep(0)
        later = [sessionscope.guard(Session(engine)) for _ in range(100)]  # drops the dead ones
        assert newest_live.length == 4  # relinked in place: in the chain the task holds too
        go.set()
        assert await task == ([True] * 4, [False] * 4)
        now = await asyncio.create_task(asyncio.to_thread(lambda: [borrows(s) for s in kept]))
        assert now == [True] * 4
        for session in kept + later:
            session.close()

    contextvars.Context().run(asyncio.run, body())  # (no lineage inherited from earlier tests)


def test_a_guard_owned_anew_is_not_lent_through_its_first_link(engine: Engine) -> None:
    """A guard is its own link for its first ownership; owned anew (handed off, then adopted) it
    lends through a new token. A child task created before the hand-off holds the first link
    only: it is refused after the session came back, where a child created after it borrows."""

    def borrows(session: Session) -> bool:
        try:
            session.execute(text("select 1"))
        except sessionscope.CrossUnitError:
            return False
        return True

    async def body() -> None:
        session = sessionscope.guard(Session(engine))
        guard = guard_of(session)
        assert guard is not None and guard.token is ITSELF and current_lineage.get() is guard
        go = asyncio.Event()

        async def before() -> tuple[bool, bool]:
            first = borrows(session)  # inherited while the guard owned by its first link
            await go.wait()
            return first, borrows(session)

        earlier = asyncio.create_task(before())
        await asyncio.sleep(0)
        session.rollback()  # (the child's statement began a transaction of the owner's)
        sessionscope.hand_off(session)
        sessionscope.adopt(session)  # the same task owns it again, by a new link
        token = guard.token
        assert type(token) is BorrowToken and token() is guard and current_lineage.get() is token
        assert token.parent is guard  # the first link stays in the chain, no longer lendable
        go.set()
        assert await earlier == (True, False)
        assert await asyncio.create_task(asyncio.to_thread(borrows, session))
        session.close()

    contextvars.Context().run(asyncio.run, body())
