"""eventlet: greenlets killed between add and commit, then survivors; prints the facts as JSON.

    python eventlet_kill.py --registry sessionscope --patch {before,after,never} --url URL

Victims are killed with ``GreenThread.kill()`` while asleep between ``add`` and ``commit``.
See ``_common.run_kill``.
"""

from __future__ import annotations

from _eventlet import args, green, patch_after, patched  # first: may monkey-patch

# isort: split
from _common import (
    capture_diagnostics,
    make_engine,
    make_registry,
    probe_cooperative_io,
    psycopg_wait_function,
    report,
    reset_table,
    run_kill,
    versions,
)

Session = make_registry(args.registry)
# --patch after: the registry exists, then eventlet patches. The engine is made after patching:
# eventlet cannot green the RLock of a pool created before (it says so, and SQLAlchemy's pool then
# fails with "cannot notify on un-acquired lock" whatever the registry).
patch_after()
engine = make_engine(args.url)
Session.configure(bind=engine)
capture_diagnostics()
reset_table(args.url)
cooperative = probe_cooperative_io(green, args.url)
facts = {
    "framework": "eventlet",
    "registry": args.registry,
    "patch": args.patch,
    "patched": patched(),
    "dialect": engine.dialect.name,
    "psycopg_wait": psycopg_wait_function(),
    "db_io_cooperative": cooperative,
    "versions": versions("eventlet"),
}
facts.update(run_kill(green, Session, engine, args.url, cooperative_io=bool(cooperative)))
report(facts)
engine.dispose()  # close idle pooled connections before the interpreter exits
