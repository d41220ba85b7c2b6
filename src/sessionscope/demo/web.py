"""The demo's web section: the same HTTP load on real servers, SQLAlchemy's registry vs ours.

:mod:`.web_app` runs in a server subprocess, once per contender, with the same server flags:

- gunicorn ``-k gevent --preload`` (WSGI): ``--preload`` imports the application in the master,
  before the gevent worker monkey-patches, so SQLAlchemy's ``threading.local`` registry is the
  unpatched one and every greenlet of a worker gets the same Session; and a keep-alive
  connection's greenlet serves request after request.
- uvicorn (ASGI, asyncio loop): ``async def`` endpoints with a sync Session; every request on the
  loop runs in the loop's one thread.

Keep-alive clients (threads, each with one ``http.client`` connection, standard library only) send
a fixed mix of write, slow and failing requests. Everything reported is observed: the answers the
clients got (status, body, the count of other requests' objects each request found in its
Session) and the rows in the table once the server has stopped.

The servers are optional extras: a server whose packages are missing is skipped with a note.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import queue
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, func, make_url, select
from sqlalchemy.pool import NullPool

from .measure import CONTENDERS, Contender
from .servers import Server, ServerDidNotStart, gunicorn_command, launched, uvicorn_command
from .web_app import REGISTRY_VARIABLE, URL_VARIABLE
from .workload import DemoRow

PATTERN = ("write", "slow", "slow", "fail", "write", "slow")
"""Request i is of kind PATTERN[i % 6]: half wait, one in six fails."""

REQUEST_TIMEOUT = 5.0
"""Seconds a client waits for one answer; then the request counts as hung, and its client
reconnects. Requests that share a Session (on PostgreSQL, one connection) can hang for good. The
slowest answer seen without sharing was 0.2 to 0.9 s (2 cores shared with other work, 1,200
requests, SQLite or PostgreSQL): a hung request in sessionscope's column is a finding, not noise.
The cost is in SQLAlchemy's column: a server that hangs is noticed this much later."""

RUN_DEADLINE = 20.0
"""Seconds after which a run sends no more requests (those not sent count as hung). Without
hangs 1,200 requests take 2 to 5 seconds on 2 cores."""


@dataclass(frozen=True)
class WebServer:
    """A server setup of the section: what runs, with which flags, and what it needs installed."""

    key: str
    title: str
    needs: tuple[str, ...]
    command_for: Callable[[], Callable[[int], list[str]]]
    why_sqlalchemy_shares: str
    """How SQLAlchemy's thread-local registry sees this server's concurrent requests."""

    def missing(self) -> str | None:
        """Why this server can't run here, or None."""
        absent = [name for name in self.needs if importlib.util.find_spec(name) is None]
        if absent:
            return (
                f"{' and '.join(absent)} not installed; pip install "
                f"{' '.join(absent)} (the servers are optional extras of the demo)"
            )
        return None


GUNICORN_OPTIONS = ["-k", "gevent", "-w", "2", "--worker-connections", "200", "--preload"]
UVICORN_OPTIONS = ["--loop", "asyncio"]

WEB_SERVERS: dict[str, WebServer] = {
    server.key: server
    for server in (
        WebServer(
            key="gunicorn-gevent",
            title=f"web: gunicorn {' '.join(GUNICORN_OPTIONS)} (WSGI)",
            needs=("gunicorn", "gevent"),
            command_for=lambda: gunicorn_command(
                "sessionscope.demo.web_app:create_wsgi_app()",
                [*GUNICORN_OPTIONS, "--graceful-timeout", "2"],
            ),
            why_sqlalchemy_shares=(
                "--preload imports the application before gevent patches the worker, so its "
                "threading.local is the real one and all of a worker's greenlets get one Session"
            ),
        ),
        WebServer(
            key="uvicorn",
            title=f"web: uvicorn {' '.join(UVICORN_OPTIONS)} (ASGI, async def endpoints)",
            needs=("uvicorn",),
            command_for=lambda: uvicorn_command(
                "sessionscope.demo.web_app:create_asgi_app",
                [*UVICORN_OPTIONS, "--timeout-graceful-shutdown", "2"],
            ),
            why_sqlalchemy_shares=(
                "threading.local sees only the event loop's thread, which all the requests share"
            ),
        ),
    )
}

WEB_METRIC_LABELS = {
    "rows_lost": "acknowledged rows lost",
    "failed_rows_committed": "rows of failed requests committed",
    "foreign_objects": "requests that saw others' objects",
    "errors": "unexpected errors",
    "hung": "requests hung or never sent",
}
"""The web tables' rows, in order: fields of :class:`WebMetrics` that are 0 when all is well."""


@dataclass(frozen=True)
class Load:
    """How many requests each run sends, from how many keep-alive clients at once."""

    requests: int
    clients: int

    def paths(self) -> list[str]:
        return [f"/{PATTERN[i % len(PATTERN)]}/r{i}" for i in range(self.requests)]


