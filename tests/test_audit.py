"""``python -m sessionscope audit`` on small real applications (``tests/audit_apps``).

Each application runs unchanged under the audit, in a subprocess, with real threads, tasks,
forks and a real gunicorn ``-k gevent`` server: its ``planted`` variant must give exactly the
planted violations, each once (one finding, whatever its count), at the lines its marker comments
name; its ``clean`` variant none. The JSON document must say what the text report says, and the
exit status must be the program's failure, else 1 for violations (0 with ``--exit-zero``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from sessionscope.demo.servers import gunicorn_command, launched, stop, uvicorn_command
from tests.servers.process import REPO

APPS = Path(__file__).parent / "audit_apps"
MARKER = re.compile(r"#\s*audit:\s*([a-z -]+?)\s+(created|crossed)\b")

pytestmark = pytest.mark.timeout(120)


def planted(app: str) -> set[tuple[str, str, str | None]]:
    """(kind, created at, crossed at) of every violation planted in ``app``, from its markers."""
    path = APPS / app
    sites: dict[tuple[str, str], str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = MARKER.search(line)
        if match:  # "# audit: cross-unit object created": the site of both kinds
            for kind in match.group(1).split():
                sites[kind, match.group(2)] = f"{path.relative_to(REPO)}:{number}"
    kinds = {kind for kind, _ in sites}
    return {(kind, sites[kind, "created"], sites.get((kind, "crossed"))) for kind in kinds}


def audit_command(json_path: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "sessionscope", "audit", "--json", str(json_path), *options, "--"]


def run_audit(
    tmp_path: Path, program: list[str], *options: str, env: dict[str, str] | None = None
) -> tuple[int, str, dict[str, Any]]:
    """(exit status, the report on standard error, the JSON document)."""
    json_path = tmp_path / "audit.json"
    done = subprocess.run(
        [*audit_command(json_path, *options), *program],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=90,
    )
    return done.returncode, done.stderr, json.loads(json_path.read_text())


def relative(site: dict[str, Any] | None) -> str | None:
    if site is None:
        return None
    return f"{os.path.relpath(site['file'], REPO)}:{site['line']}"


def found(document: dict[str, Any]) -> set[tuple[str, str, str | None]]:
    keys = [
        (f["kind"], relative(f["created_at"]), relative(f["crossed_at"]))
        for f in document["findings"]
    ]
    assert len(keys) == len(set(keys)), f"a violation reported twice: {keys}"
    return {(kind, created, crossed) for kind, created, crossed in keys if created is not None}


def assert_text_matches(report: str, document: dict[str, Any]) -> None:
    """Every finding of the JSON document is in the text report: kind, count, sites, units."""
    if not document["findings"]:
        assert "no share-nothing violations found" in report
        return
    assert f"{len(document['findings'])} distinct share-nothing violation(s)" in report
    assert f"{document['violations']} occurrence(s)" in report
    for number, f in enumerate(document["findings"], 1):
        times = "once" if f["count"] == 1 else f"{f['count']} times"
        assert f"{number}. {f['title']} [{f['kind']}], {times}" in report
        assert f"{relative(f['created_at'])} (in {f['created_at']['function']})" in report
        if f["crossed_at"] is not None:
            assert f"crossed at: {relative(f['crossed_at'])}" in report
        assert f"owner:      {f['owner']}" in report
        if f["offender"] is not None:
            assert f"offender:   {f['offender']}" in report


def python_app(app: str, *args: str) -> list[str]:
    return [sys.executable, str((APPS / app).relative_to(REPO)), *args]


def sqlite_url(tmp_path: Path, driver: str = "sqlite") -> str:
    return f"{driver}:///{tmp_path / 'audit-app.db'}"


def test_threads_planted_violations_are_each_reported_once_at_their_lines(
    tmp_path: Path, db_url: str
) -> None:
    status, report, document = run_audit(tmp_path, python_app("threads_app.py", "planted", db_url))
    assert status == 1, report
    assert found(document) == planted("threads_app.py")
    kinds = {f["kind"]: f for f in document["findings"]}
    assert kinds["cross-unit"]["count"] >= 2  # two threads crossed at one line: one finding
    assert kinds["cross-unit"]["owner"].startswith("thread 'MainThread'")
    assert "(count)" in kinds["cross-unit"]["offender"]
    assert "(rename)" in kinds["object"]["offender"]
    assert_text_matches(report, document)


def test_threads_clean_variant_has_nothing_to_report(tmp_path: Path, db_url: str) -> None:
    status, report, document = run_audit(tmp_path, python_app("threads_app.py", "clean", db_url))
    assert (status, document["findings"]) == (0, []), report
    assert_text_matches(report, document)


def test_asyncio_concurrent_use_and_a_session_passed_between_tasks(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path, "sqlite+aiosqlite")
    status, report, document = run_audit(tmp_path, python_app("asyncio_app.py", "planted", url))
    assert status == 1, report
    assert found(document) == planted("asyncio_app.py")
    assert all(f["session"] == "AsyncSession" for f in document["findings"])
    assert all(f["offender"].startswith("asyncio task") for f in document["findings"])
    assert_text_matches(report, document)
    status, report, document = run_audit(tmp_path, python_app("asyncio_app.py", "clean", url))
    assert (status, document["findings"]) == (0, []), report


def test_a_session_used_across_fork_is_found_in_the_child_that_left_with_os_exit(
    tmp_path: Path,
) -> None:
    url = sqlite_url(tmp_path)
    status, report, document = run_audit(tmp_path, python_app("fork_app.py", "planted", url))
    assert status == 1, report
    assert found(document) == planted("fork_app.py")
    (finding,) = document["findings"]
    parent = re.fullmatch(r"a unit of the parent process \(pid (\d+)\)", finding["owner"])
    assert parent is not None and finding["pids"] != [int(parent.group(1))]  # the child's record
    assert_text_matches(report, document)
    status, report, document = run_audit(tmp_path, python_app("fork_app.py", "clean", url))
    assert (status, document["findings"]) == (0, []), report


def test_raise_mode_raises_in_the_program_and_its_failure_is_the_exit_status(
    tmp_path: Path,
) -> None:
    status, report, document = run_audit(
        tmp_path, python_app("fork_app.py", "planted", sqlite_url(tmp_path)), "--mode", "raise"
    )
    assert status == 3, report  # the child's CrossUnitError, passed on by the app
    assert "child failed: CrossUnitError" in report
    assert found(document) == planted("fork_app.py")
    assert document["exit_status"] == 3


def test_exit_zero_and_the_programs_own_status(tmp_path: Path) -> None:
    program = python_app("threads_app.py", "planted", sqlite_url(tmp_path))
    status, report, document = run_audit(tmp_path, program, "--exit-zero")
    assert status == 0 and document["findings"], report
    failing = [sys.executable, "-c", "import sys; sys.exit(7)"]
    status, report, document = run_audit(tmp_path, failing)
    assert (status, document["findings"]) == (7, [])


def test_a_projects_own_sitecustomize_still_runs(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['OWN_SITECUSTOMIZE'] = 'ran'\n")
    program = [
        sys.executable,
        "-c",
        "import os, sys; import sessionscope._audit._boot as b;"
        "sys.exit(0 if os.environ.get('OWN_SITECUSTOMIZE') == 'ran' and b.recorder else 5)",
    ]
    status, report, _ = run_audit(tmp_path, program, env={"PYTHONPATH": str(own)})
    assert status == 0, report


def test_the_usage_without_a_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sessionscope", "audit"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2
    assert "give the program to run after --" in done.stderr


@pytest.mark.parametrize("variant", ["planted", "clean"])
def test_gunicorn_gevent_worker_requests(tmp_path: Path, variant: str) -> None:
    pytest.importorskip("gevent")
    pytest.importorskip("gunicorn")
    json_path = tmp_path / "audit.json"
    gunicorn = gunicorn_command("tests.audit_apps.gevent_app:app", ["-k", "gevent", "-w", "1"])
    env = {"AUDIT_APP_VARIANT": variant, "AUDIT_APP_DB": sqlite_url(tmp_path)}
    log = tmp_path / "server.log"
    with launched(
        "gunicorn under audit",
        lambda port: [*audit_command(json_path), *gunicorn(port)],
        env,
        log,
        cwd=REPO,
    ) as server:
        for _ in range(3):
            assert server.get("/items") == {"value": 1}
            assert server.get("/leak") == {"value": 2}
        time.sleep(0.3)  # the request greenlets end after their responses
        status = stop(server)
    document = json.loads(json_path.read_text())
    report = log.read_text()
    if variant == "clean":
        assert (status, document["findings"]) == (0, []), report
        return
    assert status == 1, report
    assert found(document) == planted("gevent_app.py")
    kinds = {f["kind"]: f for f in document["findings"]}
    assert kinds["cross-unit"]["count"] == 3  # one per request
    assert kinds["cross-unit"]["offender"].startswith("greenlet")
    assert kinds["left-open"]["count"] == 3
    assert_text_matches(report, document)


@pytest.mark.parametrize("variant", ["planted", "clean"])
def test_fastapi_sync_dependency_under_uvicorn(tmp_path: Path, variant: str) -> None:
    """The tutorial's sync dependency and endpoint (separate thread-pool jobs of one request) are
    not a crossing; a session kept from one request for the next is (and the first request left
    it in its transaction)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    json_path = tmp_path / "audit.json"
    uvicorn = uvicorn_command("tests.audit_apps.fastapi_app:create_app", [])
    env = {"AUDIT_APP_VARIANT": variant, "AUDIT_APP_DB": sqlite_url(tmp_path)}
    log = tmp_path / "server.log"
    with launched(
        "uvicorn under audit",
        lambda port: [*audit_command(json_path), *uvicorn(port)],
        env,
        log,
        cwd=REPO,
    ) as server:
        for _ in range(4):
            assert server.get("/items") == {"value": 1}
        status = stop(server)
    document = json.loads(json_path.read_text())
    report = log.read_text()
    # uvicorn ends itself with the SIGTERM it was stopped by: the program's own status, passed on
    assert status == 128 + signal.SIGTERM == document["exit_status"], report
    if variant == "clean":
        assert document["findings"] == [], report
        return
    assert found(document) == planted("fastapi_app.py")
    kinds = {f["kind"]: f for f in document["findings"]}
    assert kinds["cross-unit"]["count"] == 3  # every request after the first
    assert kinds["cross-unit"]["offender"].startswith("thread")
    assert kinds["left-open"]["owner"].startswith("asyncio task")  # the first request's
    assert_text_matches(report, document)


