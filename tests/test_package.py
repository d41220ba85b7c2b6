"""The package as a user gets it: ``python -m build`` makes an sdist and a wheel that
``twine check`` accepts, the wheel installs into a fresh virtual environment, and the README's
quick start runs from it (against SQLite). One build for the module (about 10-20 s in all); needs
the ``dev`` extra (build, twine) and pip's access to PyPI for SQLAlchemy and greenlet (cached after
the first run).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import sessionscope

pytest.importorskip("build", reason="the dev extra (build, twine) is not installed")

ROOT = Path(__file__).resolve().parent.parent
VERSION = sessionscope.__version__

EXTRAS = {
    # extra -> the distributions it must pull (what the integration or model imports)
    "gevent": {"gevent"},
    "eventlet": {"eventlet"},
    "trio": {"trio"},
    "asyncio": {"aiosqlite"},
    "postgresql": {"psycopg", "asyncpg"},
    "flask": {"flask"},
    "flask-sqlalchemy": {"flask", "flask-sqlalchemy"},
    "fastapi": {"fastapi"},
    "celery": {"celery"},
    "docs": {"sphinx", "myst-parser", "furo"},
}
INTEGRATIONS = {
    # integration module -> its extra (None: needs nothing beyond SQLAlchemy)
    "wsgi.py": None,
    "asgi.py": None,
    "flask.py": "flask",
    "flask_sqlalchemy.py": "flask-sqlalchemy",
    "fastapi.py": "fastapi",
    "celery": "celery",
}
IMPORT_NAMES = {"flask-sqlalchemy": "flask_sqlalchemy", "myst-parser": "myst_parser"}


def run(*command: object, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{command}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist, then the wheel built from the sdist (what `python -m build` does by default)."""
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    return out


def wheel_of(dist: Path) -> Path:
    (wheel,) = dist.glob("sessionscope-*.whl")
    return wheel


def sdist_of(dist: Path) -> Path:
    (sdist,) = dist.glob("sessionscope-*.tar.gz")
    return sdist


def test_build_makes_one_sdist_and_one_wheel_of_the_package_version(dist: Path) -> None:
    # the wheel holds the compiled extensions (sessionscope._speedups, _frames, _guard_setup,
    # _work_state): one per Python and platform, as SQLAlchemy's and greenlet's
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert wheel_of(dist).name.startswith(f"sessionscope-{VERSION}-{tag}-{tag}-")
    assert sdist_of(dist).name == f"sessionscope-{VERSION}.tar.gz"


def test_twine_accepts_both(dist: Path) -> None:
    output = run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()))
    assert output.count("PASSED") == 2


def test_the_wheel_holds_the_package_typed_and_nothing_else(dist: Path) -> None:
    names = zipfile.ZipFile(wheel_of(dist)).namelist()
    assert "sessionscope/py.typed" in names
    assert "sessionscope/__main__.py" in names
    # (_frames: empty outside 3.11-3.13)
    for extension in ("_speedups", "_frames", "_guard_setup", "_work_state"):
        assert [
            n for n in names if n.startswith(f"sessionscope/{extension}.") and n.endswith(".so")
        ]
        assert f"sessionscope/{extension}.c" not in names  # (the sdist has it)
    assert f"sessionscope-{VERSION}.dist-info/licenses/LICENSE" in names
    tops = {name.split("/")[0] for name in names}
    assert tops == {"sessionscope", f"sessionscope-{VERSION}.dist-info"}


def test_the_sdist_holds_license_readme_changelog_docs_and_tests(dist: Path) -> None:
    prefix = f"sessionscope-{VERSION}/"
    with tarfile.open(sdist_of(dist)) as sdist:
        names = {n.removeprefix(prefix) for n in sdist.getnames()}
    for name in [
        "LICENSE",
        "README.md",
        "CHANGELOG.md",
        "pyproject.toml",
        "setup.py",
        "src/sessionscope/_speedups.c",
        "src/sessionscope/_frames.c",
        "src/sessionscope/_guard_setup.c",
        "src/sessionscope/_work_state.c",
        "src/sessionscope/_fields.h",  # (included by two of them)
        "src/sessionscope/py.typed",
        "docs/conf.py",
        "docs/errors.md",
        "benchmarks/README.md",  # a page of the docs
        "tests/test_docs.py",
    ]:
        assert name in names
    assert not [n for n in names if n.startswith("docs/_build") or "__pycache__" in n]


