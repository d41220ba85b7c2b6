"""SessionScopeMiddleware in process: raw ASGI calls, one edge at a time.

The commit policy by status (committed before ``http.response.start`` is forwarded; a failing
commit raises into the app with nothing sent), exceptions in the app, a client that disconnects
mid-stream, cancellation, streaming bodies that keep their session until the body ends, lifespan
passed through untouched, WebSocket scopes, and refused arguments. Sync registries (SQLite file
and PostgreSQL) and async ones (aiosqlite and asyncpg).
"""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import scoped_session as sa_scoped_session
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import NullPool

import sessionscope
from sessionscope.asgi import SCOPE_KEY, SessionScopeMiddleware
from tests.conftest import ASYNC_PG_URL, PG_URL, sqlite_file_url
from tests.models import Base, Row

pytestmark = pytest.mark.timeout(60)

HTTP = {"type": "http", "method": "POST", "path": "/", "headers": []}


class Registries:
    """A sync or async registry on a fresh database, and a sync engine to count its rows."""

    def __init__(self, kind: str, registry: Any, counter: Engine) -> None:
        self.kind = kind
        self.registry = registry
        self.counter = counter
        self.is_async = isinstance(registry, sessionscope.async_scoped_session)
        self.out = 0
        """Connections of an async registry's pool checked out and not yet back (its events)."""
        if self.is_async:
            pool = registry.session_factory.kw["bind"].sync_engine.pool
            event.listen(pool, "checkout", self._checked_out)
            event.listen(pool, "checkin", self._checked_in)

    def _checked_out(self, *args: Any) -> None:
        self.out += 1

    def _checked_in(self, *args: Any) -> None:
        self.out -= 1

    def rows(self) -> int:
        with OrmSession(self.counter) as s:
            return int(s.scalar(select(func.count()).select_from(Row)) or 0)

    async def add(self, owner: str, *, flush: bool = True) -> Any:
        """Add a row in the request's session (flushed: in the database, uncommitted)."""
        session = self.registry()
        session.add(Row(owner=owner, n=1))
        if flush:
            if self.is_async:
                await session.flush()
            else:
                await asyncio.to_thread(session.flush)  # a job of the request's unit of work
        return session

    def checked_out(self) -> int:
        if self.is_async:  # a NullPool (see db()): it keeps no count of its own
            return self.out
        pool = self.registry.session_factory.kw["bind"].pool
        return int(pool.checkedout())


@pytest.fixture(params=["sqlite", "postgresql", "aiosqlite", "asyncpg"])
def db(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Registries]:
    """A registry per kind: sync (SQLite file, psycopg) and async (aiosqlite, asyncpg)."""
    kind = request.param
    if kind in ("sqlite", "aiosqlite"):
        sync_url, async_url, connect_args = (
            sqlite_file_url(tmp_path),
            f"sqlite+aiosqlite:///{tmp_path}/sessionscope-test.db",
            {"timeout": 30},
        )
    else:
        schema = request.getfixturevalue("pg_schema")
        sync_url = f"{PG_URL}?options=-csearch_path%3D{schema}"
        async_url, connect_args = ASYNC_PG_URL, {"server_settings": {"search_path": schema}}
    counter = create_engine(sync_url, poolclass=NullPool)
    Base.metadata.drop_all(counter)
    Base.metadata.create_all(counter)
    if kind in ("sqlite", "postgresql"):
        engine = create_engine(sync_url, pool_size=5, max_overflow=20)
        yield Registries(kind, sessionscope.scoped_session(sessionmaker(engine)), counter)
        engine.dispose()
    else:
        # Each test runs its requests in asyncio.run() after asyncio.run(): a connection pooled
        # in one loop would outlive it, and no later loop could close its transport. Every
        # connection is closed as it is checked in instead (NullPool).
        async_engine = create_async_engine(async_url, connect_args=connect_args, poolclass=NullPool)
        registry = sessionscope.async_scoped_session(async_sessionmaker(async_engine))
        yield Registries(kind, registry, counter)
        asyncio.run(async_engine.dispose())
    counter.dispose()


async def call(
    app: Any, scope: dict[str, Any] | None = None, send: Any = None, receive: Any = None
) -> list[dict[str, Any]]:
    """Call ``app`` once; what it sent (through ``send`` if given)."""
    sent: list[dict[str, Any]] = []

    async def default_receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def record(message: dict[str, Any]) -> None:
        if send is not None:
            await send(message)
        sent.append(message)

    await app(dict(scope or HTTP), receive or default_receive, record)
    return sent


