"""``python -m sessionscope demo``: options, the run over all models, and the exit code.

Exit codes: 0 when sessionscope's column is zero everywhere, 1 when it is not (that is a bug in
sessionscope), 2 when the demo could not run (bad options, unreachable database, no model
available, a web server that is installed but did not start). A model that can't run (gevent not
installed) is skipped with a note, and so is a web server whose packages are missing.

``web`` is chosen like a model (``--models``) but is a section of its own (:mod:`.web`): real
servers in subprocesses, their own table rows.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from . import report, web, web_report
from .database import demo_database
from .measure import CONTENDERS, Metrics, run_trial
from .runners import MODELS
from .workload import Plan

WEB = "web"
"""The web section's name in ``--models``."""
CHOICES = [*MODELS, WEB]

EXIT_OK, EXIT_SESSIONSCOPE_FAILED, EXIT_CANNOT_RUN = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    """Run the demo with command-line ``argv``; return the exit code."""
    return run(_parser().parse_args(argv))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sessionscope demo",
        description="The same workload under threads, gevent greenlets and asyncio tasks, and the "
        "same HTTP load on gunicorn (gevent, --preload) and uvicorn, with SQLAlchemy's "
        "scoped_session and with sessionscope's.",
    )
    parser.add_argument(
        "--url",
        help="any SQLAlchemy URL, e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test "
        "(default: a temporary SQLite file). The demo creates and drops its own table, "
        "sessionscope_demo_rows.",
    )
    parser.add_argument(
        "--units", type=_at_least(2), default=20, help="concurrent requests per model (default 20)"
    )
    parser.add_argument(
        "--rows", type=_at_least(1), default=3, help="rows each request writes (default 3)"
    )
    parser.add_argument(
        "--models",
        type=_model_list,
        default=CHOICES,
        help=f"comma-separated, from {','.join(CHOICES)} (default: all); web is the section on "
        "real servers (gunicorn and gevent, uvicorn: skipped with a note when not installed)",
    )
    parser.add_argument(
        "--web-requests",
        type=_at_least(len(web.PATTERN)),
        default=1200,
        help="HTTP requests per web run (default 1200)",
    )
    parser.add_argument(
        "--web-clients",
        type=_at_least(1),
        default=30,
        help="keep-alive HTTP clients at once (default 30)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the measurements as JSON instead of tables"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Every chosen model, both columns; tables as each model finishes (or JSON at the end)."""
    plan = Plan(units=args.units, rows_per_unit=args.rows)
    load = web.Load(requests=args.web_requests, clients=args.web_clients)
    results: dict[str, dict[str, Metrics]] = {}
    skipped: dict[str, str] = {}
    served: list[web.WebOutcome] = []
    try:
        with demo_database(args.url) as database:
            say = (lambda _text: None) if args.json else print
            say(report.header(plan, database.shown_as))
            for name in args.models:
                if name == WEB:
                    say("\n" + web_report.header(load))
                    for outcome in web.outcomes(database.url, load):
                        served.append(outcome)
                        say("\n" + web_report.section(outcome))
                    continue
                model = MODELS[name]
                reason = model.unavailable()
                if reason is not None:
                    skipped[name] = reason
                    say("\n" + report.skipped_section(model, reason))
                    continue
                results[name] = {
                    contender.key: run_trial(database.url, model, contender, plan)
                    for contender in CONTENDERS
                }
                say("\n" + report.model_section(model, plan, results[name]))
    except (SQLAlchemyError, ImportError) as exc:
        print(f"sessionscope demo: cannot use the database: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    web_results = [o.results for o in served if o.results is not None]
    if not results and not web_results:
        print("sessionscope demo: none of the chosen models can run here.", file=sys.stderr)
        return EXIT_CANNOT_RUN
    ok = all(not by_contender["sessionscope"].failures() for by_contender in results.values())
    ok = ok and all(not by_contender["sessionscope"].failures() for by_contender in web_results)
    broken = [o for o in served if o.broken is not None]
    if args.json:
        web_json = web_report.as_json(load, served) if WEB in args.models else None
        print(report.as_json(plan, database.shown_as, results, skipped, ok, web_json))
    else:
        print("\n" + _verdict(ok))
    for outcome in broken:
        print(
            f"sessionscope demo: {outcome.server.title} could not run: {outcome.broken}",
            file=sys.stderr,
        )
    if not ok:
        return EXIT_SESSIONSCOPE_FAILED
    return EXIT_CANNOT_RUN if broken else EXIT_OK


def _verdict(ok: bool) -> str:
    if ok:
        return "sessionscope.scoped_session: zero everywhere."
    return "sessionscope.scoped_session: NOT zero everywhere; see above (exit code 1)."


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def _model_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHOICES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(CHOICES)}"
        )
    return list(dict.fromkeys(names))
