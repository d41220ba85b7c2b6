"""Every handle a guarded session gives out, misused by a unit that does not own the session.

Shared by ``tests/test_guard_handles.py`` (threads and asyncio tasks, in process) and
``tests/scenarios/guard_handles_green.py`` (gevent greenlets, monkey-patched, in a subprocess), so
that both misuse exactly the same handles in exactly the same way. Nothing here imports pytest.

A :class:`Handle` is one misuse. :func:`misuse_and_carry_on` is the owner's side of it, as a
generator: the owner opens a session, does Core work through ``session.connection()``, loads an
object and prepares the handle; it yields the misuse (a function) to the caller, which runs it in
another unit and sends back the :class:`Outcome`; the owner then carries on with its transaction,
commits once and closes, and the generator returns what was observed (``Facts``), as plain
JSON-friendly data. The caller compares those facts with :func:`expected_facts`.

What is observed, through engine events (``before_cursor_execute``, ``commit``, ``rollback`` and
the savepoint events), ORM ``load`` events and a connection of its own (``side_rows``):

- what the misuse did: the error's type and message, and every event while it ran (none, if the
  guard stopped it before anything reached the database or the session's identity map);
- whether the owner's transaction survived: the owner still sees its own uncommitted rows on its
  connection, and nobody else sees them committed yet;
- the owner's own checks of the handle (``Handle.after``): the result still has all its rows, the
  object is not marked, the session attribute is unchanged;
- what the owner's single commit leaves in the database, and that the pool got its connection back.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, insert, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.attributes import flag_dirty, flag_modified, set_committed_value
from sqlalchemy.pool import NullPool

from tests.models import Base, Row

SEEDS = 5
"""Rows ``("seed", n)`` for n in 0..4, ids 1..5, committed before each case."""
OWNER = "owner"
"""The owner's Core row, inserted through ``session.connection()`` before the misuse."""
SAVEPOINT = "owner-savepoint"
"""The owner's row inside a savepoint, in the cases about savepoints."""
INTRUDER = "intruder"
"""Rows the misuses try to write: never committed."""


# -- what reached the database -------------------------------------------------------------------


class EngineEvents:
    """Statements (by their first word), commits, rollbacks and savepoints, in order; and every
    ``Row`` the ORM loads from a fetched row (``LOAD``) into a session of this engine (or one
    with no engine of its own).

    Loads are a class-wide event: a thread another test left running in this process, loading
    rows on its own engine, must not be logged as something a misuse here did.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.log: list[str] = []
        self._listeners: list[tuple[Any, str, Callable[..., None]]] = [
            (engine, "before_cursor_execute", self._statement),
            (engine, "commit", lambda conn: self.log.append("COMMIT")),
            (engine, "rollback", lambda conn: self.log.append("ROLLBACK")),
            (engine, "savepoint", lambda conn, name: self.log.append("SAVEPOINT")),
            (engine, "rollback_savepoint", lambda conn, name, ctx: self.log.append("ROLLBACK TO")),
            (engine, "release_savepoint", lambda conn, name, ctx: self.log.append("RELEASE")),
            (Row, "load", self._load),
        ]
        for target, name, listener in self._listeners:
            event.listen(target, name, listener)

    def _load(self, target: Any, context: Any) -> None:
        bind = getattr(context.session, "bind", None)
        if bind is None or bind is self.engine:
            self.log.append("LOAD")

    def _statement(self, conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        self.log.append(statement.split(None, 1)[0].upper())

    def since(self, mark: int) -> list[str]:
        return self.log[mark:]

    def detach(self) -> None:
        for target, name, listener in self._listeners:
            event.remove(target, name, listener)


def side_engine(engine: Engine) -> Engine:
    """An engine of its own on the same database (no pool), for setup and reading back."""
    return create_engine(engine.url, poolclass=NullPool)


def side_rows(engine: Engine) -> dict[str, int]:
    """Committed rows per owner, read on a connection of its own."""
    side = side_engine(engine)
    try:
        with side.connect() as conn:
            return dict(Counter(conn.scalars(select(Row.owner)).all()))
    finally:
        side.dispose()


def reset_tables(engine: Engine) -> None:
    """Empty tables (ids from 1 again) with the seed rows committed."""
    side = side_engine(engine)
    try:
        with side.begin() as conn:
            if side.dialect.name == "postgresql":
                conn.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
                names = ", ".join(t.name for t in Base.metadata.sorted_tables)
                conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY")
            else:
                for table in reversed(Base.metadata.sorted_tables):
                    conn.execute(table.delete())
            conn.execute(insert(Row), [{"owner": "seed", "n": n} for n in range(SEEDS)])
    finally:
        side.dispose()


# -- the handles ---------------------------------------------------------------------------------


@dataclass
class World:
    """What the owner has when it prepares a misuse."""

    session: Session
    connection: Connection
    row: Row  # the seed row id 1 (n=0), loaded and clean
    transaction: SessionTransaction | None  # session.begin(), for the cases that begin explicitly
    extras: dict[str, Any] = field(default_factory=dict)


Action = Callable[[], Any]


def _owner_rows(world: World) -> int:
    """The owner's rows as its own connection sees them (uncommitted ones included)."""
    count = select(func.count()).select_from(Row).where(Row.owner.in_((OWNER, SAVEPOINT)))
    return int(world.connection.scalar(count) or 0)


