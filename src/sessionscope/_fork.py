"""Forget the parent's units in a forked child.

A child process starts as a copy of the parent: the same greenlet objects, the same thread token,
the same registry entries, and sessions whose connections share sockets with the parent. If the
child used (or even closed) one of those sessions it would speak on the parent's socket. So in the
child, everything sessionscope knew about the parent's units is dropped *without touching it*: the
objects are parked in :data:`_orphans` for the life of the process, so that no garbage-collection
path returns their connections to a pool and talks to the server. The pools of the engines
sessionscope has seen are replaced in the child too (``_fork_pools``:
``engine.dispose(close=False)``, as SQLAlchemy documents).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_after_fork_callbacks: list[Callable[[], list[Any]]] = []
_orphans: list[Any] = []
generation = 0
"""How many forks led to this process: a session made in an earlier generation is foreign here."""


def on_fork_in_child(callback: Callable[[], list[Any]]) -> None:
    """Run ``callback`` in every forked child; it returns the objects it abandoned."""
    _after_fork_callbacks.append(callback)


def _after_fork_in_child() -> None:
    global generation
    generation += 1
    for callback in _after_fork_callbacks:
        _orphans.extend(callback())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
