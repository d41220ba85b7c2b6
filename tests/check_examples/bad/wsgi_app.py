"""Imported by the gunicorn master (preload_app = True) and creating tables at import."""

from sqlalchemy import create_engine

from models import Base

engine = create_engine("postgresql+psycopg://localhost/app")
Base.metadata.create_all(engine)  # expect: SS105


def app(environ: dict[str, object], start_response: object) -> list[bytes]:
    return [b"ok"]
