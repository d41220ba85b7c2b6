"""multiprocessing with the 'spawn' start method: children import the module afresh."""

import multiprocessing

from sqlalchemy import create_engine, inspect

engine = create_engine("postgresql+psycopg://localhost/app")
TABLES = inspect(engine).get_table_names()


def child() -> None:
    print(TABLES)


if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    multiprocessing.Process(target=child).start()