def wheel_metadata(dist: Path) -> dict[str, list[str]]:
    text = zipfile.ZipFile(wheel_of(dist)).read(f"sessionscope-{VERSION}.dist-info/METADATA")
    message = Parser().parsestr(text.decode())
    return {
        key: message.get_all(key) or [] for key in ("Version", "Provides-Extra", "Requires-Dist")
    }


def test_one_version_everywhere(dist: Path) -> None:
    assert wheel_metadata(dist)["Version"] == [VERSION]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert not re.search(r"^version\s*=\s*\"", pyproject, flags=re.M)  # read from the package
    output = run(sys.executable, "-m", "sessionscope", "--version")
    assert output == f"sessionscope {VERSION}\n"


def test_each_extra_pulls_what_its_integration_needs(dist: Path) -> None:
    metadata = wheel_metadata(dist)
    pulled: dict[str, set[str]] = {}
    for requirement in metadata["Requires-Dist"]:
        extra = re.search(r'extra == "([\w-]+)"', requirement)
        if extra:
            name = re.match(r"[\w.-]+", requirement).group(0).lower()  # type: ignore[union-attr]
            pulled.setdefault(extra.group(1), set()).add(name)
    for extra, needs in EXTRAS.items():
        assert extra in metadata["Provides-Extra"]
        assert needs <= pulled[extra], f"[{extra}] lacks {needs - pulled[extra]}"


def third_party_imports(path: Path) -> set[str]:
    """Top-level names a module (or package) imports, anywhere in it, but for typing only."""
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    names: set[str] = set()
    for file in files:
        tree = ast.parse(file.read_text())
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"sessionscope", "sqlalchemy", "greenlet"}


@pytest.mark.parametrize("module", sorted(INTEGRATIONS))
def test_an_integration_imports_only_what_its_extra_pulls(module: str) -> None:
    extra = INTEGRATIONS[module]
    allowed = {IMPORT_NAMES.get(n, n) for n in EXTRAS.get(extra or "", set())}
    if extra == "fastapi":
        allowed.add("starlette")  # FastAPI's own dependency
    if extra == "celery":
        allowed.add("kombu")  # Celery's own dependency
    imported = third_party_imports(ROOT / "src" / "sessionscope" / module)
    assert imported <= allowed, f"{module} imports {imported - allowed} beyond [{extra}]"


QUICK_START_BEFORE = """\
from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


engine = create_engine("sqlite:///quickstart.db")
Base.metadata.create_all(engine)
user = User(name="ada")
"""

QUICK_START_AFTER = """\
import threading

import sessionscope

assert sessionscope.__file__.startswith(sys.prefix), sessionscope.__file__  # the installed wheel
with engine.connect() as connection:
    assert connection.scalars(select(User.name)).all() == ["ada"]
mine, theirs = Session(), []
worker = threading.Thread(target=lambda: theirs.append(Session()))
worker.start()
worker.join()
assert theirs[0] is not mine  # another unit, another session
print("quick start ok")
"""


def readme_quick_start() -> str:
    """The README's first python block: the one-line change, as the README shows it."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, flags=re.S)
    assert block and "from sessionscope import scoped_session" in block.group(1)
    return block.group(1)


def test_the_wheel_installs_in_a_fresh_venv_and_runs_the_readme_quick_start(
    dist: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "--quiet"]
    run(*pip, "--no-deps", wheel_of(dist))
    # its dependencies as pip resolves them from the wheel's metadata (PyPI, or pip's cache)
    run(*pip, f"sessionscope @ {wheel_of(dist).as_uri()}")
    script = tmp_path / "quickstart.py"
    script.write_text(
        "import sys\n\n"
        + QUICK_START_BEFORE
        + "\n"
        + textwrap.dedent(readme_quick_start())
        + "\n"
        + QUICK_START_AFTER
    )
    # -I: isolated, so neither the working tree nor this environment's packages can be imported
    assert run(python, "-I", script, cwd=tmp_path) == "quick start ok\n"
    assert run(python, "-I", "-m", "sessionscope", "--version") == f"sessionscope {VERSION}\n"
    metadata = run(
        python, "-I", "-c", "import importlib.metadata as m; print(m.version('sessionscope'))"
    )
    assert metadata == f"{VERSION}\n"