async def respond(send: Any, status: int, *chunks: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    for i, chunk in enumerate(chunks or (b"",)):
        more = i < len(chunks) - 1
        await send({"type": "http.response.body", "body": chunk, "more_body": more})


# ------------------------------------------------------------------------------------------------
# the commit policy


@pytest.mark.parametrize("status", [200, 201, 302, 399, 400, 404, 500])
@pytest.mark.parametrize("commit", [True, False], ids=["commit", "no-commit"])
def test_commit_policy_by_status(db: Registries, commit: bool, status: int) -> None:
    """commit=True: committed below 400, rolled back otherwise; commit=False: never committed."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.add("request")
        await respond(send, status, b"ok")

    asyncio.run(call(SessionScopeMiddleware(app, db.registry, commit=commit)))
    assert db.rows() == (1 if commit and status < 400 else 0)
    assert db.checked_out() == 0


def test_commit_happens_before_the_response_starts(db: Registries) -> None:
    """When the server sees ``http.response.start``, the row is already committed."""
    seen: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.add("request")
        await respond(send, 200)

    async def server_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            seen.append(await asyncio.to_thread(db.rows))

    asyncio.run(call(SessionScopeMiddleware(app, db.registry, commit=True), send=server_send))
    assert seen == [1]


def test_a_failing_commit_raises_into_the_app_before_anything_is_sent(db: Registries) -> None:
    """The write is not lost behind a 200: the start is not forwarded, the error propagates (the
    server answers 500)."""
    errors: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = db.registry()
        session.add(Row(id=7, owner="a", n=1))
        session.add(Row(id=7, owner="b", n=1))  # the commit's flush fails: duplicate key
        try:
            await respond(send, 200)
        except sa_exc.SQLAlchemyError as error:
            errors.append(error)
            raise

    with pytest.raises(sa_exc.SQLAlchemyError):
        sent = asyncio.run(call(SessionScopeMiddleware(app, db.registry, commit=True)))
        assert sent == []
    assert len(errors) == 1
    assert db.rows() == 0
    assert db.checked_out() == 0


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "no-commit"])
@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
def test_background_work_after_the_body_is_a_transaction_of_its_own(
    db: Registries, commit: bool, fails: bool
) -> None:
    """After the last body message (where Starlette runs background tasks) the session is clean;
    what is written then is committed with commit=True when the app returns, never when it raises,
    and never with commit=False. The request's own row follows the status (here 200)."""
    clean: list[bool] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.add("request")
        await respond(send, 200)
        session = db.registry()
        clean.append(not session.in_transaction() and not session.new)
        await db.add("background")
        if fails:
            raise RuntimeError("background task failed")

    middleware = SessionScopeMiddleware(app, db.registry, commit=commit)
    if fails:
        with pytest.raises(RuntimeError):
            asyncio.run(call(middleware))
    else:
        asyncio.run(call(middleware))
    assert clean == [True]
    assert db.rows() == (0 if not commit else 1 if fails else 2)
    assert db.checked_out() == 0


def test_what_the_app_commits_itself_stays_with_commit_false(db: Registries) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = await db.add("kept")
        if db.is_async:
            await session.commit()
        else:
            await asyncio.to_thread(session.commit)
        await db.add("dropped")
        await respond(send, 200)

    asyncio.run(call(SessionScopeMiddleware(app, db.registry)))
    assert db.rows() == 1
    assert db.checked_out() == 0


# ------------------------------------------------------------------------------------------------
# errors, disconnects, cancellation


def test_an_exception_in_the_app_rolls_back_and_returns_the_connection(db: Registries) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.add("request")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(call(SessionScopeMiddleware(app, db.registry, commit=True)))
    assert db.rows() == 0
    assert db.checked_out() == 0


def test_client_disconnect_mid_stream(db: Registries) -> None:
    """The server's send fails on the second chunk: the session is closed, nothing leaks."""
    chunks = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.add("request")
        await respond(send, 200, b"a", b"b", b"c")

    async def server_send(message: dict[str, Any]) -> None:
        nonlocal chunks
        if message["type"] == "http.response.body":
            chunks += 1
            if chunks == 2:
                raise OSError("client went away")

    with pytest.raises(OSError):
        asyncio.run(call(SessionScopeMiddleware(app, db.registry), send=server_send))
    assert db.rows() == 0
    assert db.checked_out() == 0


def test_cancellation_mid_request(db: Registries) -> None:
    started = asyncio.Event

    async def main() -> None:
        ready = started()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await db.add("request")
            ready.set()
            await asyncio.sleep(30)

        task = asyncio.ensure_future(call(SessionScopeMiddleware(app, db.registry, commit=True)))
        await ready.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert db.rows() == 0
    assert db.checked_out() == 0


def test_repeated_cancellation_waits_for_the_thread_job_of_a_sync_session(
    db: Registries,
) -> None:
    """anyio's cancel scopes cancel at every await (Starlette cancels a streaming response's task
    on a client disconnect): the commit's worker-thread job is waited for all the same, so the
    request's end never closes the session while that thread is still inside it."""
    if db.is_async:
        pytest.skip("sync sessions only: AsyncSessions are awaited on the loop")
    anyio = pytest.importorskip("anyio")
    in_commit = threading.Event()

    @event.listens_for(db.registry.session_factory, "before_commit")
    def slow_commit(session: Any) -> None:
        in_commit.set()
        time.sleep(0.2)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await db.add("request")
        async with anyio.create_task_group() as group:
            group.start_soon(respond, send, 200)
            await asyncio.to_thread(in_commit.wait, 5)
            group.cancel_scope.cancel()  # while the commit runs in its thread

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        asyncio.run(call(SessionScopeMiddleware(app, db.registry, commit=True)))
    assert db.checked_out() == 0
    assert db.rows() == 1  # the commit ran to its end; the response start was never sent


# ------------------------------------------------------------------------------------------------
# streaming, lifespan, websockets


def test_a_streaming_body_keeps_its_session_until_the_body_ends(db: Registries) -> None:
    states: list[tuple[bool, bool]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = await db.add("request")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in (b"a", b"b"):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            states.append((db.registry() is session, session.in_transaction()))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        # after the body (where background tasks run): the same session, closed and clean
        states.append((db.registry() is session, session.in_transaction()))

    asyncio.run(call(SessionScopeMiddleware(app, db.registry, commit=False)))
    assert states == [(True, True), (True, True), (True, False)]
    assert db.rows() == 0
    assert db.checked_out() == 0


def test_lifespan_passes_straight_through(db: Registries) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], SCOPE_KEY in scope, await receive()))
        await send({"type": "lifespan.startup.complete"})

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    sent = asyncio.run(
        call(SessionScopeMiddleware(app, db.registry), {"type": "lifespan"}, receive=receive)
    )
    assert seen == [("lifespan", False, {"type": "lifespan.startup"})]
    assert sent == [{"type": "lifespan.startup.complete"}]