def _commit(world: World) -> None:
    world.session.commit()


@dataclass(frozen=True)
class Handle:
    """One misuse: ``prepare`` runs in the owner and returns what the other unit does.

    ``did`` is what the refusal says the other unit did. ``after`` (in the owner, after the
    refusal) returns facts that must equal ``expected_after``; ``finish`` is the owner's one
    commit. ``savepoint_rows`` are rows the owner writes in a savepoint it commits.
    """

    name: str
    prepare: Callable[[World], Action]
    did: str
    begin: bool = False
    after: Callable[[World], dict[str, Any]] | None = None
    expected_after: dict[str, Any] = field(default_factory=dict)
    finish: Callable[[World], None] = _commit
    savepoint_rows: int = 0
    known_failure: str | None = None  # the reason, when the guard does not cover it yet


def _intruder_insert(n: int) -> Any:
    return insert(Row).values(owner=INTRUDER, n=n)


def _raw_insert(n: int) -> str:
    return f"INSERT INTO ss_rows (owner, n) VALUES ('{INTRUDER}', {n})"


CONNECTION = "called Session.connection()."


def _connection_handles() -> list[Handle]:
    def on_connection(name: str, use: Callable[[Connection], Any], did: str) -> Handle:
        return Handle(f"connection.{name}", lambda w: lambda: use(w.connection), CONNECTION + did)

    count = select(func.count()).select_from(Row)
    return [
        on_connection("execute", lambda c: c.execute(_intruder_insert(1)), "execute()"),
        on_connection(
            "exec_driver_sql", lambda c: c.exec_driver_sql(_raw_insert(2)), "exec_driver_sql()"
        ),
        on_connection("scalar", lambda c: c.scalar(count), "scalar()"),
        on_connection("scalars", lambda c: c.scalars(select(Row.id)).all(), "scalars()"),
        # the reported bug: another thread committed the owner's Core-only transaction
        on_connection("commit", lambda c: c.commit(), "commit()"),
        on_connection("rollback", lambda c: c.rollback(), "rollback()"),
        on_connection("begin", lambda c: c.begin(), "begin()"),
        on_connection("begin_nested", lambda c: c.begin_nested(), "begin_nested()"),
        on_connection("close", lambda c: c.close(), "close()"),
        on_connection("invalidate", lambda c: c.invalidate(), "invalidate()"),
        on_connection("detach", lambda c: c.detach(), "detach()"),
        on_connection(
            "execution_options",
            lambda c: c.execution_options(isolation_level="SERIALIZABLE"),
            "execution_options()",
        ),
        on_connection(
            "get_transaction().commit",
            lambda c: c.get_transaction().commit(),  # type: ignore[union-attr]
            "get_transaction()",
        ),
    ]


