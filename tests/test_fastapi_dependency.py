"""``sessionscope.fastapi.session()`` in process (httpx.ASGITransport), on SQLite files.

The dependency hands out the request's session of the middleware: the same object in ``def`` and
``async def`` endpoints and dependencies, ``Depends(scope="function")`` included, and in background
tasks, which find it closed and clean after the response. Without the middleware (or with a
middleware for another registry) it fails with the fix; a wrong argument is refused naming it; and
importing sessionscope, its ASGI middleware or this module does not import FastAPI.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations
import asyncio
import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI
from sqlalchemy import create_engine, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

import sessionscope
import sessionscope.fastapi
from sessionscope.asgi import SessionScopeMiddleware
from tests.conftest import sqlite_file_url
from tests.models import Base, Row

pytestmark = pytest.mark.timeout(60)

# FastAPI's dependency scopes (0.121+): a yield dependency's exit right after the endpoint
FUNCTION_SCOPE: dict[str, Any] = (
    {"scope": "function"} if "scope" in inspect.signature(Depends).parameters else {}
)


@pytest.fixture
def sync_registry(tmp_path: Path) -> Iterator[Any]:
    engine = create_engine(sqlite_file_url(tmp_path))
    Base.metadata.create_all(engine)
    yield sessionscope.scoped_session(sessionmaker(engine))
    engine.dispose()


def count_rows(registry: Any) -> int:
    engine = registry.session_factory.kw["bind"]
    with OrmSession(engine) as s:
        return int(s.scalar(select(func.count()).select_from(Row)) or 0)


async def post(app: Any, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path)


def test_def_and_async_def_endpoints_and_dependencies_share_the_requests_session(
    sync_registry: Any,
) -> None:
    Session = sync_registry
    seen: dict[str, Any] = {}
    api = FastAPI()
    Db = Annotated[OrmSession, Depends(sessionscope.fastapi.session(Session))]

    def sync_dependency(db: Db) -> None:
        seen["sync dependency"] = db
        seen["sync dependency Session()"] = Session()

    async def async_dependency(db: Db) -> None:
        seen["async dependency"] = db

    def function_scoped(db: Db) -> Iterator[None]:
        seen["function-scoped"] = db
        yield

    def background(n: int) -> None:
        session = Session()
        seen["background"] = session
        seen["background clean"] = not session.in_transaction() and not session.new
        session.add(Row(owner="background", n=n))
        session.commit()

    @api.post("/def")
    def def_endpoint(
        db: Db,
        tasks: BackgroundTasks,
        _a: Annotated[None, Depends(sync_dependency)],
        _b: Annotated[None, Depends(async_dependency)],
        _c: Annotated[None, Depends(function_scoped, **FUNCTION_SCOPE)],
    ) -> dict[str, bool]:
        seen["def endpoint"] = db
        db.add(Row(owner="endpoint", n=1))
        tasks.add_task(background, 2)
        return {"same": db is Session()}

    @api.post("/async")
    async def async_endpoint(db: Db) -> dict[str, bool]:
        seen["async endpoint"] = db
        db.add(Row(owner="endpoint", n=1))
        return {"same": db is Session()}

    app = SessionScopeMiddleware(api, Session, commit=True)
    response = asyncio.run(post(app, "/def"))
    assert response.json() == {"same": True}
    sessions = {k: v for k, v in seen.items() if k != "background clean"}
    assert len({id(s) for s in sessions.values()}) == 1, sessions
    assert seen["background clean"] is True
    assert count_rows(Session) == 2  # the endpoint's (middleware's commit) and the background's

    seen.clear()
    assert asyncio.run(post(app, "/async")).json() == {"same": True}
    assert count_rows(Session) == 3


def test_async_registry(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/fastapi-async.db")

    async def main() -> list[Any]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        Session = sessionscope.async_scoped_session(async_sessionmaker(engine))
        api = FastAPI()
        Db = Annotated[AsyncSession, Depends(sessionscope.fastapi.session(Session))]

        @api.post("/{n}")
        async def endpoint(n: int, db: Db) -> dict[str, Any]:
            db.add(Row(owner="async", n=n))
            await db.flush()
            return {"same": db is Session(), "status": "fine"}

        app = SessionScopeMiddleware(api, Session, commit=True)
        answers = await asyncio.gather(*(post(app, f"/{n}") for n in range(5)))
        async with AsyncSession(engine) as check:
            count = await check.scalar(select(func.count()).select_from(Row))
        await engine.dispose()
        return [count, *(a.json() for a in answers)]

    count, *answers = asyncio.run(main())
    assert count == 5
    assert answers == [{"same": True, "status": "fine"}] * 5


def test_without_the_middleware_the_dependency_says_to_add_it(sync_registry: Any) -> None:
    api = FastAPI()

    @api.post("/")
    def endpoint(db: Annotated[Any, Depends(sessionscope.fastapi.session(sync_registry))]) -> None:
        raise AssertionError("not reached")

    with pytest.raises(sa_exc.InvalidRequestError, match="add_middleware\\(SessionScopeMiddleware"):
        asyncio.run(post(api, "/"))

    other = sessionscope.scoped_session(sessionmaker())  # a middleware for another registry
    with pytest.raises(sa_exc.InvalidRequestError, match="no SessionScopeMiddleware"):
        asyncio.run(post(SessionScopeMiddleware(api, other), "/"))


@pytest.mark.parametrize("value", [sessionmaker(), OrmSession(), None])
def test_a_bad_registry_is_refused_naming_the_call(value: Any) -> None:
    with pytest.raises(sa_exc.ArgumentError, match=r"sessionscope.fastapi.session\(\): argument"):
        sessionscope.fastapi.session(value)


def test_the_dependency_is_an_async_function_without_yield(sync_registry: Any) -> None:
    """No thread-pool job, no exit step: the middleware owns the session's lifetime."""
    dependency = sessionscope.fastapi.session(sync_registry)
    assert inspect.iscoroutinefunction(dependency)
    assert list(inspect.signature(dependency).parameters) == ["connection"]


