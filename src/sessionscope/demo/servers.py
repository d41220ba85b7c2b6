"""A web server in a subprocess: start it on a free port, wait until it answers, stop it.

Shared by the demo's web section and the test suite's server tests (``tests/servers``), which is
why it needs nothing beyond the standard library: the demo must run from an installed package
where neither httpx nor the tests exist. The servers themselves (gunicorn, uvicorn) are run as
``python -m gunicorn`` / ``python -m uvicorn`` with the current interpreter, so they are whatever
that environment has installed.

:func:`launched` finds a port by binding port 0, starts the command on it, polls ``GET /health``
until the application answers, and stops the process it started (terminate, then kill after a
timeout) whatever happens. A start that fails (another process took the port meanwhile) is
retried on another port.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    """A server subprocess started by :func:`launched`."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def log(self) -> str:
        """Everything the server printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10) -> Any:
        """``GET path``: the JSON body; raises :class:`OSError` unless the status is 2xx."""
        status, body = request("127.0.0.1", self.port, "GET", path, timeout=timeout)
        if not 200 <= status < 300:
            raise OSError(f"GET {path}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)


def request(host: str, port: int, method: str, path: str, *, timeout: float) -> tuple[int, bytes]:
    """One request on a connection of its own: (status, body)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _start(
    command: list[str], port: int, env: Mapping[str, str], log_path: Path, cwd: Path | None
) -> tuple[Server, IO[bytes]]:
    full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", **env}
    log = log_path.open("ab")
    process = subprocess.Popen(command, cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    return Server(process, f"http://127.0.0.1:{port}", log_path), log


def _answers(server: Server, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request("127.0.0.1", server.port, "GET", "/health", timeout=1)[0] == 200:
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


class ServerDidNotStart(RuntimeError):
    """The server exited or never answered ``/health`` on every attempt; its log's tail says why."""


@contextlib.contextmanager
def launched(
    name: str,
    command_for: Callable[[int], list[str]],
    env: Mapping[str, str],
    log_path: Path,
    *,
    attempts: int = 3,
    timeout: float = 30,
    cwd: Path | None = None,
) -> Iterator[Server]:
    """The server ``command_for(port)`` starts, on a free 127.0.0.1 port, until the block ends.

    The port is found by binding port 0 and released before the server binds it; if another
    process took it meanwhile, the server exits and the start is retried on another port.
    """
    for _ in range(attempts):
        port = free_port()
        server, log = _start(command_for(port), port, env, log_path, cwd)
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
        raise ServerDidNotStart(
            f"{name} did not start; its log:\n{log_path.read_text(errors='replace')[-5000:]}"
        )
    try:
        yield server
    finally:
        stop(server)


def gunicorn_command(app: str, options: Sequence[str]) -> Callable[[int], list[str]]:
    """``python -m gunicorn`` serving ``app`` with ``options``, for :func:`launched`.

    Keep-alive connections stay open across the load (so a connection's greenlet serves request
    after request, the case that needs a boundary per request); warnings only in the log.
    """

    def command(port: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--keep-alive",
            "30",
            "--graceful-timeout",
            "5",
            "--timeout",
            "60",
            "--log-level",
            "warning",
            *options,
            app,
        ]

    return command


def uvicorn_command(app: str, options: Sequence[str]) -> Callable[[int], list[str]]:
    """``python -m uvicorn --factory app`` with ``options`` (``["--loop", "uvloop"]``)."""

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
            *options,
        ]

    return command
