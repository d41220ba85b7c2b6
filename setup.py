"""The optional C extension (``sessionscope._speedups``); everything else is in pyproject.toml.

The extension is the guard's entry check in C (``sessionscope/_guard/_checks.py`` says why). It is
optional: without a compiler the build warns and goes on, and sessionscope runs the same checks in
Python. ``SESSIONSCOPE_NO_EXTENSIONS=1`` at build time skips it (and at run time ignores it).
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
            optional=True,
        )
    ]
)

setup(ext_modules=extensions)
