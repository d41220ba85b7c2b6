"""Greenlet requests through one scoped session registry; prints the measured facts as JSON.

    python green.py --framework {gevent,eventlet} --workload {race,kill} \
        --registry {sqlalchemy,sessionscope} --patch {before,after,never} --url URL

``before``: the framework monkey-patches before SQLAlchemy is imported; ``after``: the registry
exists first, then the framework patches (see each framework module for where the engine is made);
``never``: no patching, greenlets switch only at the framework's ``sleep``. The workloads are in
``_common.run_race`` and ``_common.run_kill``.
"""

from __future__ import annotations

import importlib

from _cli import args

framework = importlib.import_module(f"_{args.framework}")  # first: may monkey-patch

# isort: split
from _common import (  # noqa: E402
    capture_diagnostics,
    make_registry,
    probe_cooperative_io,
    psycopg_wait_function,
    report,
    reset_table,
    run_kill,
    run_race,
    versions,
)

Session = make_registry(args.registry)
engine = framework.make_engine_and_patch_after(args.url)
Session.configure(bind=engine)
capture_diagnostics()
reset_table(args.url)
cooperative = probe_cooperative_io(framework.green, args.url)
facts = {
    "framework": args.framework,
    "registry": args.registry,
    "patch": args.patch,
    "patched": framework.patched(),
    "dialect": engine.dialect.name,
    "psycopg_wait": psycopg_wait_function(),
    "db_io_cooperative": cooperative,
    "versions": versions(args.framework),
}
if args.workload == "race":
    facts.update(run_race(framework.green, Session, engine, args.url))
else:
    facts.update(
        run_kill(framework.green, Session, engine, args.url, cooperative_io=bool(cooperative))
    )
report(facts)
engine.dispose()  # close idle pooled connections before the interpreter exits
