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

forking_pid = 0
"""The id of this process while it forks (from ``os.fork()``'s start to its return), else 0.

In the child, CPython frees the other threads' states, and with them their contexts and the
units of work these hold, *before* any at-fork callback runs: :data:`generation` is still the
parent's then, and a unit of work freed there would close its sessions, rolling back on the
parent's sockets. A unit of work ending in a process that is not ``forking_pid`` sees it is in
a child already (see :func:`abandon_if_parents`).
"""


def on_fork_in_child(callback: Callable[[], list[Any]]) -> None:
    """Run ``callback`` in every forked child; it returns the objects it abandoned."""
    _after_fork_callbacks.append(callback)


def is_parents(of_generation: int) -> bool:
    """Whether what was made in ``of_generation`` belongs to a parent of this process."""
    return of_generation != generation or (forking_pid != 0 and forking_pid != os.getpid())


def abandon_if_parents(work: Any) -> bool:
    """If ``work`` (a unit of work, ending) is a parent process's, abandon what it holds and
    say so: its values are parked in :data:`_orphans`, its sessions are neither closed nor
    forgotten (what the child's callbacks do to the parent's units, for one that ends first).

    Called by a unit's end only when :data:`generation` differs from its own or a fork is under
    way, so the usual end pays two reads for it.
    """
    if not is_parents(work.generation):
        return False
    abandon(work)
    return True


def abandon(work: Any) -> None:
    """Park what a parent process's unit of work holds in :data:`_orphans`, untouched (never
    closed, so nothing is said on the parent's sockets), and forget whom it owns and serves."""
    _orphans.extend(value for _, value in work.take_values())
    work.owned = None
    work.task = None


def _before_fork() -> None:
    global forking_pid
    forking_pid = os.getpid()


def _after_fork_in_parent() -> None:
    global forking_pid
    forking_pid = 0


def _after_fork_in_child() -> None:
    global generation, forking_pid
    generation += 1
    forking_pid = 0
    for callback in _after_fork_callbacks:
        _orphans.extend(callback())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
