"""The scanned files as one project: which classes are mapped, what module-level names hold.

A check of one file alone would miss that ``SessionLocal`` (imported from ``app/db.py``) is a
sessionmaker, or that ``User`` (from ``app/models.py``) is mapped. So every file given on the
command line is parsed first, and the rules then see the project's facts:

- mapped classes: a class with ``__tablename__``, a subclass of a ``DeclarativeBase`` subclass, of
  a ``declarative_base()``, of ``db.Model`` (Flask-SQLAlchemy), or of a mapped class; a class
  decorated with ``@registry.mapped`` or given to ``map_imperatively``; a subclass of a ``Base``
  imported from a module that was not scanned (the usual name of a declarative base);
- the kind (engine, sessionmaker, registry, session...) of every module-level name, found by
  re-reading the modules until nothing changes (module A's session comes from B's maker).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import _known
from ._module import SourceModule
from ._values import Known, Scope, module_scope

_T = TypeVar("_T")


@dataclass
class Project:
    modules: list[SourceModule]
    known: Known = field(default_factory=Known)
    scopes: dict[str, Scope] = field(default_factory=dict)  # by module path
    _memo: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.known.mapped = _mapped_classes(self.modules)
        for _ in range(len(self.modules) + 1):  # each pass resolves at least one more level
            before = dict(self.known.globals)
            for module in self.modules:
                scope = module_scope(module, self.known)
                self.scopes[module.path] = scope
                for name, kind in scope.kinds.items():
                    if kind is not None and kind != "none":
                        self.known.globals[f"{module.name}.{name}"] = kind
            if self.known.globals == before:
                break

    def memo(self, key: str, compute: Callable[[], _T]) -> _T:
        """``compute()`` once per project: facts several rules or modules ask for."""
        if key not in self._memo:
            self._memo[key] = compute()
        result: _T = self._memo[key]
        return result

    @property
    def module_names(self) -> set[str]:
        return {module.name for module in self.modules}


def _mapped_classes(modules: list[SourceModule]) -> set[str]:
    names = {module.name for module in modules}
    flask_dbs = _flask_sqlalchemy_names(modules)
    bases: set[str] = set()
    mapped: set[str] = set()
    classes: list[tuple[SourceModule, ast.ClassDef]] = []
    for module in modules:
        for node in module.nodes:
            if isinstance(node, ast.ClassDef):
                classes.append((module, node))
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                func = node.value.func
                is_base = module.qualname(func) in _known.DECLARATIVE_BASE_FUNCTIONS or (
                    isinstance(func, ast.Attribute) and func.attr == "generate_base"
                )
                if is_base:
                    bases.update(
                        f"{module.name}.{t.id}" for t in node.targets if isinstance(t, ast.Name)
                    )
            elif isinstance(node, ast.Call) and node.args:
                func = node.func
                imperative = isinstance(func, ast.Attribute) and func.attr == "map_imperatively"
                if imperative and isinstance(node.args[0], ast.Name):
                    mapped.add(f"{module.name}.{node.args[0].id}")
    changed = True
    while changed:
        changed = False
        for module, cls in classes:
            qualname = f"{module.name}.{cls.name}"
            if qualname in mapped or qualname in bases:
                continue
            kind = _class_kind(module, cls, bases, mapped, names, flask_dbs)
            if kind == "base":
                bases.add(qualname)
                changed = True
            elif kind == "mapped":
                mapped.add(qualname)
                changed = True
    return mapped


def _class_kind(
    module: SourceModule,
    cls: ast.ClassDef,
    bases: set[str],
    mapped: set[str],
    project_modules: set[str],
    flask_dbs: set[str],
) -> str | None:
    body_names = {
        target.id
        for stmt in cls.body
        for target in (
            stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
        )
        if isinstance(target, ast.Name)
    }
    abstract = any(
        isinstance(stmt, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__abstract__" for t in stmt.targets)
        and isinstance(stmt.value, ast.Constant)
        and stmt.value.value is True
        for stmt in cls.body
    )
    decorated = any(
        (isinstance(d, ast.Attribute) and d.attr == "mapped")
        or (module.qualname(d.func if isinstance(d, ast.Call) else d) or "").endswith(
            "mapped_as_dataclass"
        )
        for d in cls.decorator_list
    )
    if decorated or "__tablename__" in body_names or "__table__" in body_names:
        return "mapped"
    declarative = False
    for base in cls.bases:
        qualname = module.qualname(base)
        if qualname in _known.DECLARATIVE_BASE_CLASSES:
            return "base"
        if qualname in mapped:
            return "mapped"
        flask_model = (
            isinstance(base, ast.Attribute)
            and base.attr == "Model"
            and isinstance(base.value, ast.Name)
            and base.value.id in flask_dbs
        )
        foreign_base = (  # `from app.models import Base` when app/models.py is not scanned
            isinstance(base, ast.Name)
            and base.id in module.aliases
            and qualname is not None
            and qualname.rsplit(".", 1)[-1] == "Base"
            and qualname.rsplit(".", 1)[0] not in project_modules
        )
        if qualname in bases or flask_model or foreign_base:
            declarative = True
    if declarative:
        return "base" if abstract else "mapped"
    return None


def _flask_sqlalchemy_names(modules: list[SourceModule]) -> set[str]:
    """Names bound to ``SQLAlchemy(...)`` (Flask-SQLAlchemy) anywhere: ``db`` in ``db.Model``."""
    found: set[str] = set()
    for module in modules:
        for node in module.nodes:
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and module.qualname(node.value.func) in _known.FLASK_SQLALCHEMY
            ):
                found.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return found
