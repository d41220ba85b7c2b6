"""A server in a subprocess: start uvicorn, put concurrent HTTP load on it, stop it.

:func:`running` starts ``uvicorn`` on 127.0.0.1 on a free port (found by binding port 0), waits
until the application answers, and stops the process it started (terminate, then kill after a
timeout) whatever happens. :func:`drive` sends a list of requests with bounded concurrency:
``clients`` threads, each with its own keep-alive ``httpx.Client``, taking the next request from a
shared queue until none is left or the deadline has passed.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    """A server subprocess started by :func:`running`."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10) -> Any:
        response = httpx.get(self.base_url + path, timeout=timeout)
        response.raise_for_status()
        return response.json()


def _start(
    command: list[str], port: int, env: Mapping[str, str], log_path: Path
) -> tuple[Server, Any]:
    full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", **env}
    log = log_path.open("ab")
    process = subprocess.Popen(
        command, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT
    )
    return Server(process, f"http://127.0.0.1:{port}", log_path), log


def _answers(server: Server, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.base_url + "/health", timeout=1).status_code == 200:
                return True
        time.sleep(0.05)
    return False


def stop(server: Server, timeout: float = 15) -> int:
    """Stop the server process (terminate, then kill); its exit code."""
    process = server.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode


@contextlib.contextmanager
def launched(
    name: str,
    command_for: Callable[[int], list[str]],
    env: Mapping[str, str],
    log_path: Path,
    *,
    attempts: int = 3,
    timeout: float = 30,
) -> Iterator[Server]:
    """The server ``command_for(port)`` starts, on a free 127.0.0.1 port, until the block ends.

    The port is found by binding port 0 and released before the server binds it; if another
    process took it meanwhile, the server exits and the start is retried on another port.
    """
    for _ in range(attempts):
        port = free_port()
        server, log = _start(command_for(port), port, env, log_path)
        try:
            if _answers(server, timeout):
                break
            stop(server)
        except BaseException:
            stop(server)
            raise
        finally:
            log.close()
    else:
        raise RuntimeError(f"{name} did not start; its log:\n{log_path.read_text()[-5000:]}")
    try:
        yield server
    finally:
        stop(server)


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

    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            *args,
        ]

    with launched(app, command, env, log_path, attempts=attempts, timeout=timeout) as server:
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
