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
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from ._work import WorkUnit, current_or_new_work


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
