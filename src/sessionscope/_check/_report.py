"""The two output formats: ruff-like lines for people and editors, JSON for tools.

Text: ``path:line:col: CODE message; fix: ...`` sorted by path and position, then a count.
JSON: a list of objects with ``path``, ``line``, ``col``, ``code``, ``message`` and ``fix``.
Files that could not be read or parsed go to stderr in both formats (they are usage errors).
"""

from __future__ import annotations

import json
from typing import TextIO

from ._findings import Finding, Problem


def write(findings: list[Finding], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        json.dump([finding.as_dict() for finding in findings], out, indent=2)
        out.write("\n")
        return
    for finding in findings:
        out.write(
            f"{finding.path}:{finding.line}:{finding.col}: {finding.code} "
            f"{finding.message}; fix: {finding.fix}\n"
        )
    if findings:
        noun = "finding" if len(findings) == 1 else "findings"
        out.write(f"Found {len(findings)} {noun}.\n")
    else:
        out.write("All checks passed!\n")


def write_problems(problems: list[Problem], err: TextIO) -> None:
    for problem in problems:
        err.write(f"{problem.path}:{problem.line}:{problem.col}: error: {problem.message}\n")
