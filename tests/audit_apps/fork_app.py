"""Fork: ``python fork_app.py planted|clean DATABASE_URL``.

The parent uses the engine and a session, then forks (as a ``--preload`` server or a prefork
worker pool does). planted: the child goes on with the parent's session (used across the fork);
clean: the child makes its own session. The child leaves with ``os._exit()``, as forked workers
do: no ``atexit`` handler of its runs, so the audit must have its records already.
"""

from __future__ import annotations

import os
import sys

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session


def main() -> None:
    variant, url = sys.argv[1], sys.argv[2]
    engine = create_engine(url)
    session = Session(engine)  # audit: forked created
    session.execute(text("select 1"))  # the engine is used before the fork
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if variant == "planted":
                session.execute(text("select 2"))  # audit: forked crossed
            else:
                with Session(engine) as own:
                    own.execute(text("select 2"))
        except BaseException as error:  # report it: os._exit() prints nothing
            print(f"child failed: {error!r}", file=sys.stderr)
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    session.close()
    engine.dispose()
    print(f"fork_app {variant}: done")
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
