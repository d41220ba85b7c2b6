"""One runner per concurrency model: start N units, each driving one request, and wait for all.

A runner knows nothing about sessions or databases. It receives ``start_request(i)``, which returns
the request of unit ``i`` as a generator (see :mod:`sessionscope.demo.workload`), and decides two
things only: what a unit is, and what "wait here, let the others run" means for it. It returns when
every unit has ended *and* the end-of-unit callbacks of the model have had their turn, so that the
caller can count connections still checked out.

gevent is an optional extra: it is imported when its runner runs, and never monkey-patches
anything (that is the point: code that imports gevent late, or uses greenlets without patching).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

StartRequest = Callable[[int], Iterator[None]]
Runner = Callable[[int, StartRequest], None]

THREAD_PAUSE_SECONDS = 0.005
"""Long enough for the other threads to run; every thread waits at a barrier first anyway."""

GEVENT_SETTLE_SECONDS = 0.05
"""gevent reports a finished greenlet from its hub, which hands cleanup to a fresh greenlet."""


def run_in_threads(units: int, start_request: StartRequest) -> None:
    """One OS thread per unit; a barrier makes them all start together, so they really overlap."""
    everyone_ready = threading.Barrier(units)

    def unit(index: int) -> None:
        everyone_ready.wait()
        for _ in start_request(index):
            time.sleep(THREAD_PAUSE_SECONDS)

    threads = [threading.Thread(target=unit, args=(i,), name=f"unit-{i}") for i in range(units)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()  # a thread's session is closed in that thread, before join() returns


def run_in_greenlets(units: int, start_request: StartRequest) -> None:
    """One gevent greenlet per unit, in the main thread, with no monkey-patching."""
    import gevent  # type: ignore[import-untyped,unused-ignore]

    def unit(index: int) -> None:
        for _ in start_request(index):
            gevent.sleep(0)

    greenlets = [gevent.spawn(unit, i) for i in range(units)]
    gevent.joinall(greenlets, raise_error=True)
    gevent.sleep(GEVENT_SETTLE_SECONDS)


def run_in_tasks(units: int, start_request: StartRequest) -> None:
    """One asyncio task per unit, using a plain (sync) Session as many applications do.

    ``asyncio.run`` returns after the loop has run its remaining callbacks (the tasks'
    done-callbacks among them) and closed, so nothing is left pending when the caller measures.
    """

    async def unit(index: int) -> None:
        for _ in start_request(index):
            await asyncio.sleep(0)

    async def all_units() -> None:
        await asyncio.gather(
            *(asyncio.create_task(unit(i), name=f"unit-{i}") for i in range(units))
        )

    asyncio.run(all_units())


def gevent_missing() -> str | None:
    """Why the gevent model can't run here, or None. Importing gevent patches nothing."""
    try:
        import gevent  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError as exc:
        return f"gevent is not installed ({exc}); pip install 'sessionscope[demo]'"
    return None


def always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Model:
    """A concurrency model as the report talks about it."""

    name: str
    title: str
    unit_noun: str
    threading_local_view: str
    """What SQLAlchemy's ``threading.local`` registry sees when this model runs units."""
    run: Runner
    unavailable: Callable[[], str | None]

    def units(self, count: int) -> str:
        """``"20 greenlets"``."""
        return f"{count} {self.unit_noun}{'' if count == 1 else 's'}"


MODELS: dict[str, Model] = {
    model.name: model
    for model in (
        Model(
            name="threads",
            title="threads (one OS thread per request)",
            unit_noun="thread",
            threading_local_view="threading.local keeps one value per thread",
            run=run_in_threads,
            unavailable=always_available,
        ),
        Model(
            name="gevent",
            title="gevent greenlets (not monkey-patched)",
            unit_noun="greenlet",
            threading_local_view=(
                "without monkey-patching, threading.local sees only the one OS thread that all "
                "the greenlets run in"
            ),
            run=run_in_greenlets,
            unavailable=gevent_missing,
        ),
        Model(
            name="asyncio",
            title="asyncio tasks (sync Session inside the tasks)",
            unit_noun="task",
            threading_local_view=(
                "threading.local sees only the event loop's thread, which all the tasks share"
            ),
            run=run_in_tasks,
            unavailable=always_available,
        ),
    )
}
