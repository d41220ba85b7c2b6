"""What one violation is, and where each audited process writes them: as they happen.

A record is a plain dict (it goes to a JSON line as it is): ``kind``, ``label`` (Session or
AsyncSession), ``created_at`` and ``crossed_at`` (``[file, line, function]`` or None), ``owner``
and ``offender`` (the two units, described), ``message`` (the guard's own error text) and ``pid``.

**Why appended at once.** An audited process may end in any way: ``atexit`` handlers do not run
in a forked child that leaves with ``os._exit()`` (gunicorn workers, Celery's prefork pool,
``multiprocessing``), nor after a signal. So every violation is one ``os.write`` of one JSON line
to the process's own file (``O_APPEND``: one write per line is never interleaved with another
thread's). Only a violation's first occurrence in a process is written in full; later ones are a
short line naming its key, so a violation in a loop costs a few hundred bytes a time. A forked
child opens a file of its own on its first record (``os.register_at_fork``); the occurrences it
inherited knowledge of are still counted by key, the full record being in its parent's file.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from .._guard._site import Site

Record = dict[str, Any]

KINDS = {
    "cross-unit": "session used by a unit that does not own it",
    "object": "ORM object touched by a unit that does not own its session",
    "concurrent": "session used by two units at the same time",
    "left-open": "session left open (in a transaction) when its unit ended",
    "forked": "session used across os.fork()",
}
"""Each kind of violation, in the report's order, and its title."""

FIXES = {
    "cross-unit": (
        "Give each thread, greenlet, task or request its own session (make it there, or use "
        "sessionscope.scoped_session / async_scoped_session); pass ids, or copies made with "
        "sessionscope.copy_to(), never the session. To move a session on purpose: "
        "sessionscope.hand_off() in the owner, sessionscope.adopt() in the unit taking it."
    ),
    "object": (
        "Pass the object's primary key and load it in the other unit's own session, or copy it "
        "there with sessionscope.copy_to() (sessionscope.ship()/receive() across processes)."
    ),
    "concurrent": (
        "Give each concurrent unit its own session (one per task of a gather(), one per thread); "
        "if they must share one, take turns with sessionscope.SharedSession."
    ),
    "left-open": (
        "End the session in the unit that made it: `with Session(engine) as session:` (or "
        "`session.close()` in a finally), committing or rolling back first; a thread-local "
        "scoped_session needs `remove()` at the end of each request or job."
    ),
    "forked": (
        "Make sessions after the fork, in the child; call engine.dispose(close=False) in the "
        "child (a worker start hook: gunicorn post_fork, Celery worker_process_init) or create "
        "the engine there."
    ),
}


def key_of(record: Record) -> str:
    """The dedupe key: the kind, where the session was created, where it was crossed."""
    return json.dumps([record["kind"], _where(record["created_at"]), _where(record["crossed_at"])])


def _where(site: Site | list[Any] | None) -> str | None:
    return None if site is None else f"{site[0]}:{site[1]}"


class Recorder:
    """This process's records: kept in memory (``records``, for the pytest plugin) and, when a
    directory is given, appended to this process's file there as they happen."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.records: list[Record] = []
        self._seen: set[str] = set()
        self._fd: int | None = None
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._fd = None  # the parent's file stays the parent's: open one of our own
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self.records = []

    def add(self, record: Record) -> None:
        key = key_of(record)
        with self._lock:
            self.records.append(record)
            again = key in self._seen
            self._seen.add(key)
        if self.directory is None:
            return
        line = {"again": key} if again else {"key": key, **record}
        self._write(json.dumps(line) + "\n")

    def _write(self, line: str) -> None:
        fd = self._fd
        if fd is None:
            path = os.path.join(self.directory or ".", f"{os.getpid()}.jsonl")
            fd = self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, line.encode())
