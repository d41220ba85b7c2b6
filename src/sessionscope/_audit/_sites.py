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

_APPLICATION, _ELSEWHERE, _LIBRARY = 0, 1, 2
_verdicts: dict[str, int] = {}
"""filename -> whether it is the application's, elsewhere (stdlib, installed) or sessionscope's or
SQLAlchemy's: every session made pays this walk, so each filename is judged once."""


def _verdict(filename: str) -> int:
    try:
        return _verdicts[filename]
    except KeyError:
        if _is_library(filename):
            verdict = _LIBRARY
        elif _is_stdlib(filename) or "-packages" in filename or filename.startswith("<frozen"):
            verdict = _ELSEWHERE
        else:
            verdict = _APPLICATION
        _verdicts[filename] = verdict
        return verdict


def _site(frame: FrameType) -> Site:
    return frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name


def application_site(depth: int = 1) -> Site | None:
    """(file, line, function) of the innermost application frame above the caller's ``depth``.

    The first frame that is neither sessionscope's, SQLAlchemy's, the standard library's nor an
    installed package's; failing that, the first that is not sessionscope's or SQLAlchemy's. The
    stack is the running one, then those of the greenlets driving this one.
    """
    frame: FrameType | None = sys._getframe(depth + 1)
    current = getcurrent()
    fallback = None
    while True:
        while frame is not None:
            verdict = _verdict(frame.f_code.co_filename)
            if verdict == _APPLICATION:
                return _site(frame)
            if verdict == _ELSEWHERE and fallback is None:
                fallback = frame
            frame = frame.f_back
        current = current.parent
        if current is None:
            return None if fallback is None else _site(fallback)
        frame = current.gr_frame
