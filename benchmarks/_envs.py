"""Run a function inside a fresh concurrent unit, while other units of the same kind are alive.

Every runner has the signature of :data:`Env`: ``env(body, hold, peers)`` starts ``peers`` units
that each call ``hold()`` (typically: take a session from every registry under test) and then
block; once all of them hold, it runs ``body()`` synchronously inside one more fresh unit and
returns its result; then it releases the peers and waits for them to end.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import greenlet

R = TypeVar("R")
Env = Callable[[Callable[[], R], Callable[[], object], int], R]


def in_thread(body: Callable[[], R], hold: Callable[[], object], peers: int) -> R:
    """``body`` in a new OS thread; ``peers`` other threads blocked on an Event."""
    all_holding = threading.Barrier(peers + 1)
    release = threading.Event()

    def peer() -> None:
        hold()
        all_holding.wait()
        release.wait()

    threads = [threading.Thread(target=peer, daemon=True) for _ in range(peers)]
    for thread in threads:
        thread.start()
    all_holding.wait()
    results: list[R] = []
    worker = threading.Thread(target=lambda: results.append(body()), name="bench")
    worker.start()
    worker.join()
    release.set()
    for thread in threads:
        thread.join()
    if not results:
        raise RuntimeError("the benchmark thread failed (see its traceback above)")
    return results[0]


def in_greenlet(body: Callable[[], R], hold: Callable[[], object], peers: int) -> R:
    """``body`` in a new raw greenlet; ``peers`` raw greenlets suspended after ``hold()``."""
    here = greenlet.getcurrent()

    def peer() -> None:
        hold()
        here.switch()  # suspend; the last switch() into it lets it return and die

    units = [greenlet.greenlet(peer) for _ in range(peers)]
    for unit in units:
        unit.switch()
    result: R = greenlet.greenlet(body).switch()
    for unit in units:
        unit.switch()
    return result


def in_gevent(body: Callable[[], R], hold: Callable[[], object], peers: int) -> R:
    """``body`` in a new gevent Greenlet (no monkey-patching); ``peers`` waiting on an Event."""
    import gevent
    import gevent.event

    release = gevent.event.Event()
    holding = 0

    def peer() -> None:
        nonlocal holding
        hold()
        holding += 1
        release.wait()

    units = [gevent.spawn(peer) for _ in range(peers)]
    while holding < peers:
        gevent.sleep(0)
    result: R = gevent.spawn(body).get()
    release.set()
    gevent.joinall(units, raise_error=True)
    return result


def in_asyncio_task(body: Callable[[], R], hold: Callable[[], object], peers: int) -> R:
    """``body`` (synchronous) in a new asyncio task; ``peers`` tasks awaiting an Event."""

    async def main() -> R:
        release = asyncio.Event()
        holding = 0

        async def peer() -> None:
            nonlocal holding
            hold()
            holding += 1
            await release.wait()

        async def run_body() -> R:
            return body()

        tasks = [asyncio.create_task(peer()) for _ in range(peers)]
        while holding < peers:
            await asyncio.sleep(0)
        result = await asyncio.create_task(run_body())
        release.set()
        await asyncio.gather(*tasks)
        return result

    return asyncio.run(main())


ENVS: dict[str, Env[Any]] = {
    "thread": in_thread,
    "greenlet": in_greenlet,
    "gevent": in_gevent,
    "asyncio task": in_asyncio_task,
}
