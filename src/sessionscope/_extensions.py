"""Which of sessionscope's optional C extensions are used.

Each extension does in C what a Python module next to it does, which stays the reference: the
guard's entry check (``_speedups``), a new session's guard set-up (``_guard_setup``), the walk to
a session's "created at" line (``_frames``) and a unit of work's start and end (``_work_state``).
They are built when a compiler is there at install time; ``SESSIONSCOPE_NO_EXTENSIONS`` set in
the environment (any value but empty) keeps all of them out at run time, as SQLAlchemy's
``DISABLE_SQLALCHEMY_CEXT_RUNTIME`` does. The test suite runs both.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

NO_EXTENSIONS_VARIABLE = "SESSIONSCOPE_NO_EXTENSIONS"


def load_extension(name: str) -> ModuleType | None:
    """``sessionscope.<name>``, or None when it is not built or extensions are turned off."""
    if os.environ.get(NO_EXTENSIONS_VARIABLE):
        return None
    try:
        return importlib.import_module(f"sessionscope.{name}")
    except ImportError:  # not built (no compiler at install time): the Python code runs
        return None
