"""The web benchmark's ASGI application (uvicorn): FastAPI, two variants, sync or async sessions.

    uvicorn --app-dir benchmarks --factory web_asgi_app:create_app   # configured by BENCH_WEB_*

``BENCH_WEB_SESSION=sync``: a ``def`` endpoint (run in the thread pool) with a ``Session``;
``async``: an ``async def`` endpoint with an ``AsyncSession``. The variants:

- ``sessionscope``: ``sessionscope.asgi.SessionScopeMiddleware`` (``app.add_middleware``) over a
  ``sessionscope.scoped_session`` / ``async_scoped_session``, and the endpoint's session from
  ``Depends(sessionscope.fastapi.session(Session))``.
- ``by-hand``: FastAPI's tutorial dependency, ``db = SessionLocal(); try: yield db; finally:
  db.close()`` (``await db.close()`` for the AsyncSession).

``POST /work/{item_id}`` does the shared work (SELECT by primary key, INSERT, commit) and answers
``{"variant": ..., "item": ...}``; ``GET /health`` answers without touching the database.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations, which name
# dependencies local to create_app()
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

from _web_work import BY_HAND, LAYERS, Config, work, work_async
from fastapi import Depends, FastAPI
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker


def create_app() -> Any:
    """The uvicorn factory."""
    config = Config()
    variant, tag = config.variant, config.tag
    if variant in LAYERS:
        raise ValueError(f"BENCH_WEB_VARIANT={variant!r} is for the WSGI app only (gunicorn cases)")
    api = FastAPI()

    @api.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    if config.session == "async":
        engine = create_async_engine(config.async_url, **config.engine_options())
        if variant == BY_HAND:
            AsyncSessionLocal = async_sessionmaker(engine)

            async def get_db() -> AsyncIterator[AsyncSession]:
                db = AsyncSessionLocal()
                try:
                    yield db
                finally:
                    await db.close()

            async_dependency: Callable[..., Any] = get_db
        else:
            import sessionscope
            import sessionscope.fastapi

            AsyncScoped = sessionscope.async_scoped_session(
                async_sessionmaker(engine), guard=config.guard
            )
            async_dependency = sessionscope.fastapi.session(AsyncScoped)

        @api.post("/work/{item_id}")
        async def work_async_endpoint(
            item_id: int, db: Annotated[AsyncSession, Depends(async_dependency)]
        ) -> dict[str, str]:
            return await work_async(db, item_id, tag)

        if variant != BY_HAND:
            from sessionscope.asgi import SessionScopeMiddleware

            api.add_middleware(SessionScopeMiddleware, session=AsyncScoped)
        return api

    sync_engine = create_engine(config.url, **config.engine_options())
    if variant == BY_HAND:
        SessionLocal = sessionmaker(sync_engine)

        def get_sync_db() -> Iterator[Session]:
            db = SessionLocal()
            try:
                yield db
            finally:
                db.close()

        dependency: Callable[..., Any] = get_sync_db
    else:
        import sessionscope
        import sessionscope.fastapi

        Scoped = sessionscope.scoped_session(sessionmaker(sync_engine), guard=config.guard)
        dependency = sessionscope.fastapi.session(Scoped)

    @api.post("/work/{item_id}")
    def work_endpoint(item_id: int, db: Annotated[Session, Depends(dependency)]) -> dict[str, str]:
        return work(db, item_id, tag)

    if variant != BY_HAND:
        from sessionscope.asgi import SessionScopeMiddleware

        api.add_middleware(SessionScopeMiddleware, session=Scoped)
    return api
