"""``python -m sessionscope check PATH...``: share-nothing violations found by reading the source.

The check parses the files it is given (``ast``; nothing is imported or run), builds the project's
facts (mapped classes, what module-level names hold, see ``_project``), runs the rules and prints
each finding as ``path:line:col: CODE message`` (or JSON). The codes, each with a bad and a good
example, are in docs/checks.md. The rules prefer missing a violation to reporting a correct
program: every finding should be worth fixing or a deliberate ``# noqa: CODE``.

Exit status: 0 clean, 1 findings, 2 usage error (bad option, unreadable path, syntax error).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable, Sequence

from . import _files, _noqa, _report
from ._findings import CODES, Finding, Problem
from ._module import SourceModule, parse
from ._project import Project
from ._rules_fork import check_fork
from ._rules_scoping import check_scoping
from ._rules_sharing import check_hand_offs, check_module_sessions
from ._spawns import spawn_of
from ._values import walk_scopes

__all__ = ["CODES", "Finding", "Problem", "check_paths", "check_sources", "main"]


def check_sources(
    sources: dict[str, str], *, snippets: bool = False
) -> tuple[list[Finding], list[Problem]]:
    """Check ``{path: source}`` as one project. ``snippets`` allows top-level ``await`` (for
    documentation examples). Findings silenced by ``# noqa`` are left out."""
    modules: list[SourceModule] = []
    problems: list[Problem] = []
    for path, source in sources.items():
        try:
            modules.append(parse(path, source, top_level_await=snippets))
        except SyntaxError as error:
            problems.append(
                Problem(path, error.lineno or 1, error.offset or 1, f"syntax error: {error.msg}")
            )
        except (ValueError, RecursionError, MemoryError) as error:  # null bytes, deep nesting
            problems.append(Problem(path, 1, 1, f"cannot parse: {error}"))
    project = Project(modules)
    findings: list[Finding] = []
    for module in modules:
        found = list(_module_findings(project, module))
        if found:  # tokenizing for comments is slow: only where there is something to silence
            silenced = _noqa.suppressions(sources[module.path])
            findings.extend(f for f in found if not _noqa.silenced(silenced, f.line, f.code))
    return sorted(set(findings)), problems


def _module_findings(project: Project, module: SourceModule) -> Iterable[Finding]:
    yield from check_scoping(project, module)
    yield from check_fork(project, module)
    # SS103 and SS104 are about async defs and calls starting units: following every function's
    # bindings (the costly part) is only worth it in modules that have some
    if any(
        isinstance(node, ast.AsyncFunctionDef)
        or (isinstance(node, ast.Call) and spawn_of(node, module) is not None)
        for node in module.nodes
    ):
        nodes = list(walk_scopes(module, project.scopes[module.path]))
        yield from check_module_sessions(module, nodes)
        yield from check_hand_offs(module, nodes)


def check_paths(paths: list[str]) -> tuple[list[Finding], list[Problem]]:
    """Check the ``*.py`` files named or found under the directories named, as one project."""
    files, problems = _files.python_files(paths)
    sources: dict[str, str] = {}
    for path in files:
        try:
            sources[path] = _files.read(path)
        except (OSError, UnicodeDecodeError, SyntaxError) as error:
            problems.append(Problem(path, 1, 1, f"cannot read: {error}"))
    findings, parse_problems = check_sources(sources)
    return findings, sorted(problems + parse_problems)


def _codes(text: str | None, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """``SS101,SS104`` or prefixes (``SS1``), as ruff takes them."""
    if text is None:
        return ()
    codes = tuple(code.strip().upper() for code in text.split(",") if code.strip())
    for code in codes:
        if not any(known.startswith(code) for known in CODES):
            parser.error(f"unknown code {code!r} (known: {', '.join(CODES)})")
    return codes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sessionscope check",
        description="Report share-nothing violations (sessions or ORM objects crossing threads, "
        "greenlets, tasks, jobs or forks) by reading Python source; nothing is imported.",
        epilog="codes: "
        + "; ".join(f"{code} {title}" for code, title in CODES.items())
        + ". Exit status: 0 clean, 1 findings, 2 usage error.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--select", metavar="CODES", help="only these codes (comma-separated)")
    parser.add_argument("--ignore", metavar="CODES", help="not these codes (comma-separated)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        options = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
        select = _codes(options.select, parser)
        ignore = _codes(options.ignore, parser)
    except SystemExit as exit_:  # argparse's usage errors (status 2) and --help (0)
        return exit_.code if isinstance(exit_.code, int) else 2
    findings, problems = check_paths(options.paths)
    findings = [
        finding
        for finding in findings
        if (not select or finding.code.startswith(select))
        and not finding.code.startswith(ignore or ("\0",))
    ]
    _report.write(findings, options.format, sys.stdout)
    _report.write_problems(problems, sys.stderr)
    if problems:
        return 2
    return 1 if findings else 0
