"""pytest plugin: Flask-SQLAlchemy's own test suite with ``unit_scoped(db)`` on every instance.

Loaded with ``-p flask_sqlalchemy_plugin`` (this directory on ``PYTHONPATH``) into a run of the
suite from Flask-SQLAlchemy's sdist (``tests/test_flask_sqlalchemy.py`` runs it). Wrapping
``SQLAlchemy.__init__`` covers both orders an application uses: ``SQLAlchemy(app)`` (already
initialised when ``unit_scoped`` runs) and ``SQLAlchemy()`` then ``init_app(app)`` (hooked by the
wrapped ``init_app``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from flask_sqlalchemy import SQLAlchemy

from sessionscope.flask_sqlalchemy import unit_scoped

_GUARD: Any = os.environ.get("SESSIONSCOPE_FSA_GUARD", "raise")
_original_init = SQLAlchemy.__init__
_applied = 0


@functools.wraps(_original_init)
def _init(self: SQLAlchemy, *args: Any, **kwargs: Any) -> None:
    global _applied
    _original_init(self, *args, **kwargs)
    unit_scoped(self, guard=_GUARD)
    _applied += 1


SQLAlchemy.__init__ = _init  # type: ignore[method-assign]


def pytest_report_header() -> str:
    return f"sessionscope: unit_scoped(db, guard={_GUARD!r}) on every SQLAlchemy instance"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # the outer test reads this line: proof that the suite ran with unit_scoped applied
    terminalreporter.write_line(
        f"sessionscope: unit_scoped applied to {_applied} SQLAlchemy instances"
    )
