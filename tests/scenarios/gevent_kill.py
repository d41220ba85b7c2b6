"""gevent: greenlets killed between add and commit, then survivors; prints the facts as JSON.

    python gevent_kill.py --registry sessionscope --patch {before,after,never} --url URL

Victims are killed with ``Greenlet.kill()`` while asleep between ``add`` and ``commit`` (and, when
PostgreSQL I/O is cooperative, while blocked inside a query). See ``_common.run_kill``.
"""

from __future__ import annotations

from _gevent import args, green, patch_after, patched  # first: may monkey-patch

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
engine = make_engine(args.url)
patch_after()  # --patch after: the registry and the engine exist, then gevent patches
Session.configure(bind=engine)
capture_diagnostics()
reset_table(args.url)
cooperative = probe_cooperative_io(green, args.url)
facts = {
    "framework": "gevent",
    "registry": args.registry,
    "patch": args.patch,
    "patched": patched(),
    "dialect": engine.dialect.name,
    "psycopg_wait": psycopg_wait_function(),
    "db_io_cooperative": cooperative,
    "versions": versions("gevent"),
}
facts.update(run_kill(green, Session, engine, args.url, cooperative_io=bool(cooperative)))
report(facts)
engine.dispose()  # close idle pooled connections before the interpreter exits