def _root_transaction(world: World) -> Action:
    root = world.connection.get_transaction()
    assert root is not None
    return root.commit


def _engine_savepoint(world: World) -> Action:
    nested = world.extras["nested"] = world.connection.begin_nested()
    world.connection.execute(insert(Row).values(owner=SAVEPOINT, n=1))
    return nested.rollback


def _commit_engine_savepoint(world: World) -> None:
    world.extras["nested"].commit()
    world.session.commit()


def _engine_transaction_handles() -> list[Handle]:
    # ``did``: what the refusal will say is the fix's choice; any refusal names the Session
    return [
        Handle(
            "connection.get_transaction() handle, commit",
            _root_transaction,
            "Session",
        ),
        Handle(
            "connection.begin_nested() handle, rollback",
            _engine_savepoint,
            "Session",
            finish=_commit_engine_savepoint,
            savepoint_rows=1,
        ),
    ]


def _commit_transaction(world: World) -> None:
    assert world.transaction is not None
    world.transaction.commit()


def _session_savepoint(world: World) -> SessionTransaction:
    savepoint = world.extras["savepoint"] = world.session.begin_nested()
    world.connection.execute(insert(Row).values(owner=SAVEPOINT, n=1))
    return savepoint


def _commit_session_savepoint(world: World) -> None:
    world.extras["savepoint"].commit()
    world.session.commit()


def _transaction_handles() -> list[Handle]:
    def begun(name: str, use: Callable[[SessionTransaction], Any]) -> Handle:
        """``tx = session.begin()`` by the owner, with Core work only (no ORM object pending)."""
        return Handle(
            f"session.begin() handle, {name}",
            lambda w: lambda: use(w.transaction),  # type: ignore[arg-type]
            f"called Session.begin().{name}()",
            begin=True,
            finish=_commit_transaction,
        )

    def savepoint(name: str, use: Callable[[SessionTransaction], Any]) -> Handle:
        def prepare(world: World) -> Action:
            savepoint = _session_savepoint(world)
            return lambda: use(savepoint)

        return Handle(
            f"session.begin_nested() handle, {name}",
            prepare,
            f"called Session.begin().{name}()",
            finish=_commit_session_savepoint,
            savepoint_rows=1,
        )

    return [
        begun("commit", lambda tx: tx.commit()),
        begun("rollback", lambda tx: tx.rollback()),
        begun("close", lambda tx: tx.close()),
        begun("prepare", lambda tx: tx.prepare()),
        begun("__exit__", lambda tx: tx.__exit__(None, None, None)),
        savepoint("commit", lambda tx: tx.commit()),
        savepoint("rollback", lambda tx: tx.rollback()),
        Handle(
            "session.get_transaction() handle (autobegun), commit",
            lambda w: w.session.get_transaction().commit,  # type: ignore[union-attr]
            "called Session.begin().commit()",
        ),
        # what a transaction hands out is guarded with it: its connection, its parent
        Handle(
            "session.get_transaction() handle, connection().execute",
            lambda w: (
                lambda: (
                    w.session.get_transaction()  # type: ignore[union-attr]
                    .connection(None)
                    .execute(_intruder_insert(3))
                )
            ),
            "called Session.begin().connection()",
        ),
        Handle(
            "session.begin_nested() handle, parent.commit",
            lambda w: _session_savepoint(w).parent.commit,  # type: ignore[union-attr]
            "called Session.begin().commit()",
            finish=_commit_session_savepoint,
            savepoint_rows=1,
        ),
    ] + _bound_connection_handles()


def _executing_intruder(connection: Connection) -> Action:
    return lambda: connection.execute(_intruder_insert(4))


