"""Where application code stands: for "created at ..." in messages and warning stack levels.

Frames of sessionscope, SQLAlchemy and the standard library's context managers are stepped over,
so the site is the user's line that made the session (``Session()``, ``with Session.scope()``,
``sessionmaker()()``), not sessionscope's registry.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable
from types import FrameType

import sqlalchemy
from greenlet import getcurrent

from .._extensions import load_extension

_LIBRARY_DIRS = tuple(
    os.path.dirname(path) + os.sep
    for path in (
        os.path.dirname(__file__),  # sessionscope/_guard -> sessionscope/
        sqlalchemy.__file__ or "",
    )
) + (contextlib.__file__,)
_STDLIB_DIR = os.path.dirname(os.__file__) + os.sep

Site = tuple[str, int, str]


_library_files: dict[str, bool] = {}  # filename -> is it sessionscope's, SQLAlchemy's, contextlib


def _is_library(filename: str) -> bool:
    try:
        return _library_files[filename]
    except KeyError:
        verdict = _library_files[filename] = filename.startswith(_LIBRARY_DIRS)
        return verdict


def _is_stdlib(filename: str) -> bool:
    return filename.startswith(_STDLIB_DIR) and "-packages" not in filename


def _first_application_frame(frame: FrameType | None) -> FrameType | None:
    """Called for every session made, so it reads each frame's filename once, from a cache."""
    library = _library_files
    while frame is not None:
        filename = frame.f_code.co_filename
        verdict = library.get(filename)
        if verdict is None:
            verdict = _is_library(filename)
        if not verdict:
            return frame
        frame = frame.f_back
    return None


_APPLICATION, _LIBRARY, _STDLIB = 0, 1, 2
_kinds: dict[str, int] = {}  # filename -> _APPLICATION, _LIBRARY or _STDLIB


def _kind(filename: str) -> int:
    kind = _kinds[filename] = (
        _LIBRARY if _is_library(filename) else _STDLIB if _is_stdlib(filename) else _APPLICATION
    )
    return kind


def _walk_in_python(depth: int) -> Site | None:
    """:func:`application_site`'s walk over frame objects (``depth`` 1: this function's caller,
    which is :func:`application_site`). Each frame costs one dict lookup (its file's kind,
    cached)."""
    try:
        frame: FrameType | None = sys._getframe(depth)
    except ValueError:  # a shallower stack than the caller expected: walk it all
        frame = sys._getframe(1)
    kinds = _kinds
    first: FrameType | None = None  # the innermost frame that is not a library's
    while frame is not None:
        code = frame.f_code
        kind = kinds.get(code.co_filename)
        if kind == 1:  # _LIBRARY, the usual frame here (literals: no global lookups per frame)
            frame = frame.f_back
            continue
        if kind is None:
            kind = _kind(code.co_filename)
            continue  # (looked at again, now known)
        if kind == 0:  # _APPLICATION
            return code.co_filename, frame.f_lineno, code.co_name
        if first is None:  # _STDLIB
            first = frame
        frame = frame.f_back
    if first is None:
        return None
    return first.f_code.co_filename, first.f_lineno, first.f_code.co_name


FrameWalk = Callable[[int, dict[str, int], Callable[[str], int]], "Site | None"]


def _load_frame_walk() -> FrameWalk | None:
    """The C module's walk (``sessionscope/_frames.c``: no frame objects are made), or None."""
    _frames = load_extension("_frames")
    if _frames is None:
        return None
    walk: FrameWalk | None = getattr(_frames, "application_site", None)
    return walk  # (CPython 3.11-3.13 only: elsewhere the module is empty)


_frame_walk = _load_frame_walk()


def application_site(depth: int = 1) -> Site | None:
    """(file, line, function) of the innermost application frame, or None.

    Standard-library frames are stepped over too (a sessionmaker called by a thread pool was
    "created" by the code that submitted it), unless nothing else is left.

    Called for every guarded session made, so each frame costs one dict lookup (its file's kind,
    cached), and ``depth`` lets a caller that knows its own frames start the walk past them
    (``1``: the caller). Frames inside it that are not sessionscope's would be skipped
    wrongly, so callers only pass what their own call chain guarantees. The walk is the C
    module's where it is built (the same frames and lines, without making a frame object for
    each: one of them is the application's, alive as long as its unit), else Python's.
    """
    if _frame_walk is not None:
        return _frame_walk(depth + 1, _kinds, _kind)  # (1 more: this function's own frame)
    return _walk_in_python(depth + 1)


def warn_at_application(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the application's line that made the call.

    Inside an AsyncSession method the check runs in SQLAlchemy's greenlet, whose stack ends at
    ``greenlet_spawn``: the application's frames are those of the greenlet that drives it, parked
    in its ``switch()``, so they are looked for there.
    """
    frame = _first_application_frame(sys._getframe(1))
    current = getcurrent()
    while frame is None and current.parent is not None:
        current = current.parent
        frame = _first_application_frame(current.gr_frame)
    if frame is None:
        warnings.warn(message, category, stacklevel=2)
        return
    module_globals = frame.f_globals
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=module_globals.get("__name__"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
    )


def describe_site(site: Site | None) -> str:
    if site is None:
        return "an unknown place"
    filename, line, function = site
    with contextlib.suppress(ValueError):  # another drive on Windows
        relative = os.path.relpath(filename)
        if not relative.startswith(os.pardir):
            filename = relative
    return f"{filename}:{line} (in {function})"
