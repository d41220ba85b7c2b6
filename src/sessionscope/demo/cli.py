"""``python -m sessionscope demo``: options, the run over all models, and the exit code.

Exit codes: 0 when sessionscope's column is zero everywhere, 1 when it is not (that is a bug in
sessionscope), 2 when the demo could not run at all (bad options, unreachable database, no model
available). A model that can't run (gevent not installed) is skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError

from . import report
from .database import demo_database
from .measure import CONTENDERS, Metrics, run_trial
from .runners import MODELS
from .workload import Plan

EXIT_OK, EXIT_SESSIONSCOPE_FAILED, EXIT_CANNOT_RUN = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    """Run the demo with command-line ``argv``; return the exit code."""
    return run(_parser().parse_args(argv))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sessionscope demo",
        description="The same workload under threads, gevent greenlets and asyncio tasks, with "
        "SQLAlchemy's scoped_session and with sessionscope's.",
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
        default=list(MODELS),
        help=f"comma-separated, from {','.join(MODELS)} (default: all)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the measurements as JSON instead of tables"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Every chosen model, both columns; tables as each model finishes (or JSON at the end)."""
    plan = Plan(units=args.units, rows_per_unit=args.rows)
    results: dict[str, dict[str, Metrics]] = {}
    skipped: dict[str, str] = {}
    try:
        with demo_database(args.url) as database:
            say = (lambda _text: None) if args.json else print
            say(report.header(plan, database.shown_as))
            for name in args.models:
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
    if not results:
        print("sessionscope demo: none of the chosen models can run here.", file=sys.stderr)
        return EXIT_CANNOT_RUN
    ok = all(not by_contender["sessionscope"].failures() for by_contender in results.values())
    if args.json:
        print(report.as_json(plan, database.shown_as, results, skipped, ok))
    else:
        print("\n" + _verdict(ok))
    return EXIT_OK if ok else EXIT_SESSIONSCOPE_FAILED


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
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(MODELS)}"
        )
    return list(dict.fromkeys(names))
