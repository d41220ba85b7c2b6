"""Flask-SQLAlchemy's ``db.session`` under ``unit_scoped`` with gevent greenlets (no patching).

    python flask_sqlalchemy_gevent.py URL

Thirty requests run as gevent greenlets of one thread through Flask's test client, switching at
``gevent.sleep`` while their sessions hold flushed rows; every fifth fails after its flush. A
greenlet spawned by a request touches the request's object. Prints the facts as JSON: whether the
sessions were distinct, the status codes, the rows committed, the cross-greenlet outcome and the
connections left checked out.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import gevent
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sessionscope.flask_sqlalchemy import unit_scoped


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
unit_scoped(db)  # before init_app


class Item(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "fsa_green_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = sys.argv[1]
app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": 5, "max_overflow": 40}
app.config["PROPAGATE_EXCEPTIONS"] = False
db.init_app(app)
live_sessions: dict[str, int] = {}
overlap: list[int] = []


@app.post("/add/<name>")
def add(name: str) -> str:
    db.session.add(Item(name=name))
    db.session.flush()
    live_sessions[name] = id(db.session())
    overlap.append(len(live_sessions))
    gevent.sleep(0.01)  # the other requests run here, their sessions alive
    assert live_sessions[name] == id(db.session())
    if name.startswith("bad"):
        raise RuntimeError("this request fails after its flush")
    db.session.commit()
    return "ok"


@app.get("/cross")
def cross() -> str:
    item = db.session.scalars(sa.select(Item).limit(1)).one()
    other = gevent.spawn(setattr, item, "name", "changed")
    other.join()
    return type(other.exception).__name__ if other.exception else "no error"


def main() -> None:
    with app.app_context():
        db.drop_all()
        db.create_all()
    client = app.test_client()
    names = [f"bad{n}" if n % 5 == 0 else f"ok{n}" for n in range(30)]
    jobs = [gevent.spawn(client.post, f"/add/{name}") for name in names]
    gevent.joinall(jobs, raise_error=True)
    codes = {name: job.value.status_code for name, job in zip(names, jobs, strict=True)}
    cross = client.get("/cross").get_data(as_text=True)
    with app.app_context():
        rows = sorted(db.session.scalars(sa.select(Item.name)))
        unchanged = "changed" not in rows
        db.session.close()
        checked_out = db.engine.pool.checkedout()
        db.drop_all()
    facts: dict[str, Any] = {
        "distinct_sessions": len(set(live_sessions.values())),
        "max_overlap": max(overlap),
        "codes": codes,
        "rows": rows,
        "cross": cross,
        "unchanged": unchanged,
        "checked_out": checked_out,
    }
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
