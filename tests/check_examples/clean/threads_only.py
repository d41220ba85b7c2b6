"""SQLAlchemy's thread-local registry in a program of plain threads: what it was built for."""

import threading

from sqlalchemy import create_engine, select
from sqlalchemy.orm import scoped_session, sessionmaker

from models import User

Registry = scoped_session(sessionmaker(create_engine("sqlite://")))


def work(user_id: int) -> None:
    Registry.get(User, user_id)
    Registry.remove()


def names() -> list[str]:
    ids = Registry.scalars(select(User.id)).all()
    threading.Thread(target=work, args=(ids[0],)).start()  # ints, not ORM objects
    row = Registry.query(User.name).first()  # a Row of plain values
    threading.Thread(target=print, args=(row,)).start()
    return [str(i) for i in ids]
