"""The optional C extensions; everything else is in pyproject.toml.

``sessionscope._speedups`` is the guard's entry check in C (``sessionscope/_guard/_checks.py`` says
why); ``sessionscope._frames`` finds the application's line that made a session without making
frame objects (``sessionscope/_frames.c`` says why); ``sessionscope._guard_setup`` sets up a new
session's guard in one call (``sessionscope/_guard_setup.c`` says why); ``sessionscope._work_state``
starts and ends a unit of work (``sessionscope/_work_state.c`` says why). All are optional: without
a compiler the build warns and goes on, and sessionscope does the same in Python.
``SESSIONSCOPE_NO_EXTENSIONS=1`` at build time skips them (and at run time ignores them).
"""

import os

from setuptools import Extension, setup

extensions = (
    []
    if os.environ.get("SESSIONSCOPE_NO_EXTENSIONS")
    else [
        Extension(
            "sessionscope._speedups",
            ["src/sessionscope/_speedups.c"],
            depends=["src/sessionscope/_fields.h"],
            optional=True,
        ),
        Extension(
            "sessionscope._frames",
            ["src/sessionscope/_frames.c"],
            optional=True,
        ),
        Extension(
            "sessionscope._guard_setup",
            ["src/sessionscope/_guard_setup.c"],
            depends=["src/sessionscope/_fields.h"],
            optional=True,
        ),
        Extension(
            "sessionscope._work_state",
            ["src/sessionscope/_work_state.c"],
            optional=True,
        ),
    ]
)

setup(ext_modules=extensions)
