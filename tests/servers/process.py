"""A server in a subprocess: start uvicorn, put concurrent HTTP load on it, stop it.

:func:`running` starts ``uvicorn`` on 127.0.0.1 on a free port (found by binding port 0), waits
until the application answers, and stops the process it started (terminate, then kill after a
timeout) whatever happens. The launcher itself (:func:`launched`, :class:`Server`, :func:`stop`)
lives in ``sessionscope.demo.servers``, shared with the demo's web section; here it runs from the
repository's root, so that ``tests.servers...`` applications import. :func:`drive` sends a list
of requests with bounded concurrency: ``clients`` threads, each with its own keep-alive
``httpx.Client``, taking the next request from a shared queue until none is left or the deadline
has passed.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from sessionscope.demo.servers import Server, free_port, launched, stop, uvicorn_command

__all__ = ["REPO", "Result", "Server", "drive", "free_port", "launched", "running", "stop"]

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def running(
    app: str,
    env: Mapping[str, str],
    log_path: Path,
    *,
    attempts: int = 3,
    timeout: float = 30,
    args: Sequence[str] = (),
) -> Iterator[Server]:
    """``uvicorn --factory app`` with ``env`` added, on a free port, until the block ends.

    ``args``: more uvicorn options (``["--loop", "uvloop"]``).
    """
    command = uvicorn_command(app, args)
    with launched(
        app, command, env, log_path, attempts=attempts, timeout=timeout, cwd=REPO
    ) as server:
        yield server


@dataclass
class Result:
    """One request sent by :func:`drive`: its path and what came back (or the error)."""

    path: str
    status: int | None
    body: Any
    error: str | None = None


def drive(
    base_url: str, paths: list[str], *, clients: int = 20, deadline: float = 120
) -> list[Result]:
    """POST every path (in order, ``clients`` at a time) and return the results in that order.

    Each client thread keeps one connection alive for all its requests. Past ``deadline`` seconds
    the remaining requests are not sent (their results say so).
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(paths)):
        todo.put(index)
    results: list[Result | None] = [None] * len(paths)
    stop_at = time.monotonic() + deadline

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=30) as http:
            while time.monotonic() < stop_at:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                path = paths[index]
                try:
                    response = http.post(path)
                except httpx.HTTPError as error:
                    results[index] = Result(path, None, None, f"{type(error).__name__}: {error}")
                    continue
                try:
                    body: Any = response.json()
                except ValueError:
                    body = response.text
                results[index] = Result(path, response.status_code, body)

    threads = [threading.Thread(target=client, name=f"client-{n}") for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [
        result if result is not None else Result(paths[i], None, None, "not sent (deadline)")
        for i, result in enumerate(results)
    ]