def test_fastapi_is_imported_lazily() -> None:
    code = (
        "import sys, sessionscope, sessionscope.asgi, sessionscope.fastapi\n"
        "bad = [m for m in ('fastapi', 'starlette') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_add_middleware_and_a_failing_commit_answered_500(sync_registry: Any) -> None:
    """``app.add_middleware(SessionScopeMiddleware, ...)`` (inside Starlette's
    ServerErrorMiddleware): the endpoint's 200 becomes a 500 when the commit fails."""
    Session = sync_registry
    api = FastAPI()
    api.add_middleware(SessionScopeMiddleware, session=Session, commit=True)
    Db = Annotated[OrmSession, Depends(sessionscope.fastapi.session(Session))]

    @api.post("/{n}")
    def endpoint(n: int, db: Db) -> dict[str, int]:
        db.add(Row(id=n, owner="endpoint", n=n))
        return {"n": n}

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [(await client.post(path)).status_code for path in ("/1", "/1", "/2")]

    assert asyncio.run(main()) == [200, 500, 200]
    assert count_rows(Session) == 2


@pytest.mark.parametrize("spec_version", ["2.0", "2.4"])
def test_async_streaming_response_keeps_the_session_until_the_body_ends(
    tmp_path: Path, spec_version: str
) -> None:
    """Below ASGI spec 2.4 Starlette streams in a child task (with a disconnect listener): the
    AsyncSession is used, and closed at the body's end, from that task, while the request waits."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/fastapi-stream.db")
    from fastapi.responses import StreamingResponse

    async def main() -> tuple[bytes, int, list[bool]]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        Session = sessionscope.async_scoped_session(async_sessionmaker(engine))
        api = FastAPI()
        Db = Annotated[AsyncSession, Depends(sessionscope.fastapi.session(Session))]
        in_stream: list[bool] = []

        @api.post("/")
        async def endpoint(db: Db) -> StreamingResponse:
            db.add(Row(owner="before", n=1))  # committed as the response starts

            async def body() -> Any:
                yield b"a"
                in_stream.append(Session() is db)
                db.add(Row(owner="in the stream", n=2))
                await db.flush()  # after the commit: rolled back when the body ends
                in_stream.append(db.in_transaction())
                yield b"b"

            return StreamingResponse(body())

        app = SessionScopeMiddleware(api, Session, commit=True)

        async def versioned(scope: Any, receive: Any, send: Any) -> None:
            await app(
                {**scope, "asgi": {"version": "3.0", "spec_version": spec_version}}, receive, send
            )

        answer = await post(versioned, "/")
        async with AsyncSession(engine) as check:
            owners = (await check.scalars(select(Row.owner))).all()
        checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
        await engine.dispose()
        assert owners == ["before"]
        return answer.content, checked_out, in_stream

    assert asyncio.run(main()) == (b"ab", 0, [True, True])
