"""What the PostgreSQL benchmarks run on their own share: a schema of their own, the command line.

``ship_receive.py`` and ``fan_out.py`` each create a fresh schema on ``BENCH_PG_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``), seed it, time, and drop it; and each takes
``--quick`` / ``--smoke`` / ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _timing import FULL, QUICK, SMOKE, Settings
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def fresh_schema(prefix: str) -> Iterator[str]:
    """The URL of a new schema (``search_path`` set), dropped with everything in it after."""
    schema = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, poolclass=NullPool)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'create schema "{schema}"'))
        try:
            yield f"{PG_URL}?options=-csearch_path%3D{schema}"
        finally:
            with admin.begin() as conn:
                conn.execute(text(f'drop schema "{schema}" cascade'))
    finally:
        admin.dispose()


def parser(doc: str) -> argparse.ArgumentParser:
    """``--quick`` / ``--smoke`` (exclusive) and ``--json PATH``; the description is ``doc``'s
    first paragraph."""
    made = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    size = made.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer, shorter samples (noisier)")
    size.add_argument("--smoke", action="store_true", help="tiny run: only checks the code works")
    made.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    return made


def settings_of(args: argparse.Namespace) -> Settings:
    settings: Settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    return settings


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")
