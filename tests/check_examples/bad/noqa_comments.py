"""noqa: a bare one silences everything on its line, a coded one only its codes."""

import threading

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from models import User


def hand_over(user: User) -> None:
    threading.Thread(target=print, args=(user,))  # noqa: SS104
    threading.Thread(target=print, args=(user,))  # noqa
    threading.Thread(target=print, args=(user,))  # noqa: SS101, SS104
    threading.Thread(target=print, args=(user,))  # noqa: SS101  # expect: SS104
    threading.Thread(target=print, args=(user,), name="# noqa")  # expect: SS104


def session_over() -> None:
    session = Session(create_engine("sqlite://"))
    threading.Thread(target=print, args=(session,))  # NOQA:SS104
