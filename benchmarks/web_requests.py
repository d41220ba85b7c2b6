"""Requests per second of one app with sessionscope's integration against a hand-written session.

    python benchmarks/web_requests.py            # every case, about 10 minutes
    python benchmarks/web_requests.py --quick    # under a minute, noisier
    python benchmarks/web_requests.py --same     # the control: by-hand against by-hand
    python benchmarks/web_requests.py -k gevent  # only the cases whose label has "gevent"
    python benchmarks/web_requests.py -k gunicorn --candidate registry   # a layer alone
    python benchmarks/web_requests.py -k gunicorn --candidate imported   # control: import only

Each case serves the same application in two real server processes, one per variant (see
``web_wsgi_app.py`` and ``web_asgi_app.py``): ``sessionscope`` (the middleware, and FastAPI's
dependency, over sessionscope's registry) and ``by-hand`` (a plain Session opened per request, used
and closed in a ``finally``). Both servers run at once on free 127.0.0.1 ports; a load generator in
this process drives one at a time with ``clients`` keep-alive connections, each sending its next
request as soon as the previous answer is in, for a fixed duration. Rounds are interleaved
(A B, B A, ...), and the ratio is the median of the per-round ratios sessionscope / by-hand of
requests per second (higher is better for sessionscope; below 0.97 is flagged). A process's
speed depends on its memory layout for as long as it lives (two identical servers differ by up to
8%), so the rounds are spread over several pairs of servers started one pair after another, each
pair with its own hash seed; each pair's own ratio is printed too, and a 95% interval of the
ratio from resampling whole pairs (:func:`interval_over_pairs`): a ratio whose interval reaches
0.97 is not told apart from it. The load generator runs on CPU 0 and the servers on the other
CPUs (:func:`pin_server`).

Before timing, every server is checked: a few requests must answer with the item they read and the
variant that served them, and write exactly one row each. At the end the rows each variant wrote
must equal the 200 responses counted for it. The database is PostgreSQL (a schema of its own,
dropped at the end) when it answers at ``BENCH_WEB_PG_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), else a SQLite file in a temporary
directory; the output says which.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _timing import Comparison
from _web_work import (
    BY_HAND,
    IMPORTED,
    ITEMS,
    LAYERS,
    REGISTRY,
    SESSIONSCOPE,
    Base,
    Hit,
    Item,
    item_name,
)
from sqlalchemy import create_engine, delete, func, insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
if str(REPO) not in sys.path:  # the servers' launcher lives in the test suite: reuse it
    sys.path.append(str(REPO))

from tests.servers.gunicorn_process import gunicorn  # noqa: E402
from tests.servers.process import Server, running  # noqa: E402

PG_URL = os.environ.get("BENCH_WEB_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TARGET = 0.97
"""The issue's target: sessionscope's requests/s at least 0.97x the hand-written variant's."""
CHECK_REQUESTS = 10
"""Requests per server checked one by one (body and rows written) before anything is timed."""


@dataclass(frozen=True)
class WebSettings:
    """How hard to measure: ``pairs`` pairs of servers started one pair after another, each
    pair timed in ``rounds`` interleaved rounds of two ``seconds``-long samples with ``clients``.
    """

    seconds: float = 1.0
    rounds: int = 4
    pairs: int = 10
    warmup_seconds: float = 1.0
    clients: int = 8


FULL = WebSettings()
QUICK = WebSettings(seconds=0.5, rounds=4, pairs=2, warmup_seconds=0.5)
SMOKE = WebSettings(seconds=0.05, rounds=2, pairs=1, warmup_seconds=0.05, clients=2)
SETTINGS = {"full": FULL, "quick": QUICK, "smoke": SMOKE}


@dataclass(frozen=True)
class WebCase:
    """A server and an application; ``server`` is ``uvicorn`` or ``gunicorn`` (with options)."""

    label: str
    server: str
    app: str
    env: Mapping[str, str] = field(default_factory=dict)
    options: tuple[str, ...] = ()


def gunicorn_options(worker: str, clients: int) -> tuple[str, ...]:
    if worker == "gthread":  # one thread per client connection: none waits for a thread
        return ("-k", "gthread", "-w", "1", "--threads", str(clients))
    return ("-k", worker, "-w", "1", "--worker-connections", "100")


