"""gevent: 30 greenlet requests through one scoped session registry; prints the facts as JSON.

    python gevent_race.py --registry {sqlalchemy,sessionscope} \
        --patch {before,after,never} --url URL

``before``: ``monkey.patch_all()`` before SQLAlchemy is imported; ``after``: the engine and the
registry are created first, then gevent patches; ``never``: no patching, greenlets switch only at
``gevent.sleep``. See ``_common.run_race`` for the workload.
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
    run_race,
    versions,
)

Session = make_registry(args.registry)
engine = make_engine(args.url)
patch_after()  # --patch after: the registry and the engine exist, then gevent patches
Session.configure(bind=engine)
capture_diagnostics()
reset_table(args.url)
facts = {
    "framework": "gevent",
    "registry": args.registry,
    "patch": args.patch,
    "patched": patched(),
    "dialect": engine.dialect.name,
    "psycopg_wait": psycopg_wait_function(),
    "db_io_cooperative": probe_cooperative_io(green, args.url),
    "versions": versions("gevent"),
}
facts.update(run_race(green, Session, engine, args.url))
report(facts)
engine.dispose()  # close idle pooled connections before the interpreter exits
