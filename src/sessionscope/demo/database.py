"""Where the demo writes: a throwaway SQLite file, or any database the user names with ``--url``.

Either way the demo creates its own table (``sessionscope_demo_rows``) and drops it afterwards, and
a temporary SQLite file goes away with its directory. A *file*, not ``:memory:``: an in-memory
database is private to one connection, which would hide exactly the pooling behaviour measured here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import create_engine, make_url

from .workload import DemoBase


@dataclass(frozen=True)
class Database:
    url: str
    shown_as: str
    """The URL as printed: password hidden, and a temporary file said to be one."""


@contextmanager
def demo_database(url: str | None) -> Iterator[Database]:
    """The database to use, with the demo table created on entry and dropped on exit."""
    if url is not None:
        with _demo_table(url):
            shown = make_url(url).render_as_string(hide_password=True)
            yield Database(url, shown)
        return
    with tempfile.TemporaryDirectory(prefix="sessionscope-demo-") as directory:
        file_url = f"sqlite:///{os.path.join(directory, 'demo.db')}"
        with _demo_table(file_url):
            yield Database(file_url, f"{file_url} (temporary SQLite file, removed afterwards)")


@contextmanager
def _demo_table(url: str) -> Iterator[None]:
    engine = create_engine(url)
    try:
        DemoBase.metadata.create_all(engine)  # a leftover from an interrupted run is reused
        try:
            yield
        finally:
            DemoBase.metadata.drop_all(engine)
    finally:
        engine.dispose()