def _bound_connection_handles() -> list[Handle]:
    """SQLAlchemy 2.1.7 added ``SessionTransaction.bound_connection()`` and ``connections``."""
    if not hasattr(SessionTransaction, "bound_connection"):
        return []
    return [
        Handle(
            "session.get_transaction() handle, bound_connection().execute",
            lambda w: _executing_intruder(
                w.session.get_transaction().bound_connection()  # type: ignore[union-attr]
            ),
            "called Session.connection().execute()",
        ),
        Handle(
            "session.get_transaction() handle, connections, commit",
            lambda w: next(iter(w.session.get_transaction().connections)).commit,  # type: ignore[union-attr]
            "called Session.connection().commit()",
        ),
    ]


FETCHED = "fetched rows of a result of this Session"
SEED_ROWS = select(Row).where(Row.owner == "seed").order_by(Row.id)
SEED_TABLE_ROWS = select(Row.__table__).where(Row.owner == "seed").order_by(Row.id)


def _result_after(world: World) -> dict[str, Any]:
    """The owner's result lost no row, and the refused fetch loaded nothing into the session."""
    loaded = len(world.session.identity_map) - world.extras["identity_map"]
    return {"loaded_by_the_refused_fetch": loaded, "owner_fetches": len(world.extras["all"]())}


def _result_handles() -> list[Handle]:
    def result_of(
        name: str,
        make: Callable[[World], Any],
        use: Callable[[Any], Any],
        all_rows: Callable[[Any], Callable[[], list[Any]]] = lambda r: r.all,
        owner_fetches: int = SEEDS,
        **kw: Any,
    ) -> Handle:
        def prepare(world: World) -> Action:
            result = make(world)
            world.extras.update(identity_map=len(world.session.identity_map), all=all_rows(result))
            return lambda: use(result)

        return Handle(
            f"result: {name}",
            prepare,
            FETCHED,
            after=_result_after,
            expected_after={"loaded_by_the_refused_fetch": 0, "owner_fetches": owner_fetches},
            **kw,
        )

    def started_by_the_owner(world: World) -> Any:
        rows = iter(world.connection.execute(SEED_TABLE_ROWS))
        next(rows)  # the owner began iterating
        return rows

    def orm(w: World) -> Any:
        return w.session.execute(SEED_ROWS)

    return [
        result_of("session.execute(), iterated", orm, list),
        result_of("session.execute(), fetchone", orm, lambda r: r.fetchone()),
        result_of("session.execute(), fetchmany", orm, lambda r: r.fetchmany(2)),
        result_of("session.execute(), fetchall", orm, lambda r: r.fetchall()),
        result_of("session.execute(), first", orm, lambda r: r.first()),
        result_of("session.execute(), .scalars().all()", orm, lambda r: r.scalars().all()),
        result_of("session.execute(), .mappings() iterated", orm, lambda r: list(r.mappings())),
        result_of("session.execute(), partitions()", orm, lambda r: next(r.partitions(2))),
        result_of("session.execute(), freeze()", orm, lambda r: r.freeze()),
        result_of(
            "session.execute(), yield_per",
            lambda w: w.session.execute(SEED_ROWS.execution_options(yield_per=2)),
            lambda r: next(iter(r)),
        ),
        result_of("session.scalars(), iterated", lambda w: w.session.scalars(SEED_ROWS), list),
        result_of(
            "session.execute().scalars() filter, iterated",
            lambda w: w.session.execute(SEED_ROWS).scalars(),
            list,
        ),
        result_of(
            "connection.execute(), iterated",
            lambda w: w.connection.execute(SEED_TABLE_ROWS),
            list,
        ),
        result_of(
            "connection.exec_driver_sql(), fetchall",
            lambda w: w.connection.exec_driver_sql(
                "SELECT id FROM ss_rows WHERE owner = 'seed' ORDER BY id"
            ),
            lambda r: r.fetchall(),
        ),
        result_of(
            "connection.scalars(), iterated",
            lambda w: w.connection.scalars(select(Row.id).where(Row.owner == "seed")),
            list,
        ),
        result_of(
            "connection.execute(), an iterator the owner started, continued",
            started_by_the_owner,
            list,
            all_rows=lambda rows: lambda: list(rows),
            owner_fetches=SEEDS - 1,
        ),
    ]


