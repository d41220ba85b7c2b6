"""gunicorn in a subprocess, and load with one fixed list of requests per client.

The uvicorn harness (:mod:`tests.servers.process`) starts its server on a free port and drives it;
this module starts ``gunicorn`` the same way, with the launcher of ``sessionscope.demo.servers``
(shared with the demo's web section; the master process is the one started and stopped: it stops
its workers), and adds :func:`drive_clients`, where each keep-alive client sends its own list (one
tenant per client).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from sessionscope.demo.servers import Server, gunicorn_command, launched
from tests.servers.process import REPO, Result


@contextlib.contextmanager
def gunicorn(
    app: str,
    env: Mapping[str, str],
    log_path: Path,
    options: list[str],
    *,
    attempts: int = 3,
    timeout: float = 30,
) -> Iterator[Server]:
    """``gunicorn options app`` on a free 127.0.0.1 port, ``env`` added, until the block ends."""
    command = gunicorn_command(app, options)
    with launched(
        app, command, env, log_path, attempts=attempts, timeout=timeout, cwd=REPO
    ) as server:
        yield server


def drive_clients(
    base_url: str, plans: list[list[str]], *, deadline: float = 120, timeout: float = 30
) -> list[Result]:
    """One keep-alive client thread per plan, POSTing its paths in order; all results, in order
    of the plans. Past ``deadline`` seconds the remaining requests are not sent; ``timeout`` is
    each request's."""
    results: list[list[Result]] = [[] for _ in plans]
    stop_at = time.monotonic() + deadline

    def client(index: int) -> None:
        with httpx.Client(base_url=base_url, timeout=timeout) as http:
            for path in plans[index]:
                if time.monotonic() > stop_at:
                    results[index].append(Result(path, None, None, "not sent (deadline)"))
                    continue
                try:
                    response = http.post(path)
                except httpx.HTTPError as error:
                    results[index].append(
                        Result(path, None, None, f"{type(error).__name__}: {error}")
                    )
                    continue
                try:
                    body: Any = response.json()
                except ValueError:
                    body = response.text
                results[index].append(Result(path, response.status_code, body))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(plans))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [result for per_client in results for result in per_client]