def build_cases(clients: int) -> list[WebCase]:
    asgi, wsgi = "web_asgi_app:create_app", "web_wsgi_app:create_app()"
    return [
        WebCase("uvicorn FastAPI def, Session", "uvicorn", asgi, {"BENCH_WEB_SESSION": "sync"}),
        WebCase(
            "uvicorn FastAPI async def, AsyncSession",
            "uvicorn",
            asgi,
            {"BENCH_WEB_SESSION": "async"},
        ),
        WebCase(
            "gunicorn gthread WSGI",
            "gunicorn",
            wsgi,
            options=gunicorn_options("gthread", clients),
        ),
        WebCase(
            "gunicorn gevent WSGI", "gunicorn", wsgi, options=gunicorn_options("gevent", clients)
        ),
    ]


CASES = build_cases(FULL.clients)


# -- the database --------------------------------------------------------------------------------


class Database:
    """The benchmark's tables, seeded with ``ITEMS`` items: a PostgreSQL schema or a SQLite file."""

    def __init__(self, directory: Path, *, sqlite: bool = False) -> None:
        self.schema: str | None = None
        if not sqlite and postgres_answers():
            self.schema = f"bench_web_{uuid.uuid4().hex[:10]}"
            self.url = f"{PG_URL}?options=-csearch_path%3D{self.schema}"
            self.kind = "PostgreSQL (psycopg)"
            admin = create_engine(PG_URL, poolclass=NullPool)
            with admin.begin() as conn:
                conn.execute(text(f'create schema "{self.schema}"'))
            admin.dispose()
        else:
            self.url = f"sqlite:///{directory / 'web.db'}"
            self.kind = "SQLite file (PostgreSQL unreachable)"
        self.engine: Engine = create_engine(self.url, poolclass=NullPool)
        if self.url.startswith("sqlite"):
            with self.engine.begin() as conn:
                conn.exec_driver_sql("pragma journal_mode=wal")
        Base.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            conn.execute(
                insert(Item), [{"id": i, "name": item_name(i)} for i in range(1, ITEMS + 1)]
            )

    def hits(self, tag: str) -> int:
        with self.engine.connect() as conn:
            count = conn.scalar(select(func.count()).where(Hit.tag == tag))
        return int(count or 0)

    def drop(self) -> None:
        self.engine.dispose()
        if self.schema is not None:
            admin = create_engine(PG_URL, poolclass=NullPool)
            with admin.begin() as conn:
                conn.execute(text(f'drop schema "{self.schema}" cascade'))
            admin.dispose()


