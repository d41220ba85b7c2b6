"""Where the application stands, for an audit's "created at" and "crossed at".

The guard's own sites (``_guard._site``) step over sessionscope and SQLAlchemy. An audited
program's sessions are often made by a third-party package (Flask-SQLAlchemy's ``db.session``, a
FastAPI helper, a server's worker loop), and "created at flask_sqlalchemy/session.py" tells the
reader nothing. So installed packages (``site-packages``) and the standard library are stepped
over as well, unless nothing else is on the stack. A check that runs in SQLAlchemy's greenlet (an
AsyncSession's work) has the application's frames in the greenlet driving it, parked in its
``switch()``: they are looked for there, as ``warn_at_application`` does.
"""

from __future__ import annotations

import sys
from types import FrameType

from greenlet import getcurrent

from .._guard._site import Site, _is_library, _is_stdlib


def _is_installed(filename: str) -> bool:
    return "-packages" in filename or filename.startswith("<frozen")


def _frames(frame: FrameType | None) -> list[FrameType]:
    """The running stack from ``frame`` out, then the stacks of the greenlets driving this one."""
    frames: list[FrameType] = []
    current = getcurrent()
    while True:
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        current = current.parent
        if current is None:
            return frames
        frame = current.gr_frame


def _site(frame: FrameType) -> Site:
    return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name


def application_site(depth: int = 1) -> Site | None:
    """(file, line, function) of the innermost application frame above the caller's ``depth``.

    The first frame that is neither sessionscope's, SQLAlchemy's, the standard library's nor an
    installed package's; failing that, the first that is not sessionscope's or SQLAlchemy's.
    """
    frames = _frames(sys._getframe(depth + 1))
    fallback = None
    for frame in frames:
        filename = frame.f_code.co_filename
        if _is_library(filename):
            continue
        if not (_is_stdlib(filename) or _is_installed(filename)):
            return _site(frame)
        if fallback is None:
            fallback = frame
    return None if fallback is None else _site(fallback)
