"""``python -m sessionscope check``: planted patterns found exactly once, clean code left alone.

The planted examples live in tests/check_examples/ (data, never imported): each line that must be
reported says so with ``# expect: CODE``, so the expectations sit next to the code they are about.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sessionscope._check import CODES, check_paths, check_sources, main
from sessionscope._check._noqa import silenced, suppressions

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = Path(__file__).resolve().parent / "check_examples"
BAD, CLEAN = EXAMPLES / "bad", EXAMPLES / "clean"
_EXPECT = re.compile(r"# expect: (SS\d+(?:,\s*SS\d+)*)")
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
_BAD_ON_PURPOSE = "<!-- static-check: bad on purpose -->"
"""Put right before a block that shows a violation (a tutorial's "before"): the test skips it."""


def _expected(directory: Path) -> Counter[tuple[str, int, str]]:
    expected: Counter[tuple[str, int, str]] = Counter()
    for path in sorted(directory.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = _EXPECT.search(line)
            if match:
                for code in re.split(r",\s*", match.group(1)):
                    expected[(path.name, number, code)] += 1
    return expected


def _found(directory: Path) -> Counter[tuple[str, int, str]]:
    findings, problems = check_paths([str(directory)])
    assert problems == []
    return Counter((Path(f.path).name, f.line, f.code) for f in findings)


def test_each_planted_pattern_is_found_exactly_once_at_its_line() -> None:
    expected = _expected(BAD)
    assert _found(BAD) == expected
    assert {code for _, _, code in expected} == set(CODES)  # every code has a planted example


def test_the_clean_variants_have_no_findings() -> None:
    assert _found(CLEAN) == Counter()


def test_sessionscopes_own_code_and_benchmarks_have_no_findings() -> None:
    findings, problems = check_paths([str(ROOT / "src" / "sessionscope"), str(ROOT / "benchmarks")])
    assert problems == []
    assert findings == []  # the demo's deliberate SQLAlchemy registry carries its noqa


def _doc_blocks(path: Path, *, skip_bad: bool = False) -> list[str]:
    text = path.read_text()
    return [
        match.group(1)
        for match in _BLOCK.finditer(text)
        if not (skip_bad and text[: match.start()].rstrip().endswith(_BAD_ON_PURPOSE))
    ]


def test_the_documentations_examples_have_no_findings() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    sources = {
        f"{page.name}-{n}.py": block
        for page in pages
        if page.name not in {"checks.md", "audit.md"}  # their examples are bad on purpose
        for n, block in enumerate(_doc_blocks(page, skip_bad=True))
    }
    assert len(sources) > 10
    for name, source in sources.items():  # each block alone: they are not one program
        findings, _ = check_sources({name: source}, snippets=True)  # fragments may not parse
        assert findings == [], source


def test_the_audit_guides_worked_example_is_found_statically_too() -> None:
    """docs/audit.md plants a session handed to an executor job; the static check sees it."""
    codes = set()
    for n, block in enumerate(_doc_blocks(ROOT / "docs" / "audit.md")):
        findings, _ = check_sources({f"audit.md-{n}.py": block}, snippets=True)
        codes |= {f.code for f in findings}
    assert "SS104" in codes


def test_every_bad_example_in_docs_checks_md_is_reported_and_no_good_one() -> None:
    blocks = _doc_blocks(ROOT / "docs" / "checks.md")
    seen = set()
    for block in blocks:
        first = block.splitlines()[0]
        match = re.fullmatch(r"# (bad|good): (SS\d+)", first)
        if match is None:
            continue
        kind, code = match.groups()
        findings, problems = check_sources({f"{code}.py": block})
        assert problems == [], block
        assert [f.code for f in findings] == ([code] if kind == "bad" else []), block
        seen.add((kind, code))
    assert seen == {(kind, code) for kind in ("bad", "good") for code in CODES}


def test_noqa_comments_are_read_as_ruff_reads_them() -> None:
    found = suppressions(
        "a = 1  # noqa\nb = 2  # noqa: SS101,SS104\nc = '# noqa'\nd = 4  # NOQA:ss105 E501\n"
    )
    assert silenced(found, 1, "SS103")
    assert silenced(found, 2, "SS104") and not silenced(found, 2, "SS103")
    assert not silenced(found, 3, "SS101")
    assert silenced(found, 4, "SS105")


def test_a_registry_used_under_gevent_elsewhere_is_reported_where_it_is_created() -> None:
    findings, _ = check_sources(
        {
            "db.py": "from sqlalchemy.orm import scoped_session, sessionmaker\n"
            "Session = scoped_session(sessionmaker())\n",
            "app.py": "import db\nimport gevent\ngevent.spawn(db.Session.commit)\n",
            "cli.py": "import db\nfrom asyncio import run\n",  # not using db.Session
        }
    )
    assert [(f.path, f.line, f.code) for f in findings] == [("db.py", 2, "SS101")]
    assert "app.py, which uses it, uses gevent" in findings[0].message


def test_mapped_classes_are_recognised_in_their_usual_spellings() -> None:
    models = (
        "from typing import Optional\n"
        "from flask_sqlalchemy import SQLAlchemy\n"
        "from sqlalchemy.orm import declarative_base\n"
        "from elsewhere import Base as Foreign, Plain\n"
        "db = SQLAlchemy()\n"
        "Base = declarative_base()\n"
        "class A(db.Model): pass\n"
        "class B(Base):\n    __tablename__ = 'b'\n"
        "class Base2(Foreign): __abstract__ = True\n"
        "class C(Base2): pass\n"
        "class D(Plain): pass\n"
    )
    app = (
        "import threading\n"
        "from models import A, B, C, D, Optional\n"
        "def go(a: A, b: 'B', c: Optional[C], d: D | None, e: 'A | None') -> None:\n"
        "    threading.Thread(target=print, args=(a, b, c, d, e, D(), B()))\n"
    )
    findings, problems = check_sources({"models.py": models, "app.py": app})
    assert problems == []
    handed = [app.splitlines()[3][f.col - 1] for f in findings]
    assert [f.code for f in findings] == ["SS104"] * 5 and handed == ["a", "b", "c", "e", "B"]


def test_a_module_level_session_imported_from_another_module_is_one_session() -> None:
    findings, _ = check_sources(
        {
            "db.py": "from sqlalchemy.orm import Session\nsession = Session()\n",
            "views.py": "from db import session\nasync def view():\n    session.commit()\n",
        }
    )
    assert [(f.path, f.line, f.code) for f in findings] == [("views.py", 3, "SS103")]


def test_remove_called_from_another_module_counts() -> None:
    registry = (
        "from asyncio import current_task\n"
        "from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker\n"
        "S = async_scoped_session(async_sessionmaker(), scopefunc=current_task)\n"
    )
    alone, _ = check_sources({"db.py": registry})
    assert [f.code for f in alone] == ["SS102"]
    removed = "from db import S as Registry\nasync def end():\n    await Registry.remove()\n"
    assert check_sources({"db.py": registry, "mw.py": removed}) == ([], [])


def test_a_spawn_start_method_means_no_fork() -> None:
    source = (EXAMPLES / "clean" / "spawn_start.py").read_text()
    assert check_sources({"spawn_start.py": source}) == ([], [])
    forked = source.replace('multiprocessing.set_start_method("spawn")', "pass")
    assert [f.code for f in check_sources({"spawn_start.py": forked})[0]] == ["SS105"]


def test_checked_code_is_never_imported(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import not_installed_anywhere\nraise SystemExit(3)\n")
    assert check_paths([str(tmp_path)]) == ([], [])


def test_directories_skip_environments_builds_and_hidden_directories(tmp_path: Path) -> None:
    bad = (BAD / "ss105_fork.py").read_text()
    for skipped in (".venv", "venv", ".git", "__pycache__", "build", "dist", "node_modules", ".x"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "app.py").write_text(bad)
    (tmp_path / "lib" / "site-packages").mkdir(parents=True)
    (tmp_path / "lib" / "site-packages" / "app.py").write_text(bad)
    (tmp_path / "notes.txt").write_text(bad)
    assert check_paths([str(tmp_path)]) == ([], [])
    (tmp_path / "app.py").write_text(bad)
    assert [f.code for f in check_paths([str(tmp_path)])[0]] == ["SS105"]


def test_exit_statuses_and_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(CLEAN)]) == 0
    assert "All checks passed!" in capsys.readouterr().out
    assert main([str(BAD / "ss105_fork.py")]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{BAD / 'ss105_fork.py'}:8:6: SS105 engine 'engine' ")
    assert "; fix: call engine.dispose(close=False) in the child" in out
    assert main([str(BAD), "--ignore", "SS1"]) == 0
    assert main([str(BAD), "--select", "SS102,SS105"]) == 1
    codes = {line.split()[1] for line in capsys.readouterr().out.splitlines() if ": SS" in line}
    assert codes == {"SS102", "SS105"}


def test_usage_errors_exit_2_and_say_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(tmp_path / "missing.py")]) == 2
    assert "missing.py:1:1: error: no such file or directory" in capsys.readouterr().err
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    assert main([str(broken), str(BAD / "ss105_fork.py")]) == 2  # findings still printed
    captured = capsys.readouterr()
    assert f"{broken}:1:7: error: syntax error: " in captured.err
    assert "Traceback" not in captured.err and "SS105" in captured.out
    assert main([str(BAD), "--select", "SS999"]) == 2
    assert "unknown code 'SS999'" in capsys.readouterr().err
    assert main([]) == 2


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--format", "json", str(BAD / "ss102_never_removed.py")]) == 1
    [finding] = json.loads(capsys.readouterr().out)
    assert finding["code"] == "SS102" and finding["line"] == 8 and finding["col"] == 16
    assert set(finding) == {"path", "line", "col", "code", "message", "fix"}
    assert "sessionscope.async_scoped_session" in finding["fix"]
    assert main(["--format", "json", str(CLEAN)]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_python_m_sessionscope_check_in_a_real_process() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sessionscope", "check", "--format", "json", str(BAD)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "error"},
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    found = Counter((Path(f["path"]).name, f["line"], f["code"]) for f in json.loads(result.stdout))
    assert found == _expected(BAD)
