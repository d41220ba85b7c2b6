"""SS103 and SS104: one session, or its objects, reached by more than one concurrent unit.

SS103. A session created at module level (``session = Session(engine)``, ``session =
SessionLocal()`` with a sessionmaker, in this module or imported from another scanned one) used
inside an ``async def`` (every task running it shares the session) or inside a function this
module starts as a thread, greenlet, task or executor job (``Thread(target=f)``,
``gevent.spawn(f)``, ``executor.submit(f)``, ``asyncio.to_thread(f)``...). Reported once per
function and name, at the first use. Only functions started *by name in the same module* are known
to be targets; methods (``target=self.run``), ``Thread`` subclasses and functions started from
another module are not followed.

SS104. A session or ORM object handed to a call that starts another unit (see ``_spawns``).
"A session or ORM object" is what ``_values`` can prove from the source, nothing more: names bound
from ``Session(...)``, a sessionmaker or registry call, ``with ... as session``, ``session.get()``,
``session.merge()``, ``session.scalars(select(Mapped)).first()``, ``session.query(Mapped).one()``,
``session.execute(select(Mapped)).scalar_one()``, the constructor of a mapped class, loops over such
results, and parameters annotated with ``Session``/``AsyncSession`` or a mapped class. Each value
handed over is reported at its own position; so is ``target=session.commit`` (a bound method of a
session hands the session over).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

from ._findings import Finding
from ._module import SourceModule
from ._spawns import Spawn, spawn_of
from ._values import SHARED_STATE, Kind, Scope

Nodes = list[tuple[Scope, ast.AST]]


def spawns(module: SourceModule, nodes: Nodes) -> list[tuple[Scope, Spawn]]:
    found = []
    for scope, node in nodes:
        if isinstance(node, ast.Call):
            spawn = spawn_of(node, module)
            if spawn is not None:
                found.append((scope, spawn))
    return found


def check_module_sessions(module: SourceModule, nodes: Nodes) -> Iterator[Finding]:
    started: dict[str, str] = {}  # function name -> how it is started
    started_lambdas: dict[int, str] = {}
    for _, spawn in spawns(module, nodes):
        article = "an" if spawn.unit[0] in "aeiou" else "a"
        how = f"runs as {article} {spawn.unit} ({_label(spawn.call)}, line {spawn.call.lineno})"
        if isinstance(spawn.target, ast.Name):
            started.setdefault(spawn.target.id, how)
        elif isinstance(spawn.target, ast.Lambda):
            started_lambdas[id(spawn.target)] = how
    reported: set[tuple[int, str]] = set()
    for scope, node in nodes:
        if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)):
            continue
        function = scope.node
        if isinstance(function, ast.AsyncFunctionDef):
            where = f"async def {function.name}, which every task running it shares"
        elif isinstance(function, ast.FunctionDef) and function.name in started:
            where = f"{function.name}, which {started[function.name]}"
        elif isinstance(function, ast.Lambda) and id(function) in started_lambdas:
            where = f"a lambda which {started_lambdas[id(function)]}"
        else:
            continue
        kind, origin = scope.lookup(node.id)
        if kind != "session" or (origin is not None and not origin.is_module):
            continue
        if (id(function), node.id) in reported:
            continue
        reported.add((id(function), node.id))
        yield Finding(
            module.path,
            node.lineno,
            node.col_offset + 1,
            "SS103",
            f"module-level session {node.id!r} is used in {where}: concurrent units share one "
            "Session, its transaction, its connection and its objects",
            "give each unit its own session: a sessionscope.scoped_session(sessionmaker(engine)) "
            "at module level instead of a Session, or `with Session.scope() as session:` "
            "(or `with Session(engine) as session:`) inside the function",
        )


def check_hand_offs(module: SourceModule, nodes: Nodes) -> Iterator[Finding]:
    # `await asyncio.create_task(work(session))`: the caller waits, nothing runs concurrently
    awaited = {id(node.value) for node in module.nodes if isinstance(node, ast.Await)}
    for scope, spawn in spawns(module, nodes):
        if not spawn.concurrent or (spawn.unit == "task" and id(spawn.call) in awaited):
            continue
        handed = list(spawn.handed)
        target = spawn.target
        if isinstance(target, ast.Attribute) and scope.classify(target.value) in SHARED_STATE:
            handed.append(target.value)
        for value in handed:
            kind = scope.classify(value)
            if kind in SHARED_STATE:
                yield _hand_off(module, spawn, value, kind)


def _hand_off(module: SourceModule, spawn: Spawn, value: ast.expr, kind: Kind | None) -> Finding:
    elsewhere = spawn.unit in ("Celery task", "process")  # another process: pickled, not shared
    if kind == "session":
        what = "a Session"
        fix = (
            f"let the {spawn.unit} open its own session (sessionscope.scoped_session, or "
            "Session.scope() inside it) and hand it ids"
            + ("" if elsewhere else ", or objects through sessionscope.copy_to()")
        )
    else:
        what = "ORM objects" if kind == "orm_list" else "an ORM object"
        fix = (
            "pass primary keys (or sessionscope.ship(obj), received with receive()) and load "
            f"them in the {spawn.unit}'s own session"
            + ("" if elsewhere else ", or copy them there with sessionscope.copy_to(session, obj)")
        )
        if spawn.unit == "Celery task":
            fix += "; sessionscope.celery.install() ships ORM arguments for you"
    if spawn.unit in ("thread", "greenlet", "executor job", "task", "Celery task"):
        fix += (
            "; for one call per item, sessionscope.fan_out(fn, items, session=Session) runs each "
            "in a unit and session of its own and ships ORM objects both ways"
        )
    if elsewhere:
        problem = "gets a pickled copy, detached from any session (or none at all)"
    else:
        problem = (
            "runs concurrently with this one: both would use one Session, its connection and "
            "its identity map"
        )
    return Finding(
        module.path,
        value.lineno,
        value.col_offset + 1,
        "SS104",
        f"{what} ({ast.unparse(value)}) handed to another {spawn.unit} by "
        f"{_label(spawn.call)}, which {problem}",
        fix,
    )


def _label(call: ast.Call) -> str:
    text = ast.unparse(call.func)
    return text if len(text) <= 40 else "..." + text[-37:]
