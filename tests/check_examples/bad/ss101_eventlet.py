"""Patched too late: the registry is created before eventlet.monkey_patch()."""

import eventlet
import sqlalchemy.orm
from sqlalchemy import create_engine

Registry = sqlalchemy.orm.scoped_session(  # expect: SS101
    sqlalchemy.orm.sessionmaker(create_engine("sqlite://"))
)
eventlet.monkey_patch()
