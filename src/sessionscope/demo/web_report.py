"""The web section in words: its header, one table per server, and its part of ``--json``.

As in :mod:`.report`, the paragraphs say only what this run observed: counts from the replies and
the table, and the one fact of the setup that explains SQLAlchemy's column (how its
``threading.local`` sees this server's requests). A number that should be zero is never
explained away.
"""

from __future__ import annotations

from typing import Any

from .report import paragraph, plural, table
from .web import (
    PATTERN,
    REQUEST_TIMEOUT,
    RUN_DEADLINE,
    WEB_METRIC_LABELS,
    Load,
    WebMetrics,
    WebOutcome,
)


def header(load: Load) -> str:
    kinds = ", ".join(dict.fromkeys(PATTERN))
    return paragraph(
        f"web: {load.requests} HTTP requests per run ({kinds}: {_mix()}) from {load.clients} "
        "keep-alive clients at once, on real servers with the same flags for both columns. "
        "SQLAlchemy's scoped_session runs behind the usual hand-written wrapper (commit below "
        "400, else roll back, then Session.remove()); sessionscope's behind "
        "SessionScopeMiddleware(commit=True). A slow request waits between its add and the "
        "commit; a failing one waits, then answers 500."
    ).removeprefix("  ")


def _mix() -> str:
    counts = {kind: PATTERN.count(kind) for kind in dict.fromkeys(PATTERN)}
    return ", ".join(f"{n} in {len(PATTERN)} {kind}" for kind, n in counts.items())


def section(outcome: WebOutcome) -> str:
    """The table of one server and what happened in each column; or why it did not run."""
    server = outcome.server
    if outcome.results is None:
        why = outcome.skipped or outcome.broken or "did not run"
        return f"== {server.title} ==\n  {'skipped' if outcome.skipped else 'FAILED'}: {why}"
    results = outcome.results
    lines = table(server.title, WEB_METRIC_LABELS, results)
    lines.append("")
    lines.append(paragraph("SQLAlchemy: " + explain_sqlalchemy(outcome, results["sqlalchemy"])))
    lines.append(paragraph("sessionscope: " + explain_sessionscope(results["sessionscope"])))
    if results["sessionscope"].failures():
        lines.extend(first_traceback(results["sessionscope"]))
    return "\n".join(lines)


def explain_sqlalchemy(outcome: WebOutcome, m: WebMetrics) -> str:
    sentences = [f"{outcome.server.why_sqlalchemy_shares}."]
    sentences.extend(_findings(m))
    if not m.failures():
        sentences.append("No damage this time, but only because of how the requests interleaved.")
    return " ".join(sentences)


def explain_sessionscope(m: WebMetrics) -> str:
    if not m.failures():
        return (
            f"{plural(m.requests, 'request')}, each in a unit of work and Session scope of its "
            "own: none found another request's objects, all "
            f"{m.acknowledged} rows acknowledged are in the table once each, no row of a failed "
            "request is, every request was answered as its endpoint answers, and the server "
            f"logged no traceback ({m.seconds} s with the server's start and stop)."
        )
    details = ", ".join(f"{key}={value}" for key, value in m.failures().items())
    return " ".join(
        [f"NOT ALL ZERO ({details}); this is a sessionscope bug, please report it."] + _findings(m)
    )


def first_traceback(m: WebMetrics) -> list[str]:
    """The first traceback the server logged, indented: the log itself is gone with its run."""
    if not m.first_traceback:
        return []
    return ["  the server's first traceback:"] + [
        "    " + line for line in m.first_traceback.splitlines()
    ]


def _findings(m: WebMetrics) -> list[str]:
    """A sentence for each measurement that is not zero, in the table's order."""
    kinds = "; ".join(f"{kind}: {n}" for kind, n in m.error_kinds.items())
    sentences = [
        (
            m.foreign_objects,
            f"{m.foreign_objects} of the {m.requests} requests found objects of other requests in "
            "their Session.",
        ),
        (
            m.rows_lost,
            f"{plural(m.rows_lost, 'row')} of the {m.acknowledged} requests answered 200 are "
            "missing from the table.",
        ),
        (
            m.rows_duplicated,
            f"{plural(m.rows_duplicated, 'extra copy', 'extra copies')} of rows written.",
        ),
        (
            m.failed_rows_committed,
            f"{plural(m.failed_rows_committed, 'row')} of requests that failed (answered 500 and "
            "rolled back) were committed anyway.",
        ),
        (
            m.errors + m.hung,
            f"{plural(m.errors, 'unexpected error')} and {m.hung} requests hung or never sent (no "
            f"answer within {REQUEST_TIMEOUT:g} s; none sent once the server had stopped answering "
            f"or after the run's {RUN_DEADLINE:g} s): {kinds}.",
        ),
        (m.server_tracebacks, f"{plural(m.server_tracebacks, 'traceback')} in the server's log."),
    ]
    return [sentence for count, sentence in sentences if count]


def as_json(load: Load, outcomes: list[WebOutcome]) -> dict[str, Any]:
    """The web section for ``--json``: per server, both columns (or why it did not run)."""
    return {
        "requests": load.requests,
        "clients": load.clients,
        "metrics": list(WEB_METRIC_LABELS),
        "servers": {
            o.server.key: {key: m.as_json() for key, m in o.results.items()}
            for o in outcomes
            if o.results is not None
        },
        "skipped": {o.server.key: o.skipped for o in outcomes if o.skipped is not None},
        "failed_to_run": {o.server.key: o.broken for o in outcomes if o.broken is not None},
    }