def postgres_answers() -> bool:
    try:
        engine = create_engine(PG_URL, poolclass=NullPool, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception:  # noqa: BLE001 - anything means: not reachable
        return False
    return True


# -- the load ------------------------------------------------------------------------------------


class LoadError(RuntimeError):
    """A response that was not a complete ``200``, or a connection the server closed."""


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


@dataclass
class _Connection:
    sock: socket.socket
    next_index: int
    buffer: bytes = b""


def load(port: int, seconds: float, clients: int, *, first: int = 0) -> tuple[int, float]:
    """Drive the server on ``port`` for ``seconds``: (requests answered 200, elapsed seconds).

    ``clients`` keep-alive connections, in one thread with a selector (so the generator costs
    little CPU next to the server): each sends ``POST /work/{item}`` and, as soon as the answer is
    complete, the next one, until ``seconds`` have passed; then the requests in flight finish.
    The elapsed time runs from the first request sent to the last answer received.
    """
    requests = [
        f"POST /work/{1 + n % ITEMS} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Length: 0\r\n\r\n".encode()
        for n in range(ITEMS)
    ]
    selector = selectors.DefaultSelector()
    connections: list[_Connection] = []
    try:
        for n in range(clients):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            connections.append(_Connection(sock, first + n))
            selector.register(sock, selectors.EVENT_READ, connections[-1])
        done, active = 0, len(connections)
        started = time.perf_counter()
        stop_at = finished = started + seconds
        for connection in connections:
            connection.sock.sendall(requests[connection.next_index % ITEMS])
        while active:
            events = selector.select(timeout=30)
            if not events:
                raise LoadError(f"no answer from port {port} for 30 s")
            for key, _ in events:
                connection = key.data
                data = connection.sock.recv(65536)
                if not data:
                    raise LoadError(f"port {port} closed a keep-alive connection")
                connection.buffer += data
                end = connection.buffer.find(b"\r\n\r\n")
                if end < 0:
                    continue
                head = connection.buffer[:end]
                length = _CONTENT_LENGTH.search(head)
                if length is None:
                    raise LoadError(f"no Content-Length in {head!r}")
                total = end + 4 + int(length.group(1))
                if len(connection.buffer) < total:
                    continue
                if not head.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")):
                    raise LoadError(f"port {port} answered {connection.buffer[:total]!r}")
                if len(connection.buffer) > total:
                    raise LoadError(f"port {port} sent more than one answer to one request")
                connection.buffer = b""
                done += 1
                now = time.perf_counter()
                if now < stop_at:
                    connection.next_index += clients
                    connection.sock.sendall(requests[connection.next_index % ITEMS])
                else:
                    selector.unregister(connection.sock)
                    finished = now
                    active -= 1
        return done, finished - started
    finally:
        selector.close()
        for connection in connections:
            connection.sock.close()


# -- one case ------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One server: its variant, the tag of its rows and answers, and what it answered."""

    variant: str
    tag: str
    server: Server
    answered: int = 0
    rps: list[float] = field(default_factory=list)
    timed_requests: int = 0
    timed_cpu: float = 0.0
    """Requests of the timed rounds, and the CPU seconds the server's processes used in them."""

    @property
    def port(self) -> int:
        return int(self.server.base_url.rsplit(":", 1)[1])

    def drive(self, seconds: float, clients: int, *, timed: bool = True) -> float:
        cpu = server_cpu(self.server.process.pid)
        done, elapsed = load(self.port, seconds, clients, first=self.answered)
        if timed:
            self.timed_cpu += server_cpu(self.server.process.pid) - cpu
            self.timed_requests += done
        self.answered += done
        return done / elapsed


DRIVER_CPUS = {0}
"""Where the load generator runs (when the machine has more than one CPU and Linux's affinity
calls): apart from the servers, so that neither takes the other's caches. The servers run on
the other CPUs; PostgreSQL's backends where the kernel puts them."""


PINNED = (
    f"; load generator on CPU {', '.join(map(str, sorted(DRIVER_CPUS)))}, servers on the others"
)


def pinning() -> bool:
    return hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1


def pin_driver() -> None:
    """Pin the load generator (this process's calling thread) to :data:`DRIVER_CPUS`."""
    if pinning():
        os.sched_setaffinity(0, DRIVER_CPUS)


def pin_server(pid: int) -> None:
    """Pin a server's processes and threads (``pid`` and its descendants) off the driver's
    CPUs; the threads it starts later inherit that."""
    if not pinning():
        return
    cpus = set(range(os.cpu_count() or 1)) - DRIVER_CPUS
    todo = [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):  # a thread or process that ended meanwhile
            for task in Path(f"/proc/{current}/task").iterdir():
                os.sched_setaffinity(int(task.name), cpus)
                todo += [int(c) for c in (task / "children").read_text().split()]


def server_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` and its children (a gunicorn
    master and its worker): from /proc, in clock ticks; 0 where there is no /proc."""
    ticks = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK") if ticks else 0.0


@dataclass
class WebResult:
    case: WebCase
    database: str
    settings: WebSettings
    rps: Comparison
    """anchor: by-hand requests/s per round; candidate: sessionscope's."""
    rows: dict[str, int]
    """Rows each server wrote (by tag), all of them checked against the 200 responses counted."""
    cpu_us: tuple[float, float] = (0.0, 0.0)
    """CPU µs per request of each server's processes over the timed rounds (by-hand's first)."""
    guard: str = "raise"
    """The sessionscope registry's guard."""
    urls: tuple[str, ...] = ()
    """Where the last pair of servers listened (all are stopped when the result is returned)."""
    pair_ratios: tuple[float, ...] = ()
    """Each pair of servers' own ratio (median of its rounds'): the spread between processes."""
    interval: tuple[float, float] = (0.0, 0.0)
    """Where :attr:`ratio` would land 95% of the time with other server processes: see
    :func:`interval_over_pairs`."""

    @property
    def names(self) -> tuple[str, str]:
        """The anchor's and the candidate's tags: by-hand and sessionscope, or the control's."""
        anchor, candidate = self.rows
        return anchor, candidate

    @property
    def ratio(self) -> float:
        """Median of per-round ratios sessionscope / by-hand requests/s, over every pair's
        rounds (each pair has as many)."""
        return self.rps.ratio

    @property
    def ratio_best(self) -> float:
        """Best round against best round (max/max: noise only ever costs requests)."""
        return max(self.rps.candidate) / max(self.rps.anchor)

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.label,
            "database": self.database,
            "clients": self.settings.clients,
            "seconds_per_sample": self.settings.seconds,
            "by_hand_rps_median": self.rps.anchor_median,
            "sessionscope_rps_median": self.rps.candidate_median,
            "ratio_median": self.ratio,
            "ratio_best": self.ratio_best,
            "by_hand_rps_rounds": self.rps.anchor,
            "sessionscope_rps_rounds": self.rps.candidate,
            "rows_written": self.rows,
            "contenders": list(self.names),
            "guard": self.guard,
            "server_cpu_us_per_request": list(self.cpu_us),
            "servers": list(self.urls),
            "pair_ratios": list(self.pair_ratios),
            "ratio_interval_95": list(self.interval),
        }


def check(contender: Contender, database: Database) -> None:
    """A few requests one by one: the right body, one row written each (before any timing)."""
    before = database.hits(contender.tag)
    with httpx.Client(base_url=contender.server.base_url, timeout=30) as client:
        for item in range(1, CHECK_REQUESTS + 1):
            response = client.post(f"/work/{item}")
            expected = {"variant": contender.tag, "item": item_name(item)}
            if response.status_code != 200 or response.json() != expected:
                raise RuntimeError(
                    f"{contender.tag}: POST /work/{item} answered {response.status_code}"
                    f" {response.text!r}, expected 200 {expected}"
                    f"\nserver log:\n{contender.server.log()[-3000:]}"
                )
    contender.answered += CHECK_REQUESTS
    written = database.hits(contender.tag) - before
    if written != CHECK_REQUESTS:
        raise RuntimeError(
            f"{contender.tag}: {CHECK_REQUESTS} requests wrote {written} rows, not one each"
        )


def server_env(
    case: WebCase,
    variant: str,
    tag: str,
    database: Database,
    pool: int,
    *,
    guard: str = "raise",
    seed: int = 0,
) -> dict[str, str]:
    """What a case's server process is configured with (see ``_web_work.py``)."""
    return {
        "BENCH_WEB_URL": database.url,
        "BENCH_WEB_VARIANT": variant,
        "BENCH_WEB_TAG": tag,
        "BENCH_WEB_GUARD": guard,
        "BENCH_WEB_POOL": str(pool),
        "PYTHONHASHSEED": str(seed),  # two servers of a run differ by their variant only
        **case.env,
    }


@contextlib.contextmanager
def serve(
    case: WebCase,
    variant: str,
    tag: str,
    database: Database,
    logs: Path,
    pool: int,
    *,
    guard: str = "raise",
    seed: int = 0,
) -> Iterator[Server]:
    """The case's server for ``variant``, on a free port, stopped when the block ends."""
    env = server_env(case, variant, tag, database, pool, guard=guard, seed=seed)
    log = logs / f"{re.sub(r'[^a-z0-9]+', '-', case.label.lower())}-{tag}-{seed}.log"
    if case.server == "uvicorn":
        with running(case.app, env, log, args=["--app-dir", str(BENCHMARKS)]) as server:
            yield server
    else:
        options = ["--pythonpath", str(BENCHMARKS), *case.options]
        with gunicorn(case.app, env, log, options) as server:
            try:
                yield server
            finally:  # SIGQUIT: gunicorn's quick shutdown (the launcher's SIGTERM is graceful)
                if server.process.poll() is None:
                    server.process.send_signal(signal.SIGQUIT)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        server.process.wait(10)


def enter_together(
    stack: contextlib.ExitStack, managers: Sequence[contextlib.AbstractContextManager[Server]]
) -> list[Server]:
    """Enter ``managers`` at once, each in a thread (servers start in parallel); ``stack`` exits
    those that started, also when another failed to."""
    entered: list[Server | None] = [None] * len(managers)
    errors: list[BaseException] = []

    def enter(index: int) -> None:
        try:
            entered[index] = managers[index].__enter__()
        except BaseException as error:  # noqa: BLE001 - raised below, in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=enter, args=(i,)) for i in range(len(managers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    servers = []
    for manager, server in zip(managers, entered, strict=True):
        if server is not None:
            stack.push(manager.__exit__)
            servers.append(server)
    if errors:
        raise errors[0]
    return servers


def run_case(
    case: WebCase,
    settings: WebSettings,
    database: Database,
    logs: Path,
    *,
    same: bool = False,
    guard: str = "raise",
    candidate: str = SESSIONSCOPE,
) -> WebResult:
    """``settings.pairs`` pairs of the case's two servers, one pair after another (see
    :func:`run_pair`): every round of every pair, the servers' CPU and rows, in one result.

    Why pairs: two servers of the same code, seed and load differ by up to 8% in requests/s for
    as long as they live (the control, ``--same``: pairs from 0.858 to 1.083 in one run; with
    address randomisation off the spread shrinks to 1.00-1.03 and a steady bias appears, set by
    the environment's size). Their memory layout decides which lookups the interpreter's caches
    lose. More rounds do not average that out; more processes do. Each pair runs with its own
    hash seed (both servers the same one).
    """
    pairs = [(BY_HAND, BY_HAND), (BY_HAND, f"{BY_HAND}-2") if same else (candidate, candidate)]
    contenders: list[list[Contender]] = []
    for seed in range(settings.pairs):
        contenders.append(run_pair(case, settings, database, logs, pairs, seed, guard=guard))
    hand = [pair[0] for pair in contenders]
    scoped = [pair[1] for pair in contenders]
    cpu = [
        sum(c.timed_cpu for c in side) * 1e6 / max(sum(c.timed_requests for c in side), 1)
        for side in (hand, scoped)
    ]
    per_pair = [Comparison(a.rps, b.rps) for a, b in zip(hand, scoped, strict=True)]
    return WebResult(
        case,
        database.kind,
        settings,
        Comparison([rps for c in hand for rps in c.rps], [rps for c in scoped for rps in c.rps]),
        {
            c.tag: sum(s.answered for s in side)
            for c, side in ((hand[0], hand), (scoped[0], scoped))
        },
        cpu_us=(cpu[0], cpu[1]),
        guard=guard,
        urls=tuple(c.server.base_url for c in contenders[-1]),
        pair_ratios=tuple(pair.ratio for pair in per_pair),
        interval=interval_over_pairs([pair.round_ratios for pair in per_pair]),
    )


def interval_over_pairs(
    per_pair: Sequence[Sequence[float]], *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A 95% bootstrap interval of the ratio (the median of all rounds' ratios), resampling
    whole pairs of servers.

    Why pairs and not rounds: the rounds of one pair share two processes, whose memory layouts
    set their speed for as long as they live (two identical servers differ by up to 20% in CPU
    per request on this machine), so a pair is the independent sample. With few pairs the
    interval is wide, and a ratio whose interval reaches 0.97 is not told apart from it. Seeded:
    the same rounds give the same interval.
    """
    if not per_pair or not all(per_pair):
        return (0.0, 0.0)
    draw = random.Random(seed).choice
    medians = sorted(
        statistics.median(r for pair in [draw(per_pair) for _ in per_pair] for r in pair)
        for _ in range(resamples)
    )
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def run_pair(
    case: WebCase,
    settings: WebSettings,
    database: Database,
    logs: Path,
    pairs: Sequence[tuple[str, str]],
    seed: int,
    *,
    guard: str = "raise",
) -> list[Contender]:
    """Both servers up (hash seed ``seed``), checked, warmed up, then interleaved rounds (A B,
    B A, ...); their rows checked against their 200 answers, then deleted; both stopped. An odd
    pair starts, checks and warms up its servers in the other order (the variants swap places);
    the contenders are returned in the order of ``pairs``."""
    order = list(pairs) if seed % 2 == 0 else list(reversed(pairs))
    with contextlib.ExitStack() as stack:
        pool = settings.clients + 2
        servers = enter_together(
            stack,
            [serve(case, v, tag, database, logs, pool, guard=guard, seed=seed) for v, tag in order],
        )
        contenders = [
            Contender(variant, tag, server)
            for (variant, tag), server in zip(order, servers, strict=True)
        ]
        for server in servers:
            pin_server(server.process.pid)
        for contender in contenders:
            check(contender, database)
            contender.drive(settings.warmup_seconds, settings.clients, timed=False)
        for i in range(settings.rounds):
            for contender in contenders if (i + seed) % 2 == 0 else reversed(contenders):
                contender.rps.append(contender.drive(settings.seconds, settings.clients))
        rows = {c.tag: database.hits(c.tag) for c in contenders}
        for contender in contenders:
            if rows[contender.tag] != contender.answered:
                raise RuntimeError(
                    f"{case.label}, {contender.tag}: {contender.answered} requests answered"
                    f" 200 but {rows[contender.tag]} rows written"
                )
    with database.engine.begin() as conn:  # the next pair starts from the same table
        conn.execute(delete(Hit))
    return contenders if order == list(pairs) else contenders[::-1]


@contextlib.contextmanager
def database(directory: Path, *, sqlite: bool = False) -> Iterator[Database]:
    """The benchmark's database (a SQLite file goes in ``directory``), dropped after the block."""
    made = Database(directory, sqlite=sqlite)
    try:
        yield made
    finally:
        made.drop()


def run_cases(
    cases: Sequence[WebCase],
    settings: WebSettings,
    *,
    sqlite: bool = False,
    same: bool = False,
    guard: str = "raise",
    candidate: str = SESSIONSCOPE,
) -> Iterator[WebResult]:
    """Each case's result as it comes, on one database made for the run and dropped after it."""
    pin_driver()
    with tempfile.TemporaryDirectory(prefix="sessionscope-web-") as directory:
        with database(Path(directory), sqlite=sqlite) as made:
            for case in cases:
                yield run_case(
                    case,
                    settings,
                    made,
                    Path(directory),
                    same=same,
                    guard=guard,
                    candidate=candidate,
                )


# -- report --------------------------------------------------------------------------------------


def header(settings: WebSettings, database: str, names: tuple[str, str]) -> str:
    load = " / ".join(f"{n:.1f}" for n in os.getloadavg())
    return (
        f"\nWeb requests/s: the same app with sessionscope's integration and with a hand-written"
        f" session per request,\ntwo servers side by side, {settings.pairs} pair(s) of servers"
        f" one after another, each timed in {settings.rounds} interleaved rounds of"
        f" {settings.seconds:g} s with {settings.clients} keep-alive clients; database:"
        f" {database}.\nratio = median of per-round ratios {names[1]} / {names[0]} over all"
        f" pairs (requests/s; below {TARGET} flagged), a 95% interval from resampling the pairs,"
        f" then each pair's own."
        f" Load average now: {load} ({os.cpu_count()} CPUs{PINNED if pinning() else ''}).\n"
    )


def verdict(result: WebResult) -> str:
    """How the ratio stands against the target, given its interval over pairs."""
    if result.ratio >= TARGET:
        return ""
    if result.interval[1] >= TARGET:
        return f"  < {TARGET} target, not resolved (its interval reaches it)"
    return f"  < {TARGET} target"


def line(result: WebResult) -> str:
    flag = verdict(result)
    anchor, candidate = result.names
    low, high = result.interval
    return (
        f"{result.case.label:<40} {anchor} {result.rps.anchor_median:7,.0f} req/s"
        f"  {candidate} {result.rps.candidate_median:7,.0f} req/s"
        f"  ratio {result.ratio:.3f} [95% over pairs {low:.3f}-{high:.3f}]"
        f" (pairs {', '.join(f'{r:.3f}' for r in result.pair_ratios)})"
        f"  server CPU/request {result.cpu_us[0]:,.0f} / {result.cpu_us[1]:,.0f} us{flag}"
    )


def markdown(results: Sequence[WebResult]) -> list[str]:
    rows = [
        "| Server, endpoint | Database | hand-written req/s | sessionscope req/s | Ratio"
        " | 95% over pairs | server CPU µs/request, hand-written / sessionscope |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows += [
        f"| {r.case.label} | {r.database.split(' (')[0]} | {r.rps.anchor_median:,.0f}"
        f" | {r.rps.candidate_median:,.0f} | {r.ratio:.3f}"
        f" | {r.interval[0]:.3f}-{r.interval[1]:.3f}"
        f" | {r.cpu_us[0]:,.0f} / {r.cpu_us[1]:,.0f} |"
        for r in results
    ]
    return rows


def run(
    cases: Sequence[WebCase],
    settings: WebSettings,
    *,
    sqlite: bool = False,
    same: bool = False,
    guard: str = "raise",
    candidate: str = SESSIONSCOPE,
    echo: Callable[[str], None] = print,
) -> list[WebResult]:
    """Run ``cases``, printing the header and each case's line as it comes."""
    results: list[WebResult] = []
    runs = run_cases(cases, settings, sqlite=sqlite, same=same, guard=guard, candidate=candidate)
    for result in runs:
        if not results:
            note = "" if guard == "raise" else f"The sessionscope registry has guard={guard!r}.\n"
            note += LAYER_NOTES.get(candidate, "")
            echo(header(settings, result.database, result.names) + note)
        results.append(result)
        echo(line(result))
    return results


LAYER_NOTE = (
    "The candidate is sessionscope's registry alone: Session(), then remove() in a finally; no"
    " middleware, unit of work or scope.\n"
)
IMPORTED_NOTE = (
    "The candidate is the by-hand app in a process that imported sessionscope (and its WSGI"
    " integration) and made a registry it never calls: a control.\n"
)
LAYER_NOTES = {REGISTRY: LAYER_NOTE, IMPORTED: IMPORTED_NOTE}


def select_cases(text_: str, clients: int) -> list[WebCase]:
    return [c for c in build_cases(clients) if text_.lower() in f"web {c.label}".lower()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, shorter samples (noisier)")
    size.add_argument("--smoke", action="store_true", help="tiny run: only checks the code works")
    parser.add_argument("-k", metavar="TEXT", default="", help="only cases whose label has TEXT")
    parser.add_argument("--sqlite", action="store_true", help="SQLite even if PostgreSQL answers")
    parser.add_argument(
        "--same",
        action="store_true",
        help="control: a second by-hand server in place of sessionscope's (the method's noise)",
    )
    parser.add_argument(
        "--guard",
        choices=("raise", "warn", "off"),
        default="raise",
        help="the sessionscope registry's guard (default: raise, its default): its share",
    )
    parser.add_argument(
        "--candidate",
        choices=(SESSIONSCOPE, *LAYERS),
        default=SESSIONSCOPE,
        help="what is compared with by-hand: the integration (default), the registry alone, or"
        " by-hand with sessionscope imported (a control); the last two for gunicorn cases only",
    )
    args = parser.parse_args(argv)
    settings = SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"]
    started = time.perf_counter()
    cases = select_cases(args.k, settings.clients)
    if args.candidate in LAYERS and any(case.server != "gunicorn" for case in cases):
        parser.error(
            f"--candidate {args.candidate} is for the WSGI app: add -k gunicorn (or gthread)"
        )
    results = run(
        cases,
        settings,
        sqlite=args.sqlite,
        same=args.same,
        guard=args.guard,
        candidate=args.candidate,
    )
    print("\n" + "\n".join(markdown(results)))
    print(f"\n({time.perf_counter() - started:.0f} s)")
    ratios = [r.ratio for r in results]
    if ratios:
        print(f"median ratio over the cases: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
