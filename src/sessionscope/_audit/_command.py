"""``python -m sessionscope audit [--mode warn|raise] [--json FILE] [--exit-zero] -- COMMAND``.

Runs COMMAND (a Python program: ``python app.py``, ``gunicorn app:app -k gevent``, ``celery -A app
worker``, ``pytest``) unchanged, with every session guarded in every Python process it starts:
the environment carries the mode and a fresh records directory, and ``PYTHONPATH`` starts with a
directory holding a ``sitecustomize`` module, which Python imports at every start-up (children
inherit the environment; forked children inherit the running audit). That module starts the audit
(``_boot``) and then imports the ``sitecustomize`` it shadows, if there is one, so a project's own
keeps working. When the program has ended the records of all its processes are read, deduplicated
and reported (on standard error, so the program's standard output stays its own).

Exit status: the program's own when it failed (128 + N when signal N ended it), else 1 when
violations were found (0 with ``--exit-zero``), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any

from ._boot import DIRECTORY_VARIABLE, MODE_VARIABLE
from ._report import as_data, as_text, findings, read_records

SITECUSTOMIZE = '''\
"""Written by `python -m sessionscope audit`: start the audit, then the sitecustomize it shadows."""
import os as _os
import sys as _sys

try:
    from sessionscope._audit._boot import start_from_environment as _start
except ImportError as _error:  # another interpreter, without sessionscope
    _sys.stderr.write(f"sessionscope audit: not auditing {_sys.executable}: {_error}\\n")
else:
    _start()


def _chain():
    here = _os.path.dirname(_os.path.abspath(__file__))
    me = _sys.modules.pop(__name__)
    saved = list(_sys.path)
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != here]
    try:
        import sitecustomize  # noqa: F401 - the one this module shadows, if any
    except ImportError:
        pass
    finally:
        _sys.path[:] = saved
        _sys.modules[__name__] = me


_chain()
'''


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sessionscope audit",
        description=(
            "Run a Python program with every SQLAlchemy Session and AsyncSession guarded (in every "
            "process it starts), then report each share-nothing violation once, with its count. "
            "See docs/audit.md."
        ),
    )
    p.add_argument(
        "--mode",
        choices=("warn", "raise"),
        default="warn",
        help="warn: record and let the program go on (default); raise: record and raise "
        "CrossUnitError / ConcurrentUseError in the program",
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument(
        "--exit-zero",
        action="store_true",
        help="exit 0 when violations were found (the program's own failure still counts)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    return p


def main(argv: list[str]) -> int:
    options = parser().parse_args(argv)
    command: list[str] = options.command
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        parser().error("give the program to run after --, e.g. -- python app.py")
    command = _this_python(command)
    workdir = tempfile.mkdtemp(prefix="sessionscope-audit-")
    try:
        records = os.path.join(workdir, "records")
        os.mkdir(records)
        with open(os.path.join(workdir, "sitecustomize.py"), "w", encoding="utf-8") as file:
            file.write(SITECUSTOMIZE)
        status = _run(command, _environment(workdir, records, options.mode))
        lines, processes = read_records(records)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    found = findings(lines)
    sys.stderr.write(as_text(found, processes))
    sys.stderr.flush()
    if options.json:
        with open(options.json, "w", encoding="utf-8") as file:
            json.dump(as_data(found, command, status, processes), file, indent=2)
            file.write("\n")
    if status != 0:
        return status
    return 1 if found and not options.exit_zero else 0


_PYTHONS = {"python", "python3", f"python3.{sys.version_info.minor}"}


def _this_python(command: list[str]) -> list[str]:
    """``python`` means the interpreter running the audit (the one sessionscope is installed in).

    ``python -m sessionscope audit -- python app.py`` from a virtual environment that is not
    activated would otherwise run whatever ``python`` is first on PATH, where sessionscope (and
    often the application's dependencies) are missing. Any other command runs as given.
    """
    if command[0] in _PYTHONS:
        return [sys.executable, *command[1:]]
    return command


def _environment(workdir: str, records: str, mode: str) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = workdir + (os.pathsep + path if path else "")
    env[MODE_VARIABLE] = mode
    env[DIRECTORY_VARIABLE] = records
    return env


def _run(command: list[str], env: dict[str, Any]) -> int:
    """Run the program to its end; Ctrl-C and SIGTERM are passed on to it, not obeyed here."""
    try:
        process = subprocess.Popen(command, env=env)
    except OSError as error:
        sys.stderr.write(f"sessionscope audit: cannot run {command[0]!r}: {error}\n")
        return 127
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        while True:
            try:
                status = process.wait()
                break
            except KeyboardInterrupt:  # the program got it too (same process group)
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 128 - status if status < 0 else status