def _unmarked(world: World) -> dict[str, Any]:
    """The owner's object is as loaded: not modified, not dirty, its value unchanged."""
    row = world.row
    return {
        "dirty": row in world.session.dirty,
        "is_modified": world.session.is_modified(row),
        "n": row.n,
    }


def _state_unmarked(world: World) -> dict[str, Any]:
    return {"state.modified": inspect(world.row).modified}


UNMARKED = {"dirty": False, "is_modified": False, "n": 0}


def _object_handles() -> list[Handle]:
    def on_row(name: str, use: Callable[[Row], Any], did: str, **kw: Any) -> Handle:
        kw.setdefault("after", _unmarked)
        kw.setdefault("expected_after", UNMARKED)
        return Handle(name, lambda w: lambda: use(w.row), did, **kw)

    return [
        on_row("flag_modified()", lambda r: flag_modified(r, "n"), "wrote Row.n"),
        on_row("flag_dirty()", flag_dirty, "flagged a Row attached to it as modified"),
        on_row(
            "flag_dirty(), the object's state",
            flag_dirty,
            "flagged a Row attached to it as modified",
            after=_state_unmarked,
            expected_after={"state.modified": False},
        ),
        on_row(
            "set_committed_value()",
            lambda r: set_committed_value(r, "n", 99),
            "set the committed value of Row.n",
        ),
        on_row("attribute write", lambda r: setattr(r, "n", 99), "wrote Row.n"),
    ]


def _enter_no_autoflush(session: Session) -> None:
    with session.no_autoflush:
        pass


def _session_state_handles() -> list[Handle]:
    def on_session(name: str, use: Callable[[Session], Any], did: str, **kw: Any) -> Handle:
        return Handle(name, lambda w: lambda: use(w.session), did, **kw)

    configured = {"info": {"owner's": True}, "autoflush": True, "expire_on_commit": True}

    def assigning(name: str, value: Any) -> Handle:
        def prepare(world: World) -> Action:
            world.session.info["owner's"] = True
            return lambda: setattr(world.session, name, value)

        def after(world: World) -> dict[str, Any]:
            s = world.session
            return {
                "info": dict(s.info),
                "autoflush": s.autoflush,
                "expire_on_commit": s.expire_on_commit,
            }

        return Handle(
            f"session.{name} = ...",
            prepare,
            f"assigned Session.{name}",
            after=after,
            expected_after=configured,
        )

    return [
        on_session("session.new", lambda s: s.new, "read Session.new"),
        on_session("session.dirty", lambda s: s.dirty, "read Session.dirty"),
        on_session("session.deleted", lambda s: s.deleted, "read Session.deleted"),
        on_session("iter(session)", list, "called Session.__iter__()"),
        on_session("with session.no_autoflush", _enter_no_autoflush, "Session.no_autoflush"),
        on_session(
            "session.no_autoflush (read)",
            lambda s: s.no_autoflush,
            "read Session.no_autoflush",
        ),
        assigning("info", {}),
        assigning("autoflush", False),
        assigning("expire_on_commit", False),
    ]


HANDLES: list[Handle] = [
    *_connection_handles(),
    *_engine_transaction_handles(),
    *_transaction_handles(),
    *_result_handles(),
    *_object_handles(),
    *_session_state_handles(),
]
BY_NAME = {handle.name: handle for handle in HANDLES}
assert len(BY_NAME) == len(HANDLES), "handle names must be unique"


# -- the owner's side ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the misuse returned or raised."""

    value: Any = None
    error: BaseException | None = None


