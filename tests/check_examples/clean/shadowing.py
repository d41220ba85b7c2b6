"""Names that look like module-level sessions but are not, where it matters."""

import threading

from sqlalchemy import create_engine
from sqlalchemy.orm import Session

session = Session(create_engine("sqlite://"))


async def handler(session: object) -> None:
    print(session)  # the parameter, not the module's session


def job() -> None:
    session = Session(create_engine("sqlite://"))
    session.close()


def main() -> None:
    threading.Thread(target=job).start()
    session.close()  # only the main thread uses the module's session


def ambiguous(flag: bool) -> None:
    value = Session(create_engine("sqlite://")) if flag else None
    other = Session(create_engine("sqlite://"))
    other = "not a session any more"
    threading.Thread(target=print, args=(value, other)).start()