@dataclass
class WebMetrics:
    """What one contender did under one server."""

    rows_lost: int
    """Requests answered 200 whose row is not in the table."""
    failed_rows_committed: int
    """Rows of requests answered with the failing endpoint's 500 that are in the table."""
    foreign_objects: int
    """Requests that found objects of other requests in their Session."""
    errors: int
    """Requests answered otherwise than the endpoint answers (another status or body) or whose
    connection was dropped."""
    hung: int
    """Requests that timed out, or were not sent before the run's deadline."""
    requests: int
    acknowledged: int
    """Write and slow requests answered 200."""
    rows_committed: int
    rows_duplicated: int
    """Extra copies of a request's row (each request adds one)."""
    error_kinds: dict[str, int] = field(default_factory=dict)
    """Each kind of unexpected outcome, and how many requests had it."""
    server_tracebacks: int = 0
    """Tracebacks in the server's log (requests that raised)."""
    first_traceback: str = ""
    """The first of them (its last lines), for a report: the server's log is gone with its run."""
    seconds: float = 0.0
    slowest_answer: float = 0.0
    """Seconds, the longest a request that was answered waited for it."""

    def failures(self) -> dict[str, int]:
        """Everything measured that should be zero and is not: the table's rows, duplicates, and
        tracebacks in the server's log (a request that raised)."""
        checked = [*WEB_METRIC_LABELS, "rows_duplicated", "server_tracebacks"]
        return {key: getattr(self, key) for key in checked if getattr(self, key)}

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


TIMED_OUT = "timed out"
NOT_SENT = "not sent: the run's deadline passed"
NOT_SENT_STUCK = "not sent: the server had stopped answering"
HUNG = (TIMED_OUT, NOT_SENT, NOT_SENT_STUCK)


@dataclass
class Reply:
    """What one request got back (``error`` when nothing usable came back)."""

    path: str
    status: int | None = None
    body: Any = None
    error: str | None = None
    seconds: float = 0.0
    """From sending the request to reading the whole answer (or giving up)."""

    @property
    def kind(self) -> str:
        return self.path.split("/")[1]

    @property
    def req(self) -> str:
        return self.path.rsplit("/", 1)[1]

    def as_expected(self) -> bool:
        if not isinstance(self.body, dict):
            return False
        if self.kind == "fail":
            return self.status == 500 and self.body.get("expected_failure") == self.req
        return self.status == 200 and self.body.get("req") == self.req

    def outcome(self) -> str:
        """The kind of unexpected outcome, grouped for the report."""
        if self.error is not None:
            return self.error
        return f"HTTP {self.status} from /{self.kind}"


def unavailable() -> str | None:
    """Why the web section can't run at all here (no server installed), or None."""
    reasons = [server.missing() for server in WEB_SERVERS.values()]
    if all(reasons):
        return "; ".join(f"{key}: {why}" for key, why in zip(WEB_SERVERS, reasons, strict=True))
    return None


def run_server(url: str, server: WebServer, load: Load) -> dict[str, WebMetrics]:
    """Both contenders under ``server``, one after the other, the same load and flags."""
    return {contender.key: run_trial(url, server, contender, load) for contender in CONTENDERS}


def run_trial(url: str, server: WebServer, contender: Contender, load: Load) -> WebMetrics:
    """Empty the table, serve ``load`` with ``contender``'s variant, stop the server, measure.

    The table is read after the server stopped, so no request is still committing.
    """
    reader = create_engine(url, poolclass=NullPool)
    try:
        with reader.begin() as conn:
            conn.execute(delete(DemoRow))
        env = {URL_VARIABLE: url, REGISTRY_VARIABLE: contender.key}
        if make_url(url).get_driver_name() == "psycopg":
            # psycopg waits cooperatively under gevent only if `select` was patched before it
            # was imported; with --preload it is imported in the master, before the patch.
            env["PSYCOPG_WAIT_FUNC"] = "wait_select"
        with tempfile.TemporaryDirectory(prefix="sessionscope-demo-web-") as directory:
            log_path = Path(directory) / "server.log"
            started = time.monotonic()
            with launched(server.title, server.command_for(), env, log_path) as running:
                replies = drive(running, load)
            seconds = time.monotonic() - started
            log = log_path.read_text(errors="replace")
        with reader.connect() as conn:
            found = select(DemoRow.owner, func.count()).group_by(DemoRow.owner)
            committed = Counter({owner: int(n) for owner, n in conn.execute(found)})
    finally:
        reader.dispose()
    return measure(replies, committed, log, seconds)


