"""Turning measurements into text: one table per model, and what happened in plain words.

The paragraphs are built from the measurements only, so they say what this run observed, whatever
it was: zeros are called zeros, and a number that should be zero is never explained away.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from .measure import CONTENDERS, METRIC_LABELS, Metrics
from .runners import Model
from .workload import Plan

WIDTH = 100


def header(plan: Plan, database_shown_as: str) -> str:
    return "\n".join(
        [
            f"sessionscope demo: {plan.units} concurrent requests per model, "
            f"{plural(plan.rows_per_unit, 'row')} each; {plan.owner(plan.failing_unit)} fails and "
            "rolls back.",
            f"database: {database_shown_as}",
        ]
    )


def table(title: str, labels: dict[str, str], results: dict[str, Any]) -> list[str]:
    """``== title ==`` and one row per label: the contenders side by side, one column each.

    ``results`` maps a contender's key to an object with an attribute per key of ``labels``.
    """
    label_width = max(len(label) for label in labels.values())
    widths = [len(contender.title) for contender in CONTENDERS]
    head = " " * label_width + "".join(
        f"   {contender.title:>{width}}"
        for contender, width in zip(CONTENDERS, widths, strict=True)
    )
    lines = [f"== {title} ==", "  " + head]
    for key, label in labels.items():
        cells = "".join(
            f"   {getattr(results[contender.key], key):>{width}}"
            for contender, width in zip(CONTENDERS, widths, strict=True)
        )
        lines.append(f"  {label:<{label_width}}{cells}")
    return lines


def model_section(model: Model, plan: Plan, results: dict[str, Metrics]) -> str:
    """The table of one model, followed by what happened in each column."""
    lines = table(model.title, METRIC_LABELS, results)
    lines.append("")
    lines.append(paragraph("SQLAlchemy: " + explain_sqlalchemy(model, plan, results["sqlalchemy"])))
    lines.append(
        paragraph("sessionscope: " + explain_sessionscope(model, plan, results["sessionscope"]))
    )
    return "\n".join(lines)


def skipped_section(model: Model, reason: str) -> str:
    return f"== {model.title} ==\n  skipped: {reason}"


def explain_sqlalchemy(model: Model, plan: Plan, m: Metrics) -> str:
    """What happened to SQLAlchemy's ``scoped_session`` (which called ``remove()`` per request)."""
    everyone = model.units(plan.units)
    failing = plan.owner(plan.failing_unit)
    if m.sessions_shared == 0:
        sentences = [
            f"each of the {everyone} got a Session of its own ({model.threading_local_view}), so "
            f"when {failing} failed, its rollback could only discard its own rows."
        ]
    elif m.distinct_sessions == 1:
        sentences = [
            f"the {everyone} shared 1 Session: {model.threading_local_view}.",
        ]
    else:
        sentences = [
            f"{m.sessions_shared} of the {everyone} were handed a Session that another "
            f"{model.unit_noun} also held ({m.distinct_sessions} Sessions in all): "
            f"{model.threading_local_view}."
        ]
    if m.others_rows_discarded:
        sentences.append(
            f"When {failing} failed and called Session.rollback(), that Session held "
            f"{plural(m.others_rows_discarded, 'pending row')} of other requests, and the rollback "
            "discarded them along with its own."
        )
    if m.commits_to_another_session:
        sentences.append(
            f"{plural(m.commits_to_another_session, 'request')} then committed a different Session "
            "than the one holding their rows (another request's Session.remove() had closed the "
            "shared one and emptied the registry), so their commits wrote nothing"
            + (" and raised nothing." if m.errors == 0 else ".")
        )
    sentences.extend(_nonzero_findings(model, m))
    if not m.failures():
        sentences.append(
            "These zeros are SQLAlchemy working as designed, not a gap in the test."
            if m.sessions_shared == 0
            else "No damage this time, but only because of how the units happened to interleave."
        )
    return " ".join(sentences)


def explain_sessionscope(model: Model, plan: Plan, m: Metrics) -> str:
    """What happened with sessionscope, which never called ``remove()``."""
    everyone = model.units(plan.units)
    if not m.failures():
        return (
            f"{everyone}, {plural(m.distinct_sessions, 'Session')}, none shared. No request called "
            f"Session.remove(), yet every Session was closed when its {model.unit_noun} ended "
            f"(0 left open, {m.sessions_still_registered} still registered, 0 connections "
            "checked out)."
        )
    details = ", ".join(f"{key}={value}" for key, value in m.failures().items())
    return " ".join(
        [f"NOT ALL ZERO ({details}); this is a sessionscope bug, please report it."]
        + _nonzero_findings(model, m)
    )


def _nonzero_findings(model: Model, m: Metrics) -> list[str]:
    found = []
    if m.rows_lost:
        found.append(
            f"{plural(m.rows_lost, 'row')} of requests that reported success are missing from the "
            "table."
        )
    if m.rows_duplicated:
        found.append(f"{plural(m.rows_duplicated, 'extra copy', 'extra copies')} of rows written.")
    if m.failed_rows_kept:
        found.append(
            f"{plural(m.failed_rows_kept, 'row')} of the failed request were committed although it "
            "rolled back."
        )
    if m.errors:
        shown = "; ".join(m.error_messages[:3])
        more = f" (and {len(m.error_messages) - 3} more kinds)" if len(m.error_messages) > 3 else ""
        found.append(f"{plural(m.errors, 'unexpected error')}: {shown}{more}.")
    if m.sessions_never_closed:
        found.append(f"{plural(m.sessions_never_closed, 'Session')} never closed.")
    if m.connections_leaked:
        found.append(
            f"{plural(m.connections_leaked, 'connection')} still checked out after all "
            f"{model.unit_noun}s had ended."
        )
    return found


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """``"1 row"``, ``"3 rows"``."""
    return f"{count} {singular if count == 1 else (plural_form or singular + 's')}"


def paragraph(text: str) -> str:
    return textwrap.fill(text, WIDTH, initial_indent="  ", subsequent_indent="  ")


def as_json(
    plan: Plan,
    database_shown_as: str,
    results: dict[str, dict[str, Metrics]],
    skipped: dict[str, str],
    ok: bool,
    web: dict[str, Any] | None = None,
) -> str:
    """Everything measured, for tests and scripts: ``--json``. ``web`` is the web section's
    (:func:`sessionscope.demo.web_report.as_json`), None when it was not chosen."""
    document: dict[str, Any] = {
        "database": database_shown_as,
        "units": plan.units,
        "rows_per_unit": plan.rows_per_unit,
        "failing_request": plan.owner(plan.failing_unit),
        "metrics": list(METRIC_LABELS),
        "models": {
            model: {key: metrics.as_json() for key, metrics in by_contender.items()}
            for model, by_contender in results.items()
        },
        "skipped": skipped,
        "web": web,
        "sessionscope_all_zero": ok,
    }
    return json.dumps(document, indent=2)
