"""An engine connected at import, then the process forks: the child inherits the connection."""

import os

from sqlalchemy import create_engine, text

engine = create_engine("postgresql+psycopg://localhost/app")
with engine.connect() as connection:  # expect: SS105
    VERSION = connection.execute(text("select version()")).scalar()

if os.fork() == 0:
    with engine.connect() as connection:
        connection.execute(text("select 1"))
