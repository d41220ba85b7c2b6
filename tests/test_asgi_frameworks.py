"""SessionScopeMiddleware under Litestar and Quart, served by uvicorn, under concurrent load.

``tests/servers/litestar_app.py`` and ``tests/servers/quart_app.py`` (their shared parts in
``tests/servers/framework_app.py``) run in a uvicorn subprocess on PostgreSQL, each behind two
``SessionScopeMiddleware`` layers (a sync ``scoped_session`` for the ``def`` handlers that run in
worker threads, an ``async_scoped_session`` for the ``async def`` ones and the WebSocket), added
the way each framework's documentation adds ASGI middleware. Keep-alive clients send write, slow (a
sleep between flush and commit), read, rejected (409) and failing (500) requests at once, while
WebSocket clients hold conversations of their own. With ``commit=True`` (the middleware commits
below 400) and ``commit=False`` (the handlers commit, then flush a row nobody commits). Checked,
as ``tests/test_asgi_uvicorn.py`` does:

- no unexpected response: the only 4xx/5xx are the rejecting and failing endpoints' own;
- every acknowledged row committed exactly once (the middleware's commit or the handler's, and
  Litestar's background task's own), no row of a rejected or failed request, no row left
  uncommitted by a ``commit=False`` handler;
- no request saw another's objects, transaction or ``Session.info`` (the application checks), and
  each WebSocket had one session of its own for the whole conversation (its replies carry its tag);
- a WebSocket whose handler raised committed nothing (Litestar closes it with 4500; Quart closes
  it normally, so its handler works in a savepoint, the documented recipe);
- afterwards no connection out and no ``idle in transaction`` backend of the server;
- lifespan: startup ran (uvicorn ``--lifespan on`` fails the start otherwise) and shutdown ran
  (the line it prints is in the log after the server stopped).

``make test`` runs each framework once per policy, 240 requests from 20 clients and 8 WebSockets
(about 5 s a case); the larger runs on both loops are marked slow.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from sessionscope.asgi import SessionScopeMiddleware
from tests import test_asgi_middleware as in_process
from tests import test_fastapi_uvicorn as fastapi_uvicorn
from tests.servers.framework_app import LEFT_OVER, SHUTDOWN_LINE, WS_FIRST_ROW
from tests.servers.process import Result, drive, running
from tests.test_asgi_uvicorn import as_expected as answered_as_expected
from tests.test_asgi_uvicorn import request_id, settled
from tests.test_fastapi_uvicorn import Database

pytestmark = pytest.mark.timeout(180)

db = in_process.db  # the fixture: a sync or async registry (SQLite, aiosqlite, psycopg, asyncpg)

APPS = {
    "litestar": "tests.servers.litestar_app:create_app",
    "quart": "tests.servers.quart_app:create_app",
}
ACTIONS = ("write", "slow", "read", "write", "reject", "slow")
"""Request i is ``ACTIONS[i // 2 % 6]`` on mode ``def`` (even i) or ``async`` (odd i)."""
FAIL_EVERY = 5  # request i fails when i % FAIL_EVERY == FAIL_EVERY - 1 (a reject never does)
WRITES_PER_SOCKET = 3


database = fastapi_uvicorn.database  # the fixture: a schema with the rows table, the server's URL


@dataclass(frozen=True)
class Load:
    """How much: rounds of ``per_round`` requests from ``clients`` keep-alive clients, and
    ``sockets`` WebSocket conversations a round alongside."""

    rounds: int = 2
    per_round: int = 120
    clients: int = 20
    sockets: int = 4


def serve(
    database: Database, tmp_path: Path, framework: str, *, commit: bool, loop: str = "asyncio"
) -> Any:
    env = {"SS_DB_URL": database.url, "SS_COMMIT": "1" if commit else "0"}
    args = ["--loop", loop, "--lifespan", "on"]
    return running(APPS[framework], env, tmp_path / "server.log", args=args)


def plan(count: int, round_: int) -> list[str]:
    paths = []
    for i in range(count):
        mode = "async" if i % 2 else "def"
        action = ACTIONS[i // 2 % len(ACTIONS)]
        fail = "/fail" if i % FAIL_EVERY == FAIL_EVERY - 1 and action != "reject" else ""
        paths.append(f"/{mode}/{action}/r{round_}x{i}{fail}")
    return paths


def as_expected(result: Result) -> bool:
    if "/reject/" in result.path and not result.path.endswith("/fail"):
        return result.status == 409 and result.body == {"rejected": request_id(result)}
    return answered_as_expected(result)


def converse(base_url: str, req: str) -> list[Any]:
    """One WebSocket: WRITES_PER_SOCKET writes, then bye; the replies (the close code last)."""
    replies: list[Any] = []
    with connect(base_url.replace("http://", "ws://") + f"/ws/{req}", open_timeout=30) as ws:
        for _ in range(WRITES_PER_SOCKET):
            ws.send("write")
            replies.append(json.loads(ws.recv(timeout=30)))
        ws.send("bye")
        try:
            replies.append(json.loads(ws.recv(timeout=30)))
        except ConnectionClosed as closed:
            replies.append(closed.rcvd.code if closed.rcvd else None)
    return replies


def needs(framework: str) -> None:
    """Quart is installed on Python 3.11+ only (see the test extras in pyproject.toml)."""
    if framework == "quart" and sys.version_info < (3, 11):
        pytest.importorskip("quart", reason="Quart is tested on Python 3.11+ (pyproject.toml)")


def run_load(
    database: Database,
    tmp_path: Path,
    framework: str,
    *,
    commit: bool,
    loop: str = "asyncio",
    load: Load = Load(),
) -> None:
    """Rounds of mixed HTTP load with WebSockets alongside, then every check of the docstring."""
    results: list[Result] = []
    socket_ids: list[str] = []
    conversations: list[list[Any]] = []
    with serve(database, tmp_path, framework, commit=commit, loop=loop) as server:
        with ThreadPoolExecutor(load.sockets) as pool:
            for round_ in range(load.rounds):
                ids = [f"w{round_}x{k}" + ("-fail" if k % 2 else "") for k in range(load.sockets)]
                talks = pool.map(converse, [server.base_url] * load.sockets, ids)
                batch = drive(server.base_url, plan(load.per_round, round_), clients=load.clients)
                results += batch
                socket_ids += ids
                conversations += list(talks)
                unexpected = [r for r in batch if not as_expected(r)]
                assert unexpected == [], (
                    f"{len(unexpected)} unexpected, first: {unexpected[:3]}\n{server.log()[-3000:]}"
                )
        stats = settled(server, len(results))
        backends = database.backends()  # while the server still runs, its pool still open
    # lifespan startup ran; every request completed; nothing out, nothing seen of another
    expected_stats = {
        "started": True,
        "commit": commit,
        "completed": len(results),
        "checkedout": 0,
        "leaks": [],
    }
    assert {k: stats[k] for k in expected_stats} == expected_stats, stats
    idle = (backends["idle in transaction"], backends["idle in transaction (aborted)"])
    assert idle == (0, 0), backends
    log = server.log()
    assert "Traceback" not in log, log[-5000:]
    assert SHUTDOWN_LINE in log, log[-3000:]  # lifespan shutdown ran

    for req, talk in zip(socket_ids, conversations, strict=True):
        # one session for the whole conversation, tagged by this socket and no other
        writes = [{"req": req, "rows": n} for n in range(1, WRITES_PER_SOCKET + 1)]
        assert talk[:WRITES_PER_SOCKET] == writes, talk
        if req.endswith("-fail"):  # closed by the framework: Litestar 4500, Quart 1000
            assert talk[-1] == {"litestar": 4500, "quart": 1000}[framework], talk
        else:
            assert talk[-1] == {"bye": req}, talk

    expected: Counter[tuple[str, int]] = Counter()
    for r in results:
        if r.status == 200:
            expected.update({(request_id(r), n): 1 for n in r.body["rows"]})
    for req in socket_ids:
        if not req.endswith("-fail"):
            expected.update({(req, WS_FIRST_ROW + k): 1 for k in range(WRITES_PER_SOCKET)})
    committed = database.committed()
    assert committed == expected, {
        "missing": sorted(set(expected) - set(committed))[:5],
        "not acknowledged (failed, rejected or left over)": sorted(set(committed) - set(expected))[
            :5
        ],
        "duplicated": [key for key, count in committed.items() if count > 1][:5],
    }
    assert not any(n == LEFT_OVER for _, n in committed)
    print(f"{framework}/{loop}/commit={commit}: {len(results)} requests, {len(socket_ids)} sockets")


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "no-commit"])
@pytest.mark.parametrize("framework", ["litestar", "quart"])
def test_framework_under_load(
    database: Database, tmp_path: Path, framework: str, commit: bool
) -> None:
    """2 rounds of 120 requests from 20 keep-alive clients, 4 WebSockets a round alongside."""
    needs(framework)
    run_load(database, tmp_path, framework, commit=commit)


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "no-commit"])
@pytest.mark.parametrize("framework", ["litestar", "quart"])
def test_framework_under_larger_load(
    database: Database, tmp_path: Path, framework: str, commit: bool, loop: str
) -> None:
    """5 rounds of 400 requests from 30 clients, 10 WebSockets a round, on both loops."""
    needs(framework)
    large = Load(rounds=5, per_round=400, clients=30, sockets=10)
    run_load(database, tmp_path, framework, commit=commit, loop=loop, load=large)


@pytest.mark.parametrize(("code", "committed"), [(1000, 1), (1001, 1), (1011, 0), (4500, 0)])
def test_websocket_closed_with_an_error_code_is_not_committed(
    db: in_process.Registries, code: int, committed: int
) -> None:
    """In process: what Litestar does with a handler's exception (close with 4500, return without
    raising) is a failure to ``commit=True``; a normal closure (1000, 1001) commits."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await db.add("socket")
        await send({"type": "websocket.close", "code": code})

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    middleware = SessionScopeMiddleware(app, db.registry, commit=True)
    asyncio.run(
        in_process.call(
            middleware, {"type": "websocket", "path": "/ws", "headers": []}, None, receive
        )
    )
    assert db.rows() == committed
    assert db.checked_out() == 0
