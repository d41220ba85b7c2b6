"""One parsed source file, and the qualified names its expressions stand for.

The rules recognise ``scoped_session``, ``gevent.spawn`` or a project's own ``SessionLocal`` by
the dotted name an expression resolves to through the file's imports (``from sqlalchemy.orm import
scoped_session as ss`` makes ``ss`` mean ``sqlalchemy.orm.scoped_session``), never by importing
anything: the checked code may not even be importable here. Names a file binds at module level
resolve to ``<module>.<name>``, so a project's files can refer to each other's objects.

Imports are read wherever they are in the file, flow-insensitively: an import inside a function
counts for the whole file. That is a simplification, harmless for the names the rules look for.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field


@dataclass
class SourceModule:
    path: str  # as reported
    name: str  # the dotted name the project imports it by
    is_package: bool  # an __init__.py: relative imports start at itself
    tree: ast.Module
    aliases: dict[str, str] = field(default_factory=dict)  # local name -> qualified name
    defined: set[str] = field(default_factory=set)  # names bound at module level
    nodes: list[ast.AST] = field(default_factory=list)  # every node, walked once for all rules

    def __post_init__(self) -> None:
        self.nodes = list(ast.walk(self.tree))
        for node in self.nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.aliases[alias.asname] = alias.name
                    else:  # `import a.b` binds `a`
                        head = alias.name.split(".")[0]
                        self.aliases[head] = head
            elif isinstance(node, ast.ImportFrom):
                base = self._absolute(node.module, node.level)
                for alias in node.names:
                    if alias.name != "*":
                        target = f"{base}.{alias.name}" if base else alias.name
                        self.aliases[alias.asname or alias.name] = target
        for stmt in self.tree.body:
            self.defined.update(_bound_names(stmt))

    def _absolute(self, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        parts = self.name.split(".")
        if not self.is_package:
            parts = parts[:-1]
        if level > 1:
            parts = parts[: len(parts) - (level - 1)]
        if module:
            parts.append(module)
        return ".".join(parts)

    def qualname(self, node: ast.AST) -> str | None:
        """``sqlalchemy.orm.Session`` for ``Session`` after ``from sqlalchemy.orm import Session``;
        ``app.db.engine`` for ``engine`` bound at module level in ``app/db.py``; else None."""
        if isinstance(node, ast.Name):
            if node.id in self.aliases:
                return self.aliases[node.id]
            if node.id in self.defined:
                return f"{self.name}.{node.id}"
            return None
        if isinstance(node, ast.Attribute):
            base = self.qualname(node.value)
            return None if base is None else f"{base}.{node.attr}"
        return None

    def uses_module(self, prefix: str) -> ast.stmt | None:
        """The first import of ``prefix`` (or of a submodule of it), if any."""
        for node in self.nodes:
            if isinstance(node, ast.Import) and any(
                _within(alias.name, prefix) for alias in node.names
            ):
                return node
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and _within(node.module or "", prefix)
            ):
                return node
        return None


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _bound_names(stmt: ast.stmt) -> set[str]:
    """Names a module-level statement binds (looking into if/try/with blocks, not into defs)."""
    names: set[str] = set()
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return names


def module_name(path: str) -> tuple[str, bool]:
    """The dotted name ``path`` is imported by: its stem, prefixed by the enclosing packages (the
    directories above it that hold an ``__init__.py``). Also whether it is a package itself."""
    directory, filename = os.path.split(os.path.abspath(path))
    stem = filename[:-3] if filename.endswith(".py") else filename
    is_package = stem == "__init__"
    parts = [] if is_package else [stem]
    if is_package:
        directory, stem = os.path.split(directory)
        parts = [stem]
    while os.path.isfile(os.path.join(directory, "__init__.py")):
        directory, package = os.path.split(directory)
        if not package:
            break
        parts.insert(0, package)
    return ".".join(parts), is_package


def parse(path: str, source: str, *, top_level_await: bool = False) -> SourceModule:
    """Parse ``source`` (raises SyntaxError). ``top_level_await`` is for documentation snippets."""
    flags = ast.PyCF_ONLY_AST | (ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if top_level_await else 0)
    tree = compile(source, path, "exec", flags=flags, dont_inherit=True)
    assert isinstance(tree, ast.Module)
    name, is_package = module_name(path)
    return SourceModule(path=path, name=name, is_package=is_package, tree=tree)