@pytest.mark.parametrize("fail", [False, True], ids=["returns", "raises"])
def test_websocket_scope(db: Registries, fail: bool) -> None:
    """A WebSocket is a unit of work too; commit=True commits when the app returns cleanly."""
    sessions: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        sessions.append(await db.add("socket"))
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        if fail:
            raise RuntimeError("socket handler failed")

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    middleware = SessionScopeMiddleware(app, db.registry, commit=True)
    scope = {"type": "websocket", "path": "/ws", "headers": []}
    if fail:
        with pytest.raises(RuntimeError):
            asyncio.run(call(middleware, scope, receive=receive))
    else:
        asyncio.run(call(middleware, scope, receive=receive))
    assert db.rows() == (0 if fail else 1)
    assert db.checked_out() == 0


def test_concurrent_requests_get_sessions_of_their_own(db: Registries) -> None:
    if "sqlite" in db.kind:
        pytest.skip("SQLite serializes writers: concurrent writing requests fail with 'locked'")
    sessions: dict[int, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        session = await db.add(str(scope["n"]))
        session.info["n"] = scope["n"]
        await asyncio.sleep(0.01)
        assert db.registry().info["n"] == scope["n"]
        sessions[scope["n"]] = session
        await respond(send, 200)

    middleware = SessionScopeMiddleware(app, db.registry, commit=True)

    async def main() -> None:
        await asyncio.gather(*(call(middleware, {**HTTP, "n": n}) for n in range(10)))

    asyncio.run(main())
    assert len({id(s) for s in sessions.values()}) == 10
    assert db.rows() == 10
    assert db.checked_out() == 0


# ------------------------------------------------------------------------------------------------
# arguments


def app_stub(scope: Any, receive: Any, send: Any) -> Any:
    raise AssertionError("not called")


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (sessionmaker(), "Wrap the session factory"),
        (sa_scoped_session(sessionmaker()), "SQLAlchemy's own registry"),
        (OrmSession(), "not a session"),
        (None, "not a session"),
    ],
    ids=["sessionmaker", "sqlalchemy-scoped_session", "session", "none"],
)
def test_bad_session_argument_is_refused_naming_it(value: Any, hint: str) -> None:
    with pytest.raises(sa_exc.ArgumentError) as refused:
        SessionScopeMiddleware(app_stub, value)
    text = str(refused.value)
    assert "SessionScopeMiddleware(): argument `session`" in text
    assert hint in text


def test_bad_commit_flag_is_refused() -> None:
    registry = sessionscope.scoped_session(sessionmaker())
    with pytest.raises(TypeError, match="argument `commit`"):
        SessionScopeMiddleware(app_stub, registry, commit="yes")  # type: ignore[arg-type]
