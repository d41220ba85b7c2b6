"""A registry in a module of its own; greenlet_app.py runs it under gevent (SS101, project-wide)."""

from sqlalchemy import create_engine
from sqlalchemy.orm import scoped_session, sessionmaker

engine = create_engine("sqlite:///app.db")
SessionLocal = sessionmaker(engine)
Session = scoped_session(SessionLocal)  # expect: SS101
