"""A lazy load of a relationship of an object attached to a guarded session: checked once, whole.

A lazy load (``book.author``, ``author.books``) reaches the session from an attribute read, so
without this it is checked piecemeal: its statement (``Session.execute``) or identity-map lookup,
each fetch of its result, the identity-map entries of what it loads. Checked once around the
loader instead, by the same rules as a session call, it is refused as a whole before anything
reaches the session ("lazy-loaded Book.author"), and every step inside is the session's own
(one comparison each), which is what keeps the guard cheap on ORM workloads.

SQLAlchemy has no event for a lazy load. Its loader strategy's entry point,
``LazyLoader._load_for_state`` (``_LazyLoader`` in 2.1; private, with the same signature in 2.0
and 2.1), is reached two ways: as the attribute's loader callable, a bound method taken when the
mapper was configured (wrapped per attribute, as each mapper is configured), and through
per-query loader options, which look it up on the class (wrapped once). An object of an
unguarded session costs one dict lookup.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent
from sqlalchemy.orm import strategies

from .._units._asyncio import _get_running_loop
from .._work import work_var
from ._state import INSIDE, speedups

LAZY_LOAD = "(lazy load)"
"""The operation's prefix in refusals: ``"(lazy load)author"`` reads "lazy-loaded Book.author"."""

GuardOfState = Callable[[Any], Any]

_names = vars(strategies)
_LAZY_LOADER: type = _names.get("_LazyLoader") or _names["LazyLoader"]  # (2.1, 2.0)
_WRAPPED = "_sessionscope_lazy_load_checked"

_installed = False
_install_lock = threading.Lock()
_modules = sys.modules


def _load_checked(
    guard_of_state: GuardOfState, key: str, load: Callable[..., Any], state: Any, args: Any, kw: Any
) -> Any:
    """``load(state, *args, **kw)`` checked as one call of the state's session."""
    guard = guard_of_state(state)
    if guard is None:
        return load(state, *args, **kw)  # unguarded
    current = getcurrent()
    if guard.depth and current is guard.entered:
        return load(state, *args, **kw)  # inside a call of the session
    work = work_var.get()
    if (
        work is not None
        and work is guard.fast_key()
        and _get_running_loop() is None
        and "trio" not in _modules
        and INSIDE.setdefault(guard, current) is current
    ):
        # SessionGuard.admit()'s fast path, inlined (as in _guarded_class._checked)
        if not guard.depth:
            guard.entered = current
        guard.depth += 1
    elif not guard.admit(LAZY_LOAD + key, state.class_):
        return load(state, *args, **kw)  # "warn" / "off", or sessionscope's own cleanup
    try:
        return load(state, *args, **kw)
    finally:
        guard.leave()


def _checked_load(load: Callable[..., Any], key: str, guard_of_state: GuardOfState) -> Any:
    """An attribute's loader callable (a bound ``_load_for_state``), checked.

    With the C module, the C wrapper finds the state's guard as ``_writes.guard_of_state`` does
    (the only ``guard_of_state`` there is), and runs ``_load_checked``'s steps.
    """
    if speedups is not None:
        checked_in_c = speedups.CheckedMethod(LAZY_LOAD + key, load, speedups.KIND_LAZY_LOAD)
        functools.update_wrapper(checked_in_c, load)
        setattr(checked_in_c, _WRAPPED, True)
        return checked_in_c

    @functools.wraps(load)
    def checked(state: Any, *args: Any, **kw: Any) -> Any:
        return _load_checked(guard_of_state, key, load, state, args, kw)

    setattr(checked, _WRAPPED, True)
    return checked


def wrap_attribute_loader(impl: Any, guard_of_state: GuardOfState) -> None:
    """Check the lazy loads of one mapped attribute (its ``AttributeImpl``), once."""
    load = getattr(impl, "callable_", None)
    if (
        load is not None
        and isinstance(getattr(load, "__self__", None), _LAZY_LOADER)
        and not getattr(load, _WRAPPED, False)
    ):
        impl.callable_ = _checked_load(load, impl.key, guard_of_state)


def install(guard_of_state: GuardOfState) -> None:
    """Check lazy loads made through loader options (idempotent; the first guarded session)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        original = _LAZY_LOADER.__dict__["_load_for_state"]

        def _load_for_state(self: Any, state: Any, *args: Any, **kw: Any) -> Any:
            load = functools.partial(original, self)  # (a per-query option's lazy load)
            return _load_checked(guard_of_state, self.key, load, state, args, kw)

        _LAZY_LOADER._load_for_state = functools.wraps(original)(_load_for_state)  # type: ignore[attr-defined]
        _installed = True