def measure(replies: list[Reply], committed: Counter[str], log: str, seconds: float) -> WebMetrics:
    acknowledged = {r.req for r in replies if r.kind != "fail" and r.as_expected()}
    failed = {r.req for r in replies if r.kind == "fail" and r.as_expected()}
    unexpected = Counter(r.outcome() for r in replies if not r.as_expected())
    hung = sum(n for kind, n in unexpected.items() if kind in HUNG)
    return WebMetrics(
        rows_lost=sum(1 for req in acknowledged if not committed[req]),
        failed_rows_committed=sum(committed[req] for req in failed),
        foreign_objects=sum(
            1 for r in replies if isinstance(r.body, dict) and r.body.get("foreign", 0) > 0
        ),
        errors=sum(unexpected.values()) - hung,
        hung=hung,
        requests=len(replies),
        acknowledged=len(acknowledged),
        rows_committed=sum(committed.values()),
        rows_duplicated=sum(n - 1 for n in committed.values() if n > 1),
        error_kinds=dict(unexpected.most_common()),
        server_tracebacks=log.count("Traceback"),
        first_traceback=_first_traceback(log),
        seconds=round(seconds, 1),
        slowest_answer=round(max((r.seconds for r in replies if r.status), default=0.0), 2),
    )


def _first_traceback(log: str, lines: int = 25) -> str:
    start = log.find("Traceback")
    if start < 0:
        return ""
    found = log[start:].splitlines()
    end = next(
        (n + 1 for n, line in enumerate(found[1:], 1) if line and not line[0].isspace()), len(found)
    )
    return "\n".join(found[:end][-lines:])


def drive(server: Server, load: Load) -> list[Reply]:
    """POST every path of ``load``, ``load.clients`` at a time; the replies in path order.

    Each client thread keeps one connection alive for all its requests (reconnecting after an
    error), taking the next path from a shared queue until none is left, the deadline passed, or
    the server stopped answering: a request timed out and no request at all was answered for
    :data:`REQUEST_TIMEOUT` seconds (a server whose workers all hang would otherwise keep every
    client waiting out a timeout per request until the deadline).
    """
    paths = load.paths()
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(len(paths)):
        todo.put(index)
    replies = [Reply(path, error=NOT_SENT) for path in paths]
    stop_at = time.monotonic() + RUN_DEADLINE
    last_answer = [time.monotonic()]
    stuck = threading.Event()

    def client() -> None:
        connection = _Connection(server.port)
        try:
            while time.monotonic() < stop_at:
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                if stuck.is_set():
                    replies[index] = Reply(paths[index], error=NOT_SENT_STUCK)
                    continue
                reply = replies[index] = _post(connection, paths[index])
                now = time.monotonic()
                if reply.status is not None:
                    last_answer[0] = now
                elif reply.error == TIMED_OUT and now - last_answer[0] >= REQUEST_TIMEOUT:
                    stuck.set()
        finally:
            connection.drop()

    threads = [threading.Thread(target=client, name=f"client-{n}") for n in range(load.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return replies


class _Connection:
    """A client's keep-alive connection, opened again after an error closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.current: http.client.HTTPConnection | None = None

    def __call__(self) -> http.client.HTTPConnection:
        if self.current is None:
            self.current = http.client.HTTPConnection("127.0.0.1", self.port, REQUEST_TIMEOUT)
        return self.current

    def drop(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


def _post(connect: _Connection, path: str) -> Reply:
    started = time.monotonic()
    reply = _send(connect, path)
    reply.seconds = time.monotonic() - started
    return reply


def _send(connect: _Connection, path: str) -> Reply:
    try:
        connection = connect()
        connection.request("POST", path)
        response = connection.getresponse()
        payload = response.read()
        if response.will_close:
            connect.drop()
    except TimeoutError:
        connect.drop()
        return Reply(path, error=TIMED_OUT)
    except (OSError, http.client.HTTPException) as exc:
        connect.drop()
        return Reply(path, error=f"connection error ({type(exc).__name__})")
    try:
        body: Any = json.loads(payload)
    except ValueError:
        body = payload.decode(errors="replace")[:200]
    return Reply(path, response.status, body)


@dataclass
class WebOutcome:
    """One server of the section: its measurements, or why it did not run."""

    server: WebServer
    results: dict[str, WebMetrics] | None = None
    skipped: str | None = None
    """A package it needs is not installed: a note, not a failure."""
    broken: str | None = None
    """It was installed but could not serve (did not start): the demo could not run."""


def unreachable_from_servers(url: str) -> str | None:
    """Why servers in other processes can't share this database, or None: an in-memory SQLite
    database exists only inside the process (and connection) that made it."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        return (
            "an in-memory SQLite database can't be shared with server processes; pass a file "
            "(or leave --url out) or a server, e.g. --url postgresql+psycopg://..."
        )
    return None


def outcomes(url: str, load: Load) -> Iterator[WebOutcome]:
    """Each server with its measurements, or the reason it did not run; as each finishes."""
    for server in WEB_SERVERS.values():
        reason = unreachable_from_servers(url) or server.missing()
        if reason is not None:
            yield WebOutcome(server, skipped=reason)
            continue
        try:
            yield WebOutcome(server, results=run_server(url, server, load))
        except ServerDidNotStart as exc:
            yield WebOutcome(server, broken=str(exc))
