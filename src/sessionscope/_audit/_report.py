"""All processes' records, deduplicated: one finding per (kind, created at, crossed at).

A finding keeps its first occurrence's details (the two units, the guard's message) and counts
every occurrence in every process of the run. The text report and the JSON document say the same
things; the JSON one is what tests and tools read.
"""

from __future__ import annotations

import json
import os
import textwrap
from typing import Any

from .._guard._site import describe_site
from ._records import FIXES, KINDS, Record

Finding = dict[str, Any]


def read_records(directory: str) -> tuple[list[dict[str, Any]], int]:
    """Every line every audited process wrote in ``directory`` (a torn last line is skipped),
    and how many processes wrote any."""
    lines: list[dict[str, Any]] = []
    processes = 0
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".jsonl"):
            continue
        before = len(lines)
        with open(os.path.join(directory, name), encoding="utf-8") as file:
            for line in file:
                try:
                    lines.append(json.loads(line))
                except ValueError:  # a process killed in the middle of its write
                    continue
        processes += len(lines) > before
    return lines, processes


def findings(lines: list[dict[str, Any]]) -> list[Finding]:
    """One finding per key, in the order of :data:`KINDS`, then of first appearance."""
    by_key: dict[str, Finding] = {}
    again: dict[str, int] = {}
    for line in lines:
        if "again" in line:
            again[line["again"]] = again.get(line["again"], 0) + 1
            continue
        finding = by_key.get(line["key"])
        if finding is None:
            by_key[line["key"]] = _finding(line)
        else:  # the same violation, first seen in another process too
            finding["count"] += 1
            if line["pid"] not in finding["pids"]:
                finding["pids"].append(line["pid"])
    for key, count in again.items():
        if key in by_key:
            by_key[key]["count"] += count
    order = list(KINDS)
    return sorted(by_key.values(), key=lambda f: order.index(f["kind"]))


def _finding(record: Record) -> Finding:
    return {
        "kind": record["kind"],
        "title": KINDS[record["kind"]],
        "count": 1,
        "session": record["label"],
        "created_at": _site(record["created_at"]),
        "crossed_at": _site(record["crossed_at"]),
        "owner": record["owner"],
        "offender": record["offender"],
        "fix": FIXES[record["kind"]],
        "message": record["message"],
        "pids": [record["pid"]],
    }


def _site(site: list[Any] | None) -> dict[str, Any] | None:
    if site is None:
        return None
    return {"file": site[0], "line": site[1], "function": site[2]}


def _where(site: dict[str, Any] | None) -> str:
    if site is None:
        return "an unknown place"
    return describe_site((site["file"], site["line"], site["function"]))


def as_data(found: list[Finding], command: list[str], status: int, processes: int) -> Any:
    return {
        "command": command,
        "exit_status": status,
        "processes_with_violations": processes,
        "violations": sum(f["count"] for f in found),
        "findings": found,
    }


def as_text(found: list[Finding], processes: int) -> str:
    if not found:
        return "sessionscope audit: no share-nothing violations found.\n"
    total = sum(f["count"] for f in found)
    lines = [
        f"sessionscope audit: {len(found)} distinct share-nothing violation(s), {total} "
        f"occurrence(s), in {processes} process(es).",
        "",
    ]
    for number, f in enumerate(found, 1):
        times = "once" if f["count"] == 1 else f"{f['count']} times"
        lines.append(f"{number}. {f['title']} [{f['kind']}], {times}")
        lines.append(f"   session:    {f['session']} created at {_where(f['created_at'])}")
        if f["crossed_at"] is not None:
            lines.append(f"   crossed at: {_where(f['crossed_at'])}")
        lines.append(f"   owner:      {f['owner']}")
        if f["offender"] is not None:
            lines.append(f"   offender:   {f['offender']}")
        lines.extend(
            textwrap.wrap(
                f["fix"], width=100, initial_indent="   fix:        ", subsequent_indent=" " * 15
            )
        )
        lines.append("")
    return "\n".join(lines)
