"""What a name or an expression holds, as far as the source says: a session, an ORM object...

The rules need to know, without running anything, whether the value handed to a thread is a
``Session`` or an ORM instance, and whether a module-level name is a session. This module follows
assignments in source order through each function (its own scope, then the enclosing ones, then
the module, then what other scanned modules bind at module level) and gives each name a *kind*.

It prefers saying "unknown" to guessing: a name assigned two different kinds of value, a tuple
unpacking, a parameter without a telling annotation, an attribute (``self.session``), a call it does
not recognise, all are unknown, and the rules report nothing about unknowns. Assigning ``None`` and
then a session keeps "session". What is recognised is documented in docs/checks.md.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from . import _known
from ._module import SourceModule

Kind = Literal[
    "none",  # the constant None: does not spoil a later binding
    "engine",
    "maker",  # sessionmaker / async_sessionmaker: calling it makes a session
    "registry",  # scoped_session / async_scoped_session: calling it gives a session
    "session",
    "orm",  # one ORM instance
    "orm_list",  # a list of ORM instances
    "orm_query",  # session.query(Mapped)...
    "orm_rows",  # session.execute(select(Mapped)...)
    "orm_result",  # session.scalars(select(Mapped)...)
    "mapped_class",
]
#: what is "a session or ORM instance" when handed to another unit
SHARED_STATE: frozenset[Kind] = frozenset({"session", "orm", "orm_list"})

Function = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda

_QUERY_CHAIN = frozenset(
    {"filter", "filter_by", "where", "order_by", "join", "outerjoin", "options", "limit",
     "offset", "distinct", "execution_options", "populate_existing", "with_for_update"}
)  # fmt: skip


@dataclass
class Known:
    """Facts about the whole project that names resolve to."""

    mapped: set[str] = field(default_factory=set)  # qualified names of mapped classes
    globals: dict[str, Kind] = field(default_factory=dict)  # module-level bindings' kinds


@dataclass
class Scope:
    """The bindings of one module or function body, and the scope it is nested in."""

    module: SourceModule
    known: Known
    parent: Scope | None
    node: ast.AST
    kinds: dict[str, Kind | None] = field(default_factory=dict)
    declared_global: set[str] = field(default_factory=set)

    @property
    def is_module(self) -> bool:
        return self.parent is None

    def lookup(self, name: str) -> tuple[Kind | None, Scope | None]:
        """The kind of ``name`` here, and the scope binding it (None: another scanned module)."""
        scope: Scope | None = self
        while scope is not None:
            if name in scope.declared_global:
                scope = scope.root()
                continue
            if name in scope.kinds:
                kind = scope.kinds[name]
                return (None if kind == "none" else kind), scope
            scope = scope.parent
        qualname = self.module.qualname(ast.Name(id=name))
        if qualname is not None:
            if qualname in self.known.mapped:
                return "mapped_class", None
            return self.known.globals.get(qualname), None
        return None, None

    def root(self) -> Scope:
        scope = self
        while scope.parent is not None:
            scope = scope.parent
        return scope

    # -- classification ------------------------------------------------------------------------

    def classify(self, expr: ast.expr | None) -> Kind | None:
        if expr is None:
            return None
        if isinstance(expr, ast.Constant) and expr.value is None:
            return "none"
        if isinstance(expr, ast.Await):
            return self.classify(expr.value)
        if isinstance(expr, ast.Name):
            return self.lookup(expr.id)[0]
        if isinstance(expr, ast.Attribute):  # module attribute: `db.SessionLocal`
            qualname = self.module.qualname(expr)
            if qualname in self.known.mapped:
                return "mapped_class"
            return self.known.globals.get(qualname) if qualname else None
        if isinstance(expr, ast.Call):
            return self._classify_call(expr)
        return None

    def _classify_call(self, call: ast.Call) -> Kind | None:
        qualname = self.module.qualname(call.func)
        if qualname in _known.SESSION_CLASSES:
            return "session"
        if qualname in _known.SESSIONMAKERS:
            return "maker"
        if qualname in _known.ENGINE_FACTORIES:
            return "engine"
        if qualname in _known.REGISTRIES:
            return "registry"
        callee = self.classify(call.func) if not isinstance(call.func, ast.Call) else None
        if callee in ("maker", "registry"):
            return "session"
        if callee == "mapped_class":
            return "orm"
        if not isinstance(call.func, ast.Attribute):
            return None
        receiver = self.classify(call.func.value)
        method = call.func.attr
        first = call.args[0] if call.args else None
        if receiver in ("session", "registry"):
            if method in ("get", "get_one", "merge"):
                return "orm"
            if method == "scalars" and self._selects_entity(first):
                return "orm_result"
            if method == "scalar" and self._selects_entity(first):
                return "orm"
            if method == "execute" and self._selects_entity(first):
                return "orm_rows"
            if method == "query" and len(call.args) == 1 and self.classify(first) == "mapped_class":
                return "orm_query"
        elif receiver == "orm_query":
            if method in _QUERY_CHAIN:
                return "orm_query"
            if method in ("first", "one", "one_or_none", "get"):
                return "orm"
            if method == "all":
                return "orm_list"
        elif receiver == "orm_rows":
            if method == "scalars":
                return "orm_result"
            if method in ("scalar_one", "scalar_one_or_none", "scalar"):
                return "orm"
        elif receiver == "orm_result":
            if method == "unique":
                return "orm_result"
            if method in ("first", "one", "one_or_none"):
                return "orm"
            if method == "all":
                return "orm_list"
        return None

    def _selects_entity(self, expr: ast.expr | None) -> bool:
        """``select(Mapped)``, possibly followed by ``.where(...)`` and the like."""
        while (
            isinstance(expr, ast.Call)
            and isinstance(expr.func, ast.Attribute)
            and isinstance(expr.func.value, ast.Call)
        ):
            expr = expr.func.value
        return (
            isinstance(expr, ast.Call)
            and self.module.qualname(expr.func) in _known.SELECTS
            and len(expr.args) == 1
            and self.classify(expr.args[0]) == "mapped_class"
        )

    def annotation_kind(self, annotation: ast.expr | None) -> Kind | None:
        """``Session``, ``AsyncSession``, a mapped class, ``X | None``, ``Optional[X]``, ``"X"``."""
        if annotation is None:
            return None
        if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
            try:
                annotation = ast.parse(annotation.value, mode="eval").body
            except SyntaxError:
                return None
        if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
            sides = (annotation.left, annotation.right)
            kinds = {self.annotation_kind(side) for side in sides if not _is_none(side)}
            return kinds.pop() if len(kinds) == 1 else None
        if isinstance(annotation, ast.Subscript):
            generic = self.module.qualname(annotation.value) or ""
            return self.annotation_kind(annotation.slice) if generic.endswith("Optional") else None
        if self.module.qualname(annotation) in _known.SESSION_CLASSES:
            return "session"
        if self.classify(annotation) == "mapped_class":
            return "orm"
        return None

    def with_kind(self, context: ast.expr) -> Kind | None:
        """What ``with <context> as name`` binds: a session for ``Session(engine)``,
        ``maker()``, ``maker.begin()``, ``registry.scope()``."""
        kind = self.classify(context)
        if kind == "session":
            return kind
        if isinstance(context, ast.Call) and isinstance(context.func, ast.Attribute):
            receiver = self.classify(context.func.value)
            if (receiver, context.func.attr) in (("maker", "begin"), ("registry", "scope")):
                return "session"
        return None

    # -- binding -------------------------------------------------------------------------------

    def bind(self, name: str, kind: Kind | None) -> None:
        if name in self.declared_global:
            return
        old = self.kinds.get(name, "none")
        if old == "none":
            self.kinds[name] = kind
        elif kind != "none" and kind != old:
            self.kinds[name] = None  # two different kinds of value: unknown

    def bind_body(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            self._bind_statement(stmt)

    def _bind_statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, (ast.Global, ast.Nonlocal)):
            self.declared_global.update(stmt.names)
        elif isinstance(stmt, ast.Assign):
            kind = self.classify(stmt.value)
            for target in stmt.targets:
                self._bind_target(target, kind)
        elif isinstance(stmt, ast.AnnAssign):
            kind = self.annotation_kind(stmt.annotation)
            if stmt.value is not None:
                kind = self.classify(stmt.value) or kind
            self._bind_target(stmt.target, kind)
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            iterated = self.classify(stmt.iter)
            self._bind_target(
                stmt.target, "orm" if iterated in ("orm_list", "orm_result") else None
            )
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                if item.optional_vars is not None:
                    self._bind_target(item.optional_vars, self.with_kind(item.context_expr))
        elif isinstance(stmt, ast.ClassDef):
            qualname = f"{self.module.name}.{stmt.name}"
            self.bind(stmt.name, "mapped_class" if qualname in self.known.mapped else None)
            return
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.bind(stmt.name, None)
            return
        for child in _sub_bodies(stmt):
            self.bind_body(child)
        for node in _own_nodes(stmt):  # walrus, except-as, augmented assignment...
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                self.kinds.setdefault(node.id, None)

    def _bind_target(self, target: ast.expr, kind: Kind | None) -> None:
        if isinstance(target, ast.Name):
            self.bind(target.id, kind)
        else:
            for node in ast.walk(target):
                if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    self.bind(node.id, None)


def _is_none(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is None


def _sub_bodies(stmt: ast.stmt) -> Iterator[list[ast.stmt]]:
    for name in ("body", "orelse", "finalbody"):
        body = getattr(stmt, name, None)
        if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
            yield body
    for handler in getattr(stmt, "handlers", ()):
        yield handler.body
    for case in getattr(stmt, "cases", ()):
        yield case.body


def _own_nodes(stmt: ast.stmt) -> Iterator[ast.AST]:
    """The nodes of ``stmt`` outside its sub-bodies and outside nested functions and classes."""
    stack: list[ast.AST] = [stmt]
    bodies = {id(body) for body in _sub_bodies(stmt)}
    while stack:
        node = stack.pop()
        yield node
        for name, value in ast.iter_fields(node):
            if node is stmt and isinstance(value, list) and id(value) in bodies:
                continue
            if name in ("handlers", "cases") and node is stmt:
                continue
            children = value if isinstance(value, list) else [value]
            for child in children:
                if isinstance(child, ast.AST) and not isinstance(
                    child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
                ):
                    stack.append(child)


def module_scope(module: SourceModule, known: Known) -> Scope:
    scope = Scope(module=module, known=known, parent=None, node=module.tree)
    scope.bind_body(module.tree.body)
    return scope


def function_scope(function: Function, parent: Scope) -> Scope:
    scope = Scope(module=parent.module, known=parent.known, parent=parent, node=function)
    arguments = function.args
    every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    every += [arg for arg in (arguments.vararg, arguments.kwarg) if arg is not None]
    for arg in every:
        scope.bind(arg.arg, scope.annotation_kind(arg.annotation))
    if isinstance(function, ast.Lambda):
        for node in ast.walk(function.body):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                scope.kinds.setdefault(node.id, None)
    else:
        scope.bind_body(function.body)
    return scope


def walk_scopes(module: SourceModule, root: Scope) -> Iterator[tuple[Scope, ast.AST]]:
    """Every node of the module with the scope its names are looked up in (the parts of a function
    evaluated where it is defined, decorators and defaults, belong to the enclosing scope)."""
    stack: list[tuple[Scope, ast.AST]] = [(root, module.tree)]
    while stack:
        scope, node = stack.pop()
        if node is not module.tree:
            yield scope, node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = function_scope(node, scope)
            body = node.body if isinstance(node.body, list) else [node.body]
            stack.extend((inner, stmt) for stmt in reversed(body))
            outer = [
                *getattr(node, "decorator_list", ()),
                *node.args.defaults,
                *(default for default in node.args.kw_defaults if default is not None),
            ]
            stack.extend((scope, part) for part in reversed(outer))
        else:
            children = list(ast.iter_child_nodes(node))
            stack.extend((scope, child) for child in reversed(children))
