"""gevent patches threading before the registry exists: threading.local is greenlet-local."""

from gevent import monkey

monkey.patch_all()

from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import scoped_session, sessionmaker  # noqa: E402

Registry = scoped_session(sessionmaker(create_engine("sqlite://")))
