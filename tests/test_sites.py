"""The application's site ("created at ..."): the C walk over the interpreter's frames
(``sessionscope/_frames.c``, CPython 3.11-3.13) finds what the Python walk over frame objects
finds, on every kind of stack, and makes no frame object on the way."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import greenlet
import pytest

from sessionscope._guard import _site, _state
from tests.conftest import require_built

NO_EXTENSIONS = bool(os.environ.get(_state.NO_EXTENSIONS_VARIABLE))
BUILT_FOR_THIS_PYTHON = (3, 11) <= sys.version_info[:2] <= (3, 13) and not hasattr(
    sys, "pypy_version_info"
)
needs_the_c_walk = pytest.mark.skipif(
    _site._frame_walk is None, reason="the C walk is not in use here (its module or Python)"
)

Both = tuple[Any, Any]


def both_walks(depth: int = 1) -> Both:
    """What ``application_site(depth)`` answers with each walk, called from the same line."""
    walk = _site._frame_walk
    assert walk is not None
    return walk(depth + 1, _site._kinds, _site._kind), _site._walk_in_python(depth + 1)


def test_the_c_walk_is_used_where_it_is_built() -> None:
    if NO_EXTENSIONS:
        assert _site._frame_walk is None
        return
    if not BUILT_FOR_THIS_PYTHON:
        assert _site._frame_walk is None
        return
    require_built("_frames", _site._frame_walk is not None, "the Python walk runs")


def _in_a_plain_call() -> Both:
    return both_walks()


def _in_a_generator() -> Iterator[Both]:
    yield both_walks()


def _in_a_comprehension() -> Both:
    return [both_walks() for _ in range(1)][0]


def _in_a_thread() -> Both:
    found: list[Both] = []
    thread = threading.Thread(target=lambda: found.append(both_walks()))
    thread.start()
    thread.join()
    return found[0]


def _stdlib_only_in_a_thread() -> Both:
    """Nothing of the application on the stack: the innermost standard-library frame."""
    found: list[Both] = []
    walk = _site._frame_walk
    assert walk is not None

    def run() -> None:  # (this file is the application's: start the walk past it)
        found.append((walk(2, _site._kinds, _site._kind), _site._walk_in_python(2)))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return found[0]


def _in_a_task() -> Both:
    async def main() -> Both:
        await asyncio.sleep(0)
        return both_walks()

    return asyncio.run(main())


def _in_a_greenlet() -> Both:
    return greenlet.greenlet(both_walks).switch()  # type: ignore[no-any-return]


def _in_exec() -> Both:
    scope: dict[str, Any] = {"both_walks": both_walks}
    exec("result = both_walks()", scope)  # a "<string>" file: the application's
    return scope["result"]  # type: ignore[no-any-return]


def _deeper_than_the_stack() -> Both:
    return both_walks(depth=10_000)


def _past_this_file() -> Both:
    """depth 2 from here: the pytest machinery's frames (installed: the standard library kind is
    not theirs, so the walk goes on to an application's frame or the first non-library one)."""
    return both_walks(depth=2)


STACKS: dict[str, Callable[[], Both]] = {
    "a plain call": _in_a_plain_call,
    "a generator": lambda: next(_in_a_generator()),
    "a comprehension": _in_a_comprehension,
    "a thread": _in_a_thread,
    "only the standard library": _stdlib_only_in_a_thread,
    "an asyncio task": _in_a_task,
    "a greenlet": _in_a_greenlet,
    "exec": _in_exec,
    "a depth past the stack": _deeper_than_the_stack,
    "past this file": _past_this_file,
}


@needs_the_c_walk
@pytest.mark.parametrize("stack", list(STACKS))
def test_the_c_walk_finds_the_site_the_python_walk_finds(stack: str) -> None:
    in_c, in_python = STACKS[stack]()
    assert in_c == in_python
    if stack != "only the standard library":
        assert in_c is not None and in_c[0] != _site.__file__


@needs_the_c_walk
def test_the_c_walk_finds_the_application_line_below_library_frames() -> None:
    """A session made through sessionscope's and SQLAlchemy's frames: the line is the test's."""
    import sqlalchemy
    from sqlalchemy.orm import sessionmaker

    import sessionscope

    Scoped = sessionscope.scoped_session(sessionmaker(sqlalchemy.create_engine("sqlite://")))
    line = sys._getframe().f_lineno + 1
    session = Scoped()
    guard = session._sessionscope_guard  # type: ignore[attr-defined]
    assert guard.created_at == (__file__, line, sys._getframe().f_code.co_name)
    Scoped.remove()


def _retained_by(walk: Callable[[], object], frames: int) -> float:
    """Bytes still allocated after ``walk()`` ran ``frames`` calls deep (its result dropped):
    the frame objects a walk made live as long as the frames they stand for."""

    def deeper(n: int) -> float:
        if n:
            return deeper(n - 1)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        walk()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return after - before

    return deeper(frames)


@needs_the_c_walk
def test_the_c_walk_makes_no_frame_object() -> None:
    walk = _site._frame_walk
    assert walk is not None

    def all_library() -> None:  # every frame below is this file's: judged a library's here
        kinds = dict.fromkeys([__file__], 1)
        walk(1, kinds, _site._kind)

    def all_library_in_python() -> None:
        saved = _site._kinds.get(__file__)
        _site._kinds[__file__] = 1
        try:
            _site._walk_in_python(1)
        finally:
            if saved is None:
                del _site._kinds[__file__]
            else:
                _site._kinds[__file__] = saved

    in_python = _retained_by(all_library_in_python, 20)
    in_c = _retained_by(all_library, 20)
    assert in_python > 20 * 100  # (the measure sees frame objects: about 190 bytes each)
    assert in_c < 1_000


@needs_the_c_walk
def test_sessions_made_at_one_line_share_its_site() -> None:
    """A guarded session keeps its site as long as it lives: the C walk hands out one tuple per
    line (a tuple each was 64 bytes per live session), and a new one for another line."""
    walk = _site._frame_walk
    assert walk is not None
    at_one_line = [walk(1, _site._kinds, _site._kind) for _ in range(3)]
    at_another = walk(1, _site._kinds, _site._kind)
    assert at_one_line[0] is at_one_line[1] is at_one_line[2]
    assert at_another is not at_one_line[0]
    assert at_another[1] == at_one_line[0][1] + 1


@needs_the_c_walk
def test_a_shared_site_is_never_another_codes() -> None:
    """Code objects made and freed one after another (often at one address) each get their own
    file, line and function, never a site kept for the one before."""
    walk = _site._frame_walk
    assert walk is not None
    for i in range(200):
        filename, function = f"<generated-{i % 7}>", f"made_{i % 5}"
        padding = "\n" * (i % 3)
        namespace: dict[str, Any] = {"walk": walk, "kinds": _site._kinds, "kind": _site._kind}
        source = f"{padding}def {function}():\n    return walk(1, kinds, kind)\n"
        exec(compile(source, filename, "exec"), namespace)
        site = namespace[function]()
        assert site == (filename, 2 + i % 3, function)
        del namespace
