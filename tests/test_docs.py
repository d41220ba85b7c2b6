"""The documentation holds what the code promises: every anchor an error message links to is a
section of docs/errors.md, and the examples of the runnable pages run (against SQLite).

Examples: the ```python blocks of each page in ``RUNNABLE_PAGES`` run in order, as one script, in a
fresh interpreter in a temporary directory (so gevent's patching or a trio run cannot leak into
the suite). A block preceded by ``<!-- not-run -->`` is a fragment and is left out.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sessionscope.exc

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SRC = ROOT / "src" / "sessionscope"

RUNNABLE_PAGES = [
    "tutorial.md",
    "models/threads.md",
    "models/greenlets.md",
    "models/asyncio.md",
    "models/trio.md",
    "shipping.md",
]
NOT_RUN = "<!-- not-run -->"


# -- error anchors --------------------------------------------------------------------------------


def _anchor_parameters(trees: list[ast.Module]) -> tuple[dict[str, int | None], set[str]]:
    """Functions taking an ``anchor`` parameter (name -> its position), and their defaults."""
    functions: dict[str, int | None] = {}
    defaults: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            positional = [*node.args.posonlyargs, *node.args.args]
            names = [a.arg for a in positional]
            if "anchor" in names:
                functions[node.name] = names.index("anchor")
                default_values = node.args.defaults
                offset = len(positional) - len(default_values)
                if names.index("anchor") >= offset:
                    default = default_values[names.index("anchor") - offset]
                    assert isinstance(default, ast.Constant)
                    defaults.add(default.value)
            elif "anchor" in [a.arg for a in node.args.kwonlyargs]:
                functions[node.name] = None
                for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True):
                    if arg.arg == "anchor" and isinstance(default, ast.Constant):
                        defaults.add(default.value)
    return functions, defaults


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def error_anchors() -> dict[str, list[str]]:
    """Every anchor the package's error messages link to -> where (file:line) it is passed.

    Found statically: the arguments given for a parameter named ``anchor`` (``background(anchor)``
    in exc.py, and the helpers that pass one on to it), and those parameters' defaults. An anchor
    that is not a string literal fails the test: it could not be checked.
    """
    files = sorted(SRC.rglob("*.py"))
    trees = [ast.parse(path.read_text(), str(path)) for path in files]
    functions, defaults = _anchor_parameters(trees)
    found: dict[str, list[str]] = {anchor: ["(default)"] for anchor in defaults}
    for path, tree in zip(files, trees, strict=True):
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or _called_name(node) not in functions:
                continue
            position = functions[_called_name(node)]  # type: ignore[index]
            argument = next((k.value for k in node.keywords if k.arg == "anchor"), None)
            if argument is None and position is not None and len(node.args) > position:
                argument = node.args[position]
            if argument is None:
                continue  # the default, collected above
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if isinstance(argument, ast.Name) and argument.id == "anchor":
                continue  # passed on: checked where the helper is called
            assert isinstance(argument, ast.Constant) and isinstance(argument.value, str), (
                f"{where}: an anchor that is not a string literal cannot be checked"
            )
            found.setdefault(argument.value, []).append(where)
    return found


def errors_page_sections() -> set[str]:
    text = (ROOT / sessionscope.exc.DOCS).read_text()
    return set(re.findall(r"^## (\S+)\s*$", text, flags=re.M))


def test_error_messages_link_a_page_that_exists() -> None:
    # the messages say "sessionscope docs/errors.md#<anchor>": a path in the repository, and the
    # source of the site's errors.html
    assert (ROOT / sessionscope.exc.DOCS).is_file()
    assert sessionscope.exc.DOCS.startswith("docs/") and sessionscope.exc.DOCS.endswith(".md")
    assert sessionscope.exc.background("x").endswith(f"sessionscope {sessionscope.exc.DOCS}#x)")


def test_every_anchor_an_error_links_to_is_a_section_of_the_errors_page() -> None:
    anchors = error_anchors()
    assert {"guard-cross-unit", "guard-concurrent", "bad-argument", "ship-state"} <= set(anchors)
    missing = {a: w for a, w in anchors.items() if a not in errors_page_sections()}
    assert not missing, f"anchors with no '## anchor' section in docs/errors.md: {missing}"


def test_every_section_of_the_errors_page_is_linked_by_an_error() -> None:
    # a section no message links to is a stale one (or an anchor the scan above cannot see)
    assert errors_page_sections() - set(error_anchors()) == set()


def test_the_built_errors_page_has_every_anchor() -> None:
    built = DOCS / "_build" / "html" / "errors.html"
    if not built.exists():
        pytest.skip("docs not built (make docs)")
    ids = set(re.findall(r'id="([^"]+)"', built.read_text()))
    assert set(error_anchors()) - ids == set()


def test_a_raised_error_links_its_section() -> None:
    error = sessionscope.exc.CrossUnitError("x " + sessionscope.exc.background("guard-cross-unit"))
    page, anchor = re.search(r"sessionscope (\S+)#([\w-]+)\)", str(error)).groups()  # type: ignore[union-attr]
    assert (ROOT / page).is_file() and anchor in errors_page_sections()


# -- runnable examples ----------------------------------------------------------------------------


def python_blocks(markdown: str) -> list[tuple[int, str]]:
    """The ```python blocks of a page (line number, code), without those marked not-run."""
    blocks = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            previous = next((line.strip() for line in reversed(lines[:i]) if line.strip()), "")
            start = i + 1
            end = lines.index("```", start)
            if previous != NOT_RUN:
                blocks.append((start + 1, "\n".join(lines[start:end])))
            i = end
        i += 1
    return blocks


