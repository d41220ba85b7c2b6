"""A worker loop: one long-lived thread or greenlet serving request after request.

This is what gunicorn's gthread and gevent workers, Celery pools and hand-written job loops do:
the unit (thread, greenlet) is reused, so sessionscope cannot see where one request ends and the
next begins unless each request is marked with ``with sessionscope.unit_of_work():``.

Each request uses the registry implicitly: it checks that its session starts clean (no
transaction, nothing pending, an empty ``Session.info``), tags ``Session.info`` with its id, adds
a row owned by its id, and commits; a failing request flushes its row (it is in the database,
uncommitted) and raises, which the loop catches, as a server would, and goes on. A ``switch``
between the add and the commit lets other units run in the middle of the request.

:func:`verdict` compares what the loop acknowledged with what was committed.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select

import sessionscope
from tests.models import Row

FAIL_EVERY = 3  # request i fails when i % FAIL_EVERY == FAIL_EVERY - 1


class RequestFailed(Exception):
    """A request failing on purpose, after flushing its row."""


@dataclass
class Served:
    """What the loop saw: requests acknowledged and failed, and anything that went wrong."""

    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    unclean_starts: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def serve(
    Session: Any,
    ids: Iterable[int],
    served: Served,
    *,
    boundary: bool,
    tag: str = "r",
    switch: Callable[[], object] | None = None,
) -> None:
    """Serve requests ``ids`` one after another in the running thread or greenlet."""
    for i in ids:
        req = f"{tag}{i}"
        try:
            with sessionscope.unit_of_work() if boundary else contextlib.nullcontext():
                handle(Session, req, served, fail=i % FAIL_EVERY == FAIL_EVERY - 1, switch=switch)
        except RequestFailed:
            served.failed.append(req)
        except Exception as error:  # noqa: BLE001 - reported; the tests expect none
            served.errors.append(f"{req}: {type(error).__name__}: {error}")
        else:
            served.ok.append(req)


def handle(
    Session: Any, req: str, served: Served, *, fail: bool, switch: Callable[[], object] | None
) -> None:
    session = Session()
    if session.in_transaction() or session.info or session.new:
        served.unclean_starts.append(
            f"{req} found transaction={session.in_transaction()} info={dict(session.info)} "
            f"pending={len(session.new)}"
        )
    session.info["req"] = req
    Session.add(Row(owner=req, n=0))
    if switch is not None:
        switch()
    if fail:
        Session.flush()
        raise RequestFailed(req)
    Session.commit()


def committed_rows(engine: Engine) -> Counter[str]:
    """Owner -> how many of its rows are committed."""
    with engine.connect() as conn:
        found = conn.execute(select(Row.owner, func.count()).group_by(Row.owner)).all()
    return Counter({owner: int(count) for owner, count in found})


def verdict(served: Served, committed: Counter[str]) -> dict[str, list[str]]:
    """Everything that is wrong (empty lists when nothing is): every acknowledged request's row
    committed exactly once, no failed request's row, no request starting with another's state."""
    return {
        "errors": served.errors,
        "unclean_starts": served.unclean_starts,
        "missing": sorted(req for req in served.ok if committed[req] == 0),
        "duplicated": sorted(req for req, count in committed.items() if count > 1),
        "failed_landed": sorted(req for req in served.failed if committed[req]),
        "unknown": sorted(set(committed) - set(served.ok) - set(served.failed)),
    }


CLEAN: dict[str, list[str]] = {
    key: []
    for key in ("errors", "unclean_starts", "missing", "duplicated", "failed_landed", "unknown")
}
"""The verdict of a loop that served cleanly."""
