"""The qualified names of the library objects the rules look for, in one place.

SQLAlchemy exports most of them from more than one module (``sqlalchemy.orm.Session`` is
``sqlalchemy.orm.session.Session``): every spelling a program may import is listed.
"""

from __future__ import annotations

SESSION_CLASSES = frozenset(
    {
        "sqlalchemy.orm.Session",
        "sqlalchemy.orm.session.Session",
        "sqlalchemy.ext.asyncio.AsyncSession",
        "sqlalchemy.ext.asyncio.session.AsyncSession",
    }
)
SESSIONMAKERS = frozenset(
    {
        "sqlalchemy.orm.sessionmaker",
        "sqlalchemy.orm.session.sessionmaker",
        "sqlalchemy.ext.asyncio.async_sessionmaker",
        "sqlalchemy.ext.asyncio.session.async_sessionmaker",
    }
)
SA_SCOPED_SESSION = frozenset(
    {"sqlalchemy.orm.scoped_session", "sqlalchemy.orm.scoping.scoped_session"}
)
ASYNC_SCOPED_SESSIONS = frozenset(
    {
        "sqlalchemy.ext.asyncio.async_scoped_session",
        "sqlalchemy.ext.asyncio.scoping.async_scoped_session",
        "sessionscope.async_scoped_session",
    }
)
REGISTRIES = SA_SCOPED_SESSION | ASYNC_SCOPED_SESSIONS | {"sessionscope.scoped_session"}
ENGINE_FACTORIES = frozenset(
    {
        "sqlalchemy.create_engine",
        "sqlalchemy.engine.create_engine",
        "sqlalchemy.ext.asyncio.create_async_engine",
    }
)
SELECTS = frozenset({"sqlalchemy.select", "sqlalchemy.sql.select", "sqlalchemy.future.select"})

# a scopefunc that still keys by OS thread: a thread-local registry under another name
THREAD_SCOPEFUNCS = frozenset(
    {
        "threading.get_ident",
        "threading.current_thread",
        "threading.get_native_id",
        "_thread.get_ident",
    }
)
CURRENT_TASK = frozenset({"asyncio.current_task", "asyncio.tasks.current_task"})

DECLARATIVE_BASE_CLASSES = frozenset(
    {
        "sqlalchemy.orm.DeclarativeBase",
        "sqlalchemy.orm.DeclarativeBaseNoMeta",
        "sqlalchemy.orm.decl_api.DeclarativeBase",
        "sqlalchemy.orm.decl_api.DeclarativeBaseNoMeta",
    }
)
DECLARATIVE_BASE_FUNCTIONS = frozenset(
    {
        "sqlalchemy.orm.declarative_base",
        "sqlalchemy.orm.decl_api.declarative_base",
        "sqlalchemy.ext.declarative.declarative_base",
    }
)
FLASK_SQLALCHEMY = frozenset({"flask_sqlalchemy.SQLAlchemy"})

# libraries whose units share one OS thread: a thread-local is shared between their units
CONCURRENCY_MODULES = ("gevent", "eventlet", "greenlet", "asyncio", "trio", "anyio")
MONKEY_PATCHES = frozenset({"gevent.monkey.patch_all", "eventlet.monkey_patch"})

FORKS = frozenset({"os.fork", "os.forkpty"})
PROCESS_STARTERS = frozenset(
    {
        "multiprocessing.Process",
        "multiprocessing.Pool",
        "multiprocessing.context.Process",
        "multiprocessing.pool.Pool",
        "concurrent.futures.ProcessPoolExecutor",
        "concurrent.futures.process.ProcessPoolExecutor",
    }
)
START_METHOD_SETTERS = frozenset(
    {"multiprocessing.set_start_method", "multiprocessing.get_context"}
)