def attempt(action: Action) -> Outcome:
    try:
        return Outcome(value=action())
    except Exception as error:  # noqa: BLE001 - reported to the owner's side
        return Outcome(error=error)


Facts = dict[str, Any]


def misuse_and_carry_on(
    make_session: Callable[[], Session], engine: Engine, handle: Handle
) -> Generator[Action, Outcome, Facts]:
    """The owner's side of one misuse (see the module docstring); yields the misuse once."""
    events = EngineEvents(engine)
    session: Session | None = None
    facts: Facts = {}
    try:
        session = make_session()
        transaction = session.begin() if handle.begin else None
        connection = session.connection()
        connection.execute(insert(Row).values(owner=OWNER, n=1))  # Core work only
        row = session.get(Row, 1)
        assert row is not None
        world = World(session, connection, row, transaction)
        action = handle.prepare(world)

        mark = len(events.log)
        outcome = yield action
        facts["events_during_misuse"] = events.since(mark)
        facts["error"] = None if outcome.error is None else type(outcome.error).__name__
        facts["message"] = "" if outcome.error is None else str(outcome.error)

        facts["owner_sees_its_rows"] = _owner_rows(world)
        facts["committed_before_owner_commits"] = side_rows(engine)
        facts["after"] = handle.after(world) if handle.after else {}
        mark = len(events.log)
        try:
            handle.finish(world)
            facts["finish_error"] = None
        except Exception as error:  # noqa: BLE001 - a fact: the misuse broke the transaction
            facts["finish_error"] = f"{type(error).__name__}: {error}"
        facts["owner_commits"] = events.since(mark).count("COMMIT")
        facts["updates"] = events.log.count("UPDATE")
    finally:
        if session is not None:
            session.close()
        events.detach()
    facts["rows"] = side_rows(engine)
    facts["checked_out"] = engine.pool.checkedout()  # type: ignore[attr-defined]
    return facts


def expected_facts(handle: Handle) -> Facts:
    """What :func:`misuse_and_carry_on` must observe for a refused misuse (``message`` aside)."""
    rows = {"seed": SEEDS, OWNER: 1}
    if handle.savepoint_rows:
        rows[SAVEPOINT] = handle.savepoint_rows
    return {
        "events_during_misuse": [],
        "error": "CrossUnitError",
        "owner_sees_its_rows": 1 + handle.savepoint_rows,
        "committed_before_owner_commits": {"seed": SEEDS},
        "after": handle.expected_after,
        "finish_error": None,
        "owner_commits": 1,
        "updates": 0,
        "rows": rows,
        "checked_out": 0,
    }


def _finish(owner: Generator[Action, Outcome, Facts], outcome: Outcome) -> Facts:
    try:
        owner.send(outcome)
    except StopIteration as done:
        facts: Facts = done.value
        return facts
    raise AssertionError("the owner yielded twice")


def run_with(
    intrude: Callable[[Action], Outcome], owner: Generator[Action, Outcome, Facts]
) -> Facts:
    """Drive the owner's side, running its misuse through ``intrude`` (which waits for it)."""
    return _finish(owner, intrude(next(owner)))


def run_in_task_before(
    make_session: Callable[[], Session], engine: Engine, handle: Handle
) -> Facts:
    """The owner is an asyncio task; the misuse runs in a task created before its session."""

    async def main() -> Facts:
        inbox: asyncio.Queue[Action] = asyncio.Queue()
        outbox: asyncio.Queue[Outcome] = asyncio.Queue()

        async def early() -> None:
            outbox.put_nowait(attempt(await inbox.get()))

        task = asyncio.create_task(early(), name="early-intruder")
        await asyncio.sleep(0)  # it runs (and waits) before the owner makes its session
        owner = misuse_and_carry_on(make_session, engine, handle)
        inbox.put_nowait(next(owner))
        outcome = await outbox.get()
        await task
        return _finish(owner, outcome)

    return asyncio.run(main())
