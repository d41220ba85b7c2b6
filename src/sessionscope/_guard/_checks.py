"""The entry check around every call of a guarded session and its handles: in C, or in Python.

Each checked method of a guarded session (its connection, transactions and results) is a
wrapper that asks the session's :class:`~sessionscope._guard._ownership.SessionGuard` before
calling the method. The wrapper runs on every call, so its fast paths are inlined here (a call
SQLAlchemy makes inside a call of the session passes on one comparison; the owner in a thread or
greenlet takes the slot without a call of ``admit()``), and everything else goes through
``SessionGuard.admit()``.

The same wrapper exists twice:

- ``sessionscope._speedups.CheckedMethod``, a method descriptor written in C, built when the
  package is installed (``setup.py``; a compiler is optional, the build goes on without it). In
  Python the wrapper's frame and its dozen attribute reads were most of what the guard cost a
  light request (``docs/design.md``, "What a request costs, and where").
- the Python closures below, used when the C module is not built, or when the environment sets
  ``SESSIONSCOPE_NO_EXTENSIONS`` (``_state``). The test suite runs both; their slow paths are
  one and the same Python code, so messages and behaviour are the same.

Three kinds: a plain checked method; a *returning* one, whose result (a handle: a result, a
connection, a transaction) is guarded with the session by ``hook(result, guard)``; a result's
*fetch*, which lets plain data through (a soft-closed result, a session whose unit of work
ended).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from greenlet import getcurrent

from .._units._asyncio import _get_running_loop
from .._work import work_var
from ._state import ENDED, INSIDE, speedups

F = TypeVar("F", bound=Callable[..., Any])
Hook = Callable[[Any, Any], None]

_modules = sys.modules


_speedups = speedups
IN_C = _speedups is not None
"""Whether guarded calls are checked by the C module (for tests and the benchmarks' headers)."""


CHECKED_CODES: set[Any] = set()
"""Code objects of the checked methods: a refusal finds the thread inside a session by them."""


def _remember(method: Any) -> None:
    code = getattr(method, "__code__", None)
    if code is not None:
        CHECKED_CODES.add(code)


def checked(name: str, method: F) -> F:
    """``method``, checked by the guard first (``name``: the operation, for messages)."""
    _remember(method)
    if _speedups is not None:
        return _wrapped(_speedups.CheckedMethod(name, method), method)
    return _checked_in_python(name, method)


def checked_returning(name: str, method: F, hook: Hook) -> F:
    """``method``, checked; what it returns is passed to ``hook`` with the guard (guarded)."""
    _remember(method)
    if _speedups is not None:
        return _wrapped(
            _speedups.CheckedMethod(name, method, _speedups.KIND_RETURNING, hook), method
        )
    return _checked_in_python(name, method, hook=hook)


def checked_then_watching(name: str, method: F, watch_new_map: Callable[[Any], None]) -> F:
    """``method``, checked; then ``watch_new_map(session)``: for ``expunge_all()``, which gives
    the session a new identity map whose flagging the guard checks (in C: what the C module's
    own ``watch_flagging`` does, with no Python frame)."""
    _remember(method)
    if _speedups is not None:
        return _wrapped(_speedups.CheckedMethod(name, method, _speedups.KIND_REWATCH), method)
    check = _checked_in_python(name, method)

    @functools.wraps(method)
    def then_watching(self: Any, *args: Any, **kw: Any) -> Any:
        result = check(self, *args, **kw)
        watch_new_map(self)
        return result

    return then_watching  # type: ignore[return-value]


def checked_fetch(name: str, method: F) -> F:
    """A result's fetch ``method``, checked unless the result is plain data by now."""
    _remember(method)
    if _speedups is not None:
        return _wrapped(_speedups.CheckedMethod(name, method, _speedups.KIND_FETCH), method)
    return _checked_in_python(name, method, fetch=True)


def checked_assignment(
    names: frozenset[str],
    assign: Callable[[Any, str, Any], None],
    base_setattr: Callable[[Any, str, Any], None],
) -> Callable[[Any, str, Any], None]:
    """A guarded session class's ``__setattr__``: assigning one of ``names`` is
    ``assign(session, name, value)`` (which checks, then assigns); any other assignment is
    ``base_setattr``'s, the session class's own.

    Why not a descriptor per checked name: a data descriptor's ``__set__`` writes through the
    instance's ``__dict__``, and CPython keeps a managed dict's values inline only until its
    ``__dict__`` is asked for; after that, and on an instance whose class was switched, every
    attribute read of the session in SQLAlchemy's own code runs unspecialized (about four times
    as slow). The C version assigns other names as ``object.__setattr__`` does, so it is only
    used when that is the class's own ``__setattr__``.
    """
    if _speedups is not None and base_setattr is object.__setattr__:
        return _speedups.CheckedMethod(  # type: ignore[no-any-return]
            "__setattr__", assign, _speedups.KIND_ASSIGNMENT, names
        )

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if name in names:
            assign(self, name, value)
        else:
            base_setattr(self, name, value)

    return __setattr__


def _wrapped(checked_method: Any, method: F) -> F:
    """The C wrapper with the method's name, docstring and ``__wrapped__`` (introspection,
    ``inspect.signature``), as ``functools.wraps`` gives the Python one."""
    functools.update_wrapper(checked_method, method)
    return checked_method  # type: ignore[no-any-return]


# -- the same, in Python ---------------------------------------------------------------------


def _checked_in_python(name: str, method: F, *, hook: Hook | None = None, fetch: bool = False) -> F:
    """The three kinds in one closure: the C wrapper's code, line for line."""

    @functools.wraps(method)
    def checked(self: Any, *args: Any, **kw: Any) -> Any:
        guard = self._sessionscope_guard
        if guard is None:  # a guarded class's session whose guard is not set yet (its __init__)
            return method(self, *args, **kw)
        current = getcurrent()
        if guard.depth and current is guard.entered:
            # a call SQLAlchemy makes inside a call of the unit inside (autoflush, close ->
            # expunge_all, a flush's statements): that unit, since nothing else runs in its
            # greenlet meanwhile; the outer call holds the slot until after this one returns,
            # and what this one hands out reaches nobody else
            return method(self, *args, **kw)
        if fetch and (self._soft_closed or guard.state == ENDED):  # a result: plain data now
            return method(self, *args, **kw)
        work = work_var.get()
        if (
            work is not None
            and work is guard.fast_key()
            and _get_running_loop() is None
            and "trio" not in _modules
            and INSIDE.setdefault(guard, current) is current
        ):
            # SessionGuard.admit()'s fast path, inlined: the owner, in a thread or greenlet
            if not guard.depth:
                guard.entered = current  # before depth: who sees depth > 0 sees who entered
            guard.depth += 1
        elif not guard.admit(name):  # tasks, borrowers, overlaps, refusals; "warn", "off"
            handle = method(self, *args, **kw)
            if hook is not None:
                hook(handle, guard)
            return handle
        try:
            handle = method(self, *args, **kw)
        finally:  # SessionGuard.leave(), inlined: this runs on every call of the session
            guard.depth -= 1
            if not guard.depth:
                guard.entered = None  # first: a greenlet keeping its session keeps no cycle
                INSIDE.pop(guard, None)
                if guard.after_leave:
                    guard.run_after_leave()
        if hook is not None:
            hook(handle, guard)
        return handle

    return checked  # type: ignore[return-value]
