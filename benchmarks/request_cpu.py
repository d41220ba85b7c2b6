"""CPU per request of the web benchmark's WSGI application, served in-process: where it goes.

    python benchmarks/request_cpu.py            # full run (about 1 min)
    python benchmarks/request_cpu.py --quick    # noisier
    python benchmarks/request_cpu.py --smoke    # only checks the code works
    python benchmarks/request_cpu.py --sqlite   # a SQLite file even if PostgreSQL answers
    python benchmarks/request_cpu.py --json out.json

``web_requests.py`` measures requests per second under real servers, where the sessionscope
variant of the app needs more server CPU per request. This benchmark calls the same WSGI
application (``web_wsgi_app.py``: a ``get()`` by primary key, an INSERT, a commit) directly, one
request after another in this process, with no server and no HTTP, and reports the process's CPU
time per request of four variants, in short batches back to back (see "Method" below):

- ``by hand``: a plain Session opened per request and closed in a ``finally``;
- ``guard=off``: ``SessionScopeMiddleware`` over ``scoped_session(maker, guard="off")``: the
  cost of the unit of work, the scope and the middleware;
- ``guard=raise``: the same with the guard on (the default): that plus the guard's;
- ``by hand again``: a second by-hand app (its own engine and app object), the control: the noise
  floor of the method (a ratio this far from 1.000 means nothing).

The differences in µs are what sessionscope adds to a request; under a server they come out
larger in absolute terms (its threads contend for the GIL and the kernel) but in about the same
proportion, which is what the requests/s ratio follows. Every request is checked: it answers the
item it read, and each variant's rows equal its requests.

Method: short batches (25 requests) of each variant back to back, the order reversed every other
round, and the ratio the median of the per-round ratios to ``by hand``: this machine's CPU speed
drifts by 10-30% over seconds, and long rounds (300 requests, the first method) let that drift
into the ratios (1.004 to 1.10 for the same code on different days). The control's ratio stays
within about 1.5% of 1.000.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from _pg_bench import parser
from _web_work import BY_HAND, ITEMS, SESSIONSCOPE, item_name
from web_requests import Database, database

VARIANTS = {  # label -> (BENCH_WEB_VARIANT, BENCH_WEB_GUARD)
    "by hand": (BY_HAND, "raise"),
    "guard=off": (SESSIONSCOPE, "off"),
    "guard=raise": (SESSIONSCOPE, "raise"),
    "by hand again": (BY_HAND, "raise"),
}
SIZES = {"full": (25, 160), "quick": (25, 50), "smoke": (5, 2)}
"""Requests per batch, rounds (each round one batch of every variant)."""

WsgiApp = Callable[[dict[str, Any], Any], Iterable[bytes]]


def tag_of(label: str) -> str:
    """What a variant's rows are tagged with (the web schema's tag column is short)."""
    return label.replace(" ", "-").replace("=", "-")


def make_app(db: Database, label: str) -> WsgiApp:
    variant, guard = VARIANTS[label]
    os.environ.update(
        BENCH_WEB_URL=db.url,
        BENCH_WEB_VARIANT=variant,
        BENCH_WEB_GUARD=guard,
        BENCH_WEB_TAG=tag_of(label),
        BENCH_WEB_POOL="2",
    )
    import web_wsgi_app

    app: WsgiApp = web_wsgi_app.create_app()
    return app


class Driver:
    """Calls one app request after request, as a server would, and checks each answer."""

    def __init__(self, app: WsgiApp, tag: str) -> None:
        self.app = app
        self.tag = tag
        self.sent = 0

    def run(self, requests: int) -> None:
        statuses: list[str] = []

        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            statuses.append(status)
            return lambda data: None

        for _ in range(requests):
            item = 1 + self.sent % ITEMS
            self.sent += 1
            environ = {"REQUEST_METHOD": "POST", "PATH_INFO": f"/work/{item}"}
            body = self.app(environ, start_response)
            try:
                answer = json.loads(b"".join(body))
            finally:
                close = getattr(body, "close", None)
                if close is not None:
                    close()
            if statuses.pop() != "200 OK" or answer["item"] != item_name(item):
                raise RuntimeError(f"{self.tag}: a wrong answer for item {item}: {answer}")


def measure(db: Database, requests: int, rounds: int) -> dict[str, list[float]]:
    """CPU µs per request of each variant, one batch per round each, back to back (the order
    reversed every other round)."""
    drivers = {label: Driver(make_app(db, label), tag_of(label)) for label in VARIANTS}
    for driver in drivers.values():  # warm up: connections, statement caches, classes
        driver.run(max(requests * 8, 2))
    samples: dict[str, list[float]] = {label: [] for label in drivers}
    labels = list(drivers)
    for i in range(rounds):
        for label in labels if i % 2 == 0 else labels[::-1]:
            start = time.process_time()
            drivers[label].run(requests)
            samples[label].append((time.process_time() - start) / requests * 1e6)
    for label, driver in drivers.items():
        written = db.hits(driver.tag)
        if written != driver.sent:
            raise RuntimeError(f"{label}: {driver.sent} requests but {written} rows written")
    return samples


def report(samples: dict[str, list[float]], kind: str) -> dict[str, Any]:
    """Medians of each variant's batches; ratios are medians of per-round ratios to by hand."""
    us = {label: statistics.median(values) for label, values in samples.items()}
    hand = samples["by hand"]
    ratio = {
        label: statistics.median(value / base for value, base in zip(values, hand, strict=True))
        for label, values in samples.items()
    }
    return {
        "database": kind,
        "us_per_request": us,
        "ratio": ratio,
        # (from the ratio, as the ratio is the robust figure: medians of the raw batches drift)
        "added_us": {label: (value - 1) * us["by hand"] for label, value in ratio.items()},
        "rounds": samples,
    }


def lines(result: dict[str, Any]) -> list[str]:
    out = [f"{result['database']}: process CPU per request, WSGI app called in-process"]
    for label, us in result["us_per_request"].items():
        added = result["added_us"][label]
        out.append(
            f"  {label:<13} {us:8.1f} µs  ratio {result['ratio'][label]:.3f}"
            + (f"  ({added:+.1f} µs)" if label != "by hand" else "")
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    rows = [
        "| Variant | CPU µs/request | ratio to by hand | added µs |",
        "|---|---:|---:|---:|",
    ]
    for label, us in result["us_per_request"].items():
        ratio, added = result["ratio"][label], result["added_us"][label]
        rows.append(f"| {label} | {us:.1f} | {ratio:.3f} | {added:.1f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args_parser = parser(__doc__)
    args_parser.add_argument(
        "--sqlite", action="store_true", help="a SQLite file even if PostgreSQL answers"
    )
    args = args_parser.parse_args(argv)
    requests, rounds = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    with (
        tempfile.TemporaryDirectory() as directory,
        database(Path(directory), sqlite=args.sqlite) as db,
    ):
        result = report(measure(db, requests, rounds), db.kind)
    print("\n".join(lines(result)))
    table = markdown(result)
    print(f"\n{table}")
    if args.json:
        args.json.write_text(json.dumps({**result, "markdown": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
