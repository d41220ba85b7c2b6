"""Which files a check reads: the files named, and the ``*.py`` files under the directories named.

Directories skip what is not the application's own code (virtual environments, installed
packages, build output, VCS data, caches) and every hidden directory, like ruff's defaults.
"""

from __future__ import annotations

import os
import tokenize
from collections.abc import Iterator

from ._findings import Problem

SKIPPED_DIRECTORIES = frozenset(
    {".venv", "venv", ".git", "__pycache__", "site-packages", "node_modules", "build", "dist"}
)


def python_files(paths: list[str]) -> tuple[list[str], list[Problem]]:
    files: list[str] = []
    problems: list[Problem] = []
    for path in paths:
        if os.path.isdir(path):
            files.extend(_walk(path))
        elif os.path.isfile(path):
            files.append(path)
        else:
            problems.append(Problem(path, 1, 1, "no such file or directory"))
    return list(dict.fromkeys(files)), problems


def _walk(directory: str) -> Iterator[str]:
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRECTORIES and not d.startswith("."))
        for name in sorted(names):
            if name.endswith(".py"):
                yield os.path.normpath(os.path.join(root, name))  # `.` gives app.py


def read(path: str) -> str:
    """The file's text, decoded as Python does (a coding cookie, else UTF-8). Raises OSError,
    UnicodeDecodeError or SyntaxError (a bad cookie)."""
    with tokenize.open(path) as file:
        return file.read()
