"""Sphinx configuration: the pages in docs/ are the sources (MyST markdown); `make docs`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # the API reference documents the working tree

import sessionscope  # noqa: E402

project = "sessionscope"
author = "sessionscope contributors"
copyright = "sessionscope contributors"
release = version = sessionscope.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]

# `## guard-cross-unit` in errors.md is reached as errors.md#guard-cross-unit (what the error
# messages print), and the pages' own [text](page.md#section) links resolve the same way.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
# ```sh, ```text blocks and the tables of the benchmarks page are highlighted as written
highlight_language = "none"
suppress_warnings = ["misc.highlighting_failure"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}

# Nitpicky (-n) resolves every cross-reference the docstrings make. References into other projects
# (SQLAlchemy, the standard library, frameworks) cannot resolve offline (no intersphinx): they are
# listed here, so that a broken reference to sessionscope's own names still fails the build.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(sqlalchemy|asyncio|contextvars|collections|typing|types|concurrent|weakref)\b.*"),
    (r"py:.*", r"(flask|flask_sqlalchemy|fastapi|starlette|celery|kombu|greenlet|trio|gevent)\b.*"),
    (r"py:.*", r"(_typeshed|typing_extensions|builtins)\b.*"),
    (r"py:.*", r"(threading|_thread)\b.*"),
    # names only imported under TYPE_CHECKING in the integration modules
    (r"py:class", r"(Flask|SQLAlchemy|WSGIApplication|Mode|UnitScopedSession)"),
    # type variables, and private modules' names (private bases, helpers a docstring mentions)
    (r"py:.*", r"sessionscope\.(\w+\.)*_?[A-Z][A-Z]?"),
    (r"py:.*", r"(sessionscope\.(\w+\.)*)?_\w+"),
    (r"py:.*", r"sessionscope\.(\w+\.)*_\w+\.\w+"),
]

html_theme = "furo"
html_title = f"sessionscope {release}"