def test_python_blocks_skip_what_is_marked_not_run() -> None:
    page = "x\n\n```python\na = 1\n```\n\n<!-- not-run -->\n\n```python\nfragment(\n```\n"
    assert python_blocks(page) == [(4, "a = 1")]


def script_of(page: str) -> str:
    """The page's blocks as one script; each block's line numbers kept by padding."""
    lines: list[str] = []
    for first_line, code in python_blocks((DOCS / page).read_text()):
        lines.extend([""] * (first_line - 1 - len(lines)))
        lines.extend(code.splitlines())
    return "\n".join(lines) + "\n"


def run_script(script: str, path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as a program in ``path``'s directory, a leaked resource being an error."""
    path.write_text(script)
    return subprocess.run(
        [sys.executable, "-W", "error::ResourceWarning", str(path)],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_examples_run(page: str, tmp_path: Path) -> None:
    script = script_of(page)
    assert script.strip(), f"{page} has no runnable example"
    done = run_script(script, tmp_path / page.replace("/", "_").replace(".md", "_md.py"))
    assert done.returncode == 0, (
        f"docs/{page} (line numbers are the page's):\n{done.stdout}\n{done.stderr}"
    )


# -- the integration pages' set-up snippets ------------------------------------------------------

_ENGINE = """\
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
engine = create_engine("sqlite:///docs-example.db")
class Base(DeclarativeBase):
    pass
"""

SNIPPET_PRELUDES = {
    # page: (what the page's first snippet assumes exists, a check after it ran)
    "integrations/wsgi.md": (
        _ENGINE
        + "def application(environ, start_response):\n"
        + "    start_response('200 OK', []); return [b'ok']\n",
        "from werkzeug.test import Client\nassert Client(application).get('/').data == b'ok'\n",
    ),
    "integrations/flask.md": (
        _ENGINE + "from flask import Flask\napp = Flask(__name__)\n"
        "@app.get('/')\ndef index():\n    return 'ok'\n",
        "assert app.test_client().get('/').data == b'ok'\n",
    ),
    "integrations/asgi.md": (
        _ENGINE + "from starlette.applications import Starlette\n"
        "from starlette.responses import PlainTextResponse\n"
        "from starlette.routing import Route\n"
        "async def index(request):\n    return PlainTextResponse('ok')\n"
        "app = Starlette(routes=[Route('/', index)])\n",
        "from starlette.testclient import TestClient\n"
        "with TestClient(app) as client:\n    assert client.get('/').text == 'ok'\n",
    ),
    "integrations/fastapi.md": (
        _ENGINE + "from pydantic import BaseModel\n"
        "class ItemIn(BaseModel):\n    name: str\n"
        "class Item(Base):\n    __tablename__ = 'items'\n"
        "    id: Mapped[int] = mapped_column(primary_key=True)\n    name: Mapped[str]\n"
        "Base.metadata.create_all(engine)\n",
        "from fastapi.testclient import TestClient\n"
        "with TestClient(app) as client:\n"
        "    assert client.post('/items', json={'name': 'x'}).json() == {'ok': True}\n"
        "with Session() as check:\n"
        "    assert check.query(Item).count() >= 1\n",
    ),
    "integrations/flask-sqlalchemy.md": (
        _ENGINE + "from flask import Flask\napp = Flask(__name__)\n"
        "app.config['SQLALCHEMY_DATABASE_URI'] = 'sqlite:///docs-example.db'\n",
        "with app.app_context():\n    db.session.execute(db.text('select 1'))\n",
    ),
}


@pytest.mark.parametrize("page", sorted(SNIPPET_PRELUDES))
def test_integration_pages_set_up_snippet_runs(page: str, tmp_path: Path) -> None:
    """The first snippet of each integration page (its set-up) runs, and the app it makes serves a
    request through sessionscope; the pages' other snippets are before/after fragments."""
    prelude, check = SNIPPET_PRELUDES[page]
    blocks = python_blocks((DOCS / page).read_text())
    script = prelude + blocks[0][1] + "\n" + check
    done = run_script(script, tmp_path / "snippet.py")
    assert done.returncode == 0, f"docs/{page}, first snippet:\n{script}\n{done.stderr}"
