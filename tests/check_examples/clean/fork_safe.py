"""Engines used at import, then forking, done safely."""

import multiprocessing
import os

from sqlalchemy import create_engine, text

engine = create_engine("postgresql+psycopg://localhost/app")
with engine.connect() as connection:
    connection.execute(text("select 1"))
os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))

lazy = create_engine("postgresql+psycopg://localhost/app")  # not used at import


def child() -> None:
    with lazy.connect() as connection:
        connection.execute(text("select 1"))


if __name__ == "__main__":
    if os.fork() == 0:
        child()
    multiprocessing.Process(target=child).start()