@pytest.mark.parametrize("variant", ["planted", "clean"])
def test_celery_prefork_worker(tmp_path: Path, variant: str) -> None:
    """The worker's main process makes a session at import, its pool forks the children that run
    the tasks: planted, the tasks use that session (found in the children, which leave with
    ``os._exit()``); clean, each task makes its own."""
    celery = pytest.importorskip("celery")
    from tests.test_celery import RESULTS, require_brokers

    require_brokers(6379)
    queue = f"audit-{uuid.uuid4().hex[:8]}"
    broker = "redis://127.0.0.1:6379/0"
    env = {
        **os.environ,
        "AUDIT_APP_VARIANT": variant,
        "AUDIT_APP_DB": sqlite_url(tmp_path),
        "AUDIT_APP_BROKER": broker,
        "AUDIT_APP_BACKEND": RESULTS,
        "AUDIT_APP_QUEUE": queue,
    }
    json_path = tmp_path / "audit.json"
    worker = [
        *audit_command(json_path),
        *[sys.executable, "-m", "celery", "-A", "tests.audit_apps.celery_app", "worker"],
        *["--pool", "prefork", "--concurrency", "2", "--queues", queue, "--loglevel", "warning"],
        *["--without-gossip", "--without-mingle", "--without-heartbeat"],
        *["--hostname", f"{queue}@localhost"],
    ]
    log = tmp_path / "worker.log"
    client = celery.Celery("audit_client", broker=broker, backend=RESULTS)
    with log.open("wb") as out:
        process = subprocess.Popen(worker, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        results = [client.send_task("audit.answer", queue=queue) for _ in range(6)]
        assert [r.get(timeout=60) for r in results] == [42] * 6
    finally:
        process.send_signal(signal.SIGTERM)  # the audit passes it on: a warm shutdown
        status = process.wait(60)
        client.close()
    document = json.loads(json_path.read_text())
    report = log.read_text()
    assert status == (1 if variant == "planted" else 0), report
    if variant == "clean":
        assert document["findings"] == [], report
        return
    assert found(document) == planted("celery_app.py")
    (finding,) = document["findings"]
    assert finding["count"] == 6  # every task, in whichever child ran it
    main_pid = int(re.fullmatch(r"a unit of the parent process \(pid (\d+)\)", finding["owner"])[1])
    assert main_pid not in finding["pids"]
    assert_text_matches(report, document)
