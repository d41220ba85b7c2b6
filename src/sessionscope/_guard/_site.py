"""Where application code stands: for "created at ..." in messages and warning stack levels.

Frames of sessionscope, SQLAlchemy and the standard library's context managers are stepped over,
so the site is the user's line that made the session (``Session()``, ``with Session.scope()``,
``sessionmaker()()``), not sessionscope's registry.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import FrameType

import sqlalchemy

_LIBRARY_DIRS = tuple(
    os.path.dirname(path) + os.sep
    for path in (
        os.path.dirname(__file__),  # sessionscope/_guard -> sessionscope/
        sqlalchemy.__file__ or "",
    )
) + (contextlib.__file__,)

Site = tuple[str, int, str]


def _first_application_frame(frame: FrameType | None) -> tuple[FrameType | None, int]:
    depth = 0
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame = frame.f_back
        depth += 1
    return frame, depth


def application_site() -> Site | None:
    """(file, line, function) of the innermost application frame, or None."""
    frame, _ = _first_application_frame(sys._getframe(1))
    if frame is None:
        return None
    return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name


def application_stacklevel() -> int:
    """A ``warnings.warn`` stacklevel that points at the application's line, for the caller."""
    _, depth = _first_application_frame(sys._getframe(1))
    return depth + 1


def describe_site(site: Site | None) -> str:
    if site is None:
        return "an unknown place"
    filename, line, function = site
    with contextlib.suppress(ValueError):  # another drive on Windows
        relative = os.path.relpath(filename)
        if not relative.startswith(os.pardir):
            filename = relative
    return f"{filename}:{line} (in {function})"
