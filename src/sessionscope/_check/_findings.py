"""What the check reports: a stable code per pattern, and one finding per place it was seen.

Codes never change meaning once released (users write them in ``# noqa`` comments and in
``--select``/``--ignore``); a new pattern gets the next free number. Each finding carries what is
wrong (``message``) and what to do instead (``fix``) apart, so ``--format json`` can give both.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: code -> a one-line title (docs/checks.md has a bad and a good example of each)
CODES: dict[str, str] = {
    "SS101": "thread-local scoped_session in code that runs greenlets or tasks",
    "SS102": "async_scoped_session(scopefunc=current_task) whose sessions are never removed",
    "SS103": "module-level session used by concurrent units",
    "SS104": "session or ORM object handed to another thread, greenlet, task or job",
    "SS105": "engine connected at import, before a fork, and never disposed in the child",
}


@dataclass(frozen=True, order=True)
class Finding:
    """One pattern at one place: ``path:line:col: CODE message``."""

    path: str
    line: int  # 1-based
    col: int  # 1-based, as ruff prints it
    code: str
    message: str
    fix: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True, order=True)
class Problem:
    """A file the check could not read or parse: a usage error (exit status 2), never a crash."""

    path: str
    line: int
    col: int
    message: str
