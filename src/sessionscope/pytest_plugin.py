"""sessionscope's pytest plugin: async fixtures and tests share the test thread's unit of work.

pytest runs sync fixtures and tests one after another in the main thread, so they share its unit
of work (and its implicit sessions), as they share a ``threading.local`` under SQLAlchemy's own
``scoped_session``. pytest-asyncio, though, runs each async fixture's setup, the test and each
async teardown as *separate tasks*. Tasks are units of their own, so without help a session made in
an async fixture would belong to the setup task, be closed when that task ended (its rows rolled
back), and the test would get ``CrossUnitError`` using it.

While pytest-asyncio runs an async fixture's setup, an async test, or the teardown phase, this
plugin lets the main thread's unit of work be *lent* to the task that runs (one task at a time;
tasks that task starts are still units of their own). The tasks then see the same implicit
sessions as sync fixtures and tests, and may use each other's sessions in turn. AsyncSessions
among them are connected on the task's loop, so they are closed before that loop closes (for a
function-scoped loop: after the test's fixtures were torn down), and a fixture that closes its
session at teardown does so as usual.

Loaded automatically (the ``pytest11`` entry point); ``-p no:sessionscope`` turns it off.

**The audit** (``pytest --sessionscope=raise|warn``, off unless given): every Session and
AsyncSession made during the run is guarded, as under ``python -m sessionscope audit`` (the same
boot, ``sessionscope._audit``), and each violation is charged to the test phase in which it was
recorded. ``raise``: the guard raises in the test, and a test with a violation fails even when the
error was swallowed (a thread's, a task's), its report naming the violation; ``warn``: the tests
pass, and the terminal summary lists each test (node id) with its violations.

**Fixtures**: ``sessionscope_session`` gives a test a guarded Session joined to a transaction that
is rolled back at the end (its commits become savepoints: SQLAlchemy's "join a session into an
external transaction" recipe), ``sessionscope_async_session`` the same for AsyncSession (needs
pytest-asyncio). They need an engine: override the ``sessionscope_engine`` fixture (an
``Engine``) or ``sessionscope_async_engine`` (an ``AsyncEngine``) in your ``conftest.py``; the
defaults fail the test and say so.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from ._work import WorkUnit, current_or_new_work

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session

    from ._audit._records import Record, Recorder


@contextlib.contextmanager
def _lending(work: WorkUnit) -> Iterator[None]:
    """Let tasks the main thread runs take ``work`` over while the block runs."""
    before, work.lends = work.lends, True
    try:
        yield
    finally:
        work.lends = before


def _is_async(func: Callable[..., Any] | None) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.stash[_WORK] = current_or_new_work()
    mode = config.getoption("sessionscope_audit", None)
    if mode is not None:
        from ._audit._boot import start

        config.stash[_AUDIT] = _Audit(mode, start(mode))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_fixture_setup(fixturedef: Any, request: Any) -> Generator[None, Any, None]:
    work = request.config.stash.get(_WORK, None)
    if work is None or not _is_async(getattr(fixturedef, "func", None)):
        yield
        return
    with _lending(work):
        yield


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, None]:
    work = item.config.stash.get(_WORK, None)
    if work is None or not _is_async(getattr(item, "obj", None)):
        yield
        return
    with _lending(work):
        yield


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, Any, None]:
    work = item.config.stash.get(_WORK, None)
    if work is None:
        yield
        return
    with _lending(work):  # async fixtures' teardowns run as tasks of their own
        yield


_WORK = pytest.StashKey[WorkUnit]()


# -- the audit: pytest --sessionscope=raise|warn --------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("sessionscope").addoption(
        "--sessionscope",
        dest="sessionscope_audit",
        choices=("raise", "warn"),
        default=None,
        help="guard every SQLAlchemy session made during the run; raise: fail the tests in which "
        "a share-nothing violation happened; warn: list them in the terminal summary",
    )


class _Audit:
    """The run's recorder, and which records each test phase has been charged with."""

    def __init__(self, mode: str, recorder: Recorder) -> None:
        self.mode = mode
        self.recorder = recorder
        self.taken = 0
        self.by_test: dict[str, list[Record]] = {}

    def take(self) -> list[Record]:
        """The records made since the last call (the phase that just ran)."""
        records = self.recorder.records
        new, self.taken = records[self.taken :], len(records)
        return new


