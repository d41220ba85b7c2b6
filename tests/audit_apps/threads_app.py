"""Threads: ``python threads_app.py planted|clean DATABASE_URL``.

planted: a session made in the main thread is used by a worker thread (cross-unit), and an ORM
object loaded in the main thread is changed by another thread (object touched by another unit);
clean: each thread makes its own session and gets the row by its primary key.
"""

from __future__ import annotations

import sys
import threading

from sqlalchemy import String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "audit_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


def in_thread(target: object) -> None:
    thread = threading.Thread(target=target)  # type: ignore[arg-type]
    thread.start()
    thread.join()


def planted(engine: object) -> None:
    Local = sessionmaker(engine)
    session = Local()  # audit: cross-unit object created
    item = session.scalars(select(Item)).one()

    def count() -> None:
        session.scalars(select(Item)).all()  # audit: cross-unit crossed

    def rename() -> None:
        item.name = "renamed by a worker"  # audit: object crossed

    in_thread(count)
    in_thread(count)  # the same violation again: one finding, counted twice
    in_thread(rename)
    session.rollback()
    session.close()


def clean(engine: object) -> None:
    Local = sessionmaker(engine)
    with Local() as session:
        item_id = session.scalars(select(Item.id)).one()

    def count() -> None:
        with Local() as own:
            own.scalars(select(Item)).all()

    def rename() -> None:
        with Local() as own, own.begin():
            own.get_one(Item, item_id).name = "renamed by a worker"

    in_thread(count)
    in_thread(rename)


def main() -> None:
    variant, url = sys.argv[1], sys.argv[2]
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add(Item(name="first"))
    (planted if variant == "planted" else clean)(engine)
    engine.dispose()
    print(f"threads_app {variant}: done")


if __name__ == "__main__":
    main()