def _describe(records: list[Record]) -> str:
    from ._audit._records import KINDS
    from ._guard._site import describe_site

    lines = []
    for record in records:
        created, crossed = record["created_at"], record["crossed_at"]
        where = f"{record['label']} created at {describe_site(created and tuple(created))}"
        if crossed is not None:
            where += f", crossed at {describe_site(tuple(crossed))}"
        lines.append(f"{KINDS[record['kind']]} [{record['kind']}]: {where}")
        lines.append(f"    {record['message']}")
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    audit = item.config.stash.get(_AUDIT, None)
    if audit is None:
        return
    records = audit.take()
    if not records:
        return
    audit.by_test.setdefault(item.nodeid, []).extend(records)
    report: pytest.TestReport = outcome.get_result()
    text = _describe(records)
    if audit.mode == "raise" and not report.failed:
        report.outcome = "failed"
        report.longrepr = f"sessionscope: share-nothing violation(s) in {item.nodeid}:\n{text}"
    else:
        report.sections.append((f"sessionscope violations ({report.when})", text))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    audit = config.stash.get(_AUDIT, None)
    if audit is None or not audit.by_test:
        return
    terminalreporter.write_sep("=", "sessionscope: share-nothing violations")
    for nodeid, records in audit.by_test.items():
        terminalreporter.write_line(f"{nodeid}: {len(records)} violation(s)")
        for line in _describe(records).splitlines():
            terminalreporter.write_line(f"  {line}")


_AUDIT = pytest.StashKey[_Audit]()


# -- fixtures: a session rolled back at the end of the test ---------------------------------------


@pytest.fixture
def sessionscope_engine() -> Engine:
    """The Engine ``sessionscope_session`` uses: override this fixture in your conftest.py."""
    pytest.fail(
        "sessionscope_session needs an engine: define a `sessionscope_engine` fixture returning "
        "your sqlalchemy Engine (in conftest.py)",
        pytrace=False,
    )


@pytest.fixture
def sessionscope_async_engine() -> AsyncEngine:
    """The AsyncEngine ``sessionscope_async_session`` uses: override it in your conftest.py."""
    pytest.fail(
        "sessionscope_async_session needs an engine: define a `sessionscope_async_engine` fixture "
        "returning your sqlalchemy AsyncEngine (in conftest.py)",
        pytrace=False,
    )


def _guarded(session: Any, request: pytest.FixtureRequest) -> None:
    """Guard the fixture's session ("raise"; under the audit, its mode), created "at" the test
    that asked for it: there is no application frame on the stack of a fixture pytest calls."""
    from ._guard import guard, guard_of

    if guard_of(session) is None:  # not already by the audit (which keeps its own mode)
        guard(session, "raise")
    path, line, name = request.node.reportinfo()
    guard_state = guard_of(session)
    if guard_state is not None:
        guard_state.created_at = (str(path), (line or 0) + 1, name)


@pytest.fixture
def sessionscope_session(
    sessionscope_engine: Engine, request: pytest.FixtureRequest
) -> Iterator[Session]:
    """A guarded Session owned by the test, whose work (commits included) is rolled back at the
    end: it is joined to a transaction of its own connection (commits become savepoints)."""
    from sqlalchemy.orm import Session

    with sessionscope_engine.connect() as connection:
        transaction = connection.begin()
        session = Session(bind=connection, join_transaction_mode="create_savepoint")
        _guarded(session, request)
        try:
            yield session
        finally:
            session.close()
            transaction.rollback()


async def _async_session(
    engine: AsyncEngine, request: pytest.FixtureRequest
) -> AsyncIterator[AsyncSession]:
    from sqlalchemy.ext.asyncio import AsyncSession

    async with engine.connect() as connection:
        transaction = await connection.begin()
        session = AsyncSession(bind=connection, join_transaction_mode="create_savepoint")
        _guarded(session, request)
        try:
            yield session
        finally:
            await session.close()
            await transaction.rollback()


def _async_session_fixture() -> Any:
    """``sessionscope_async_session``: a pytest-asyncio fixture, or one saying it needs it."""
    try:
        import pytest_asyncio
    except ImportError:  # pragma: no cover - the fixture then says what it needs

        @pytest.fixture(name="sessionscope_async_session")
        def needs_pytest_asyncio() -> None:
            pytest.fail("sessionscope_async_session needs pytest-asyncio", pytrace=False)

        return needs_pytest_asyncio

    @pytest_asyncio.fixture
    async def sessionscope_async_session(
        sessionscope_async_engine: AsyncEngine, request: pytest.FixtureRequest
    ) -> AsyncIterator[AsyncSession]:
        """An AsyncSession as ``sessionscope_session`` is a Session: guarded, rolled back."""
        async for session in _async_session(sessionscope_async_engine, request):
            yield session

    return sessionscope_async_session


sessionscope_async_session = _async_session_fixture()
