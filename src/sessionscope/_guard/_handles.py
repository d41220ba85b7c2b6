"""What a guarded session hands out is guarded with it: connections, transactions, results, state.

A session gives out handles that reach its connection without going through the session again:
``session.connection()`` (and the connection of every transaction), ``session.begin()`` and every
other ``SessionTransaction``, and the results of ``execute()`` / ``scalars()`` (iterating them
fetches from the cursor and, for the ORM, fills the session's identity map). Each handle is
switched, like the session itself, to a checked subclass of its own class (made once per class),
carrying the session's :class:`SessionGuard`; its calls ask the same ``admit()`` first, so another
unit using it is refused before anything reaches the driver, and a call made inside a session call
(the session's own use of its connection and transaction) costs one comparison.

- Connections and transactions are switched as the session hands them out (``connection()``,
  ``begin()``, ``get_transaction()``, ...; a guarded transaction's ``connection()``, ``parent``,
  ``connections``), not as SQLAlchemy creates them: the session's own statements on a connection
  nobody took cost nothing, and unguarded sessions pay nothing at all.
- Results are switched as the session or its connection returns them. A result whose rows were
  all fetched (soft-closed: ``.all()`` was called) reaches nothing any more and is plain data, as
  is a ``FrozenResult``.
- The session's in-flight collections (``new``, ``dirty``, ``deleted``, iterating the session)
  are checked on read: they change under the owner's flush, and another unit iterating them can
  fail half-way. Introspection that answers one question (``in_transaction()``, ``is_active``,
  ``is_modified(obj)``, ``obj in session``, ``get_transaction()``, whose transaction is itself
  guarded), configuration and the application's own dict (``info``, ``identity_map``, ``bind``,
  ``autoflush``) are not checked on read: no connection is reached, and monitoring and test
  harnesses read them from outside. *Assigning* ``info``, ``autoflush`` and
  ``expire_on_commit`` is checked (:class:`_CheckedAttributeInPython`, in C
  ``CheckedAttribute``), and every new identity map (``expunge_all()``, which ``close()``
  calls) has its flagging checked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from greenlet import getcurrent
from sqlalchemy.engine import Connection, Result, Transaction
from sqlalchemy.engine.result import FilterResult
from sqlalchemy.event.base import dispatcher as event_dispatcher
from sqlalchemy.orm import SessionTransaction

from ._checks import checked_assignment, checked_returning, checked_then_watching
from ._guarded_class import (
    GUARD_ATTRIBUTE,
    GUARDED_METHODS,
    checked_methods,
    checked_subclass,
    is_guarded_class,
)
from ._results import guard_filter, result_namespace
from ._state import speedups

F = TypeVar("F", bound=Callable[..., Any])

RETURNING_HANDLES = (
    "execute",
    "scalars",
    "connection",
    "begin",
    "begin_nested",
)
"""Session methods whose results (a result, a connection, a transaction) are guarded as returned."""

HANDING_OUT = ("get_transaction", "get_nested_transaction")
"""Session introspection that is not checked but hands out a transaction, guarded as returned."""

CONNECTION_METHODS = (  # (``in_transaction()``: introspection, as on the session; SQLAlchemy 2.0
    # asks it while a result is read, also after the session closed)
    "begin",
    "begin_nested",
    "begin_twophase",
    "close",
    "commit",
    "detach",
    "exec_driver_sql",
    "execute",
    "execution_options",
    "get_isolation_level",
    "get_nested_transaction",
    "get_transaction",
    "invalidate",
    "rollback",
    "scalar",
    "scalars",
)
CONNECTION_RETURNING_HANDLES = (
    "execute",
    "exec_driver_sql",
    "scalars",
    "begin",
    "begin_nested",
    "begin_twophase",
    "get_transaction",
    "get_nested_transaction",
)
"""Connection methods returning a result or an engine-level transaction, guarded as returned."""

ENGINE_TRANSACTION_METHODS = ("commit", "rollback", "close", "prepare", "__exit__")

TRANSACTION_METHODS = ("commit", "rollback", "close", "prepare", "__exit__")
TRANSACTION_RETURNING_HANDLES = ("connection",)
TRANSACTION_HANDING_OUT = ("bound_connection",)  # (SQLAlchemy 2.1.7) acquires nothing
TRANSACTION_HANDING_OUT_PROPERTIES = ("parent", "connections")  # (``connections``: 2.1.7)

STATE_PROPERTIES = ("new", "dirty", "deleted", "no_autoflush")
"""The session's in-flight collections (they change under the owner's flush, and iterating them
from another unit can fail half-way), and ``no_autoflush``, which switches autoflush off."""

WRITE_CHECKED_ATTRIBUTES = ("info", "autoflush", "expire_on_commit")
"""Read freely (configuration and the application's own dict), checked when assigned."""
_ASSIGNMENT_CHECKED = frozenset((*WRITE_CHECKED_ATTRIBUTES, "identity_map"))
"""What a guarded session's ``__setattr__`` hands to :func:`_assign`, for a session class with a
``__setattr__`` of its own (see :func:`session_namespace`)."""
SHADOWED = "_sessionscope_shadowed"
"""A guarded class's names kept by checked attributes (``()``: checked by ``__setattr__``)."""


# -- the session -------------------------------------------------------------------------------


def _handing_out(method: F) -> F:
    """An unchecked method (introspection) whose result, a handle, is guarded as returned."""

    @functools.wraps(method)
    def handing_out(self: Any, *args: Any, **kw: Any) -> Any:
        handle = method(self, *args, **kw)
        guard = self._sessionscope_guard
        if guard is not None:  # (None: a guarded class's session, guarded once made)
            hand_out(handle, guard)
        return handle

    return handing_out  # type: ignore[return-value]


def _handing_out_methods(base: type, names: tuple[str, ...]) -> dict[str, Any]:
    return {
        name: _handing_out(getattr(base, name))
        for name in names
        if callable(getattr(base, name, None))
    }


def _handing_out_property(descriptor: Any) -> property:
    def get(self: Any) -> Any:
        handle = descriptor.__get__(self, type(self))
        guard = self._sessionscope_guard
        if guard is not None:
            hand_out(handle, guard)
        return handle

    return property(get, doc=getattr(descriptor, "__doc__", None))


def _checked_property(name: str, descriptor: Any) -> property:
    """A read-checked property over any descriptor (SQLAlchemy uses its own for some)."""

    def get(self: Any) -> Any:
        guard = self._sessionscope_guard
        if guard is not None:
            guard.check_use(f".{name}")
        return descriptor.__get__(self, type(self))

    return property(get, doc=getattr(descriptor, "__doc__", None))


class _InlineDispatch:
    """``dispatch`` of a guarded session class: SQLAlchemy's, kept as a plain attribute.

    SQLAlchemy's ``dispatcher`` makes a session's own dispatch on first use and stores it with
    ``obj.__dict__["dispatch"] = ...``. On CPython 3.11, asking for an instance's ``__dict__``
    turns its inline attribute values into a dict that the attribute-read specializations of
    SQLAlchemy's own code cannot use: every read of the session (``self._transaction``,
    ``self.identity_map``, ...) then takes the generic path. The same dispatch, stored as an
    attribute, keeps them inline. The class attribute (listening on the class) is SQLAlchemy's.
    """

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        if obj is None:
            return self.dispatcher.__get__(None, cls)
        dispatch = self.dispatcher.dispatch._for_instance(obj)
        object.__setattr__(obj, "dispatch", dispatch)
        return dispatch


def _inline_dispatch(base: type) -> dict[str, Any]:
    for klass in base.__mro__:
        dispatcher = klass.__dict__.get("dispatch")
        if dispatcher is not None:
            if isinstance(dispatcher, event_dispatcher):
                return {"dispatch": _InlineDispatch(dispatcher)}
            return {}  # (a class of the application's own making: left as it is)
    return {}


def _assign(base_setattr: Callable[[Any, str, Any], None]) -> Callable[[Any, str, Any], None]:
    """What a guarded session does when one of its assignment-checked attributes is assigned.

    ``info``, ``autoflush`` and ``expire_on_commit`` are checked (reads stay free). A new
    ``identity_map`` (SQLAlchemy makes one on ``close()`` and ``expunge_all()``) gets its set of
    modified states checked: objects enter it the first time they change, which is also what
    ``flag_dirty()`` does (it fires no attribute event).
    """

    def assign(session: Any, name: str, value: Any) -> None:
        guard = session._sessionscope_guard
        if guard is None:  # (its __init__ is running: not guarded yet)
            base_setattr(session, name, value)
        elif name == "identity_map":
            base_setattr(session, name, value)
            watch_flagging(value, guard)
        else:
            guard.check_use(f"={name}")
            base_setattr(session, name, value)

    return assign


class _FlaggingCheckedInPython(set):  # type: ignore[type-arg]
    """An identity map's set of modified states, checking the unit that flags an object (the C
    module's ``FlaggingChecked`` is the same, in C)."""

    __slots__ = ("guard",)
    guard: Any

    def add(self, state: Any) -> None:
        guard = self.guard
        if guard.depth and getcurrent() is guard.entered:  # (inside a call: a flush's own)
            set.add(self, state)
            return
        try:
            guard.check_write("(flag_dirty)", state.class_)
        except BaseException:
            # SQLAlchemy set state.modified just before adding it here: a refused flag changes
            # nothing (a state not in the set was not modified)
            if state not in self:
                state.modified = False
            raise
        set.add(self, state)


_FlaggingChecked: Any = _FlaggingCheckedInPython if speedups is None else speedups.FlaggingChecked


def _watch_flagging_in_python(identity_map: Any, guard: Any) -> None:
    if type(identity_map._modified) is not _FlaggingChecked:
        modified = _FlaggingChecked(identity_map._modified)
        modified.guard = guard
        identity_map._modified = modified


watch_flagging: Callable[[Any, Any], None] = (
    _watch_flagging_in_python if speedups is None else speedups.watch_flagging
)
"""Check the flagging of objects in an identity map of a guarded session (every session made,
and every map its ``close()`` makes: in C when the module is built)."""


def session_namespace(base: type) -> dict[str, Any]:
    """The checked methods, state and write-checked attributes of a guarded Session class.

    The assignments are checked by a descriptor per name (:func:`_checked_attributes`) where the
    class lets them be, else by a ``__setattr__``, which costs every other assignment of the
    session too (see :class:`_CheckedAttributeInPython`).
    """
    namespace = checked_methods(base, GUARDED_METHODS)
    for name in RETURNING_HANDLES:
        namespace[name] = checked_returning(name, getattr(base, name), hand_out)
    namespace.update(_handing_out_methods(base, HANDING_OUT))
    for name in STATE_PROPERTIES:
        for klass in base.__mro__:
            if name in klass.__dict__:
                namespace[name] = _checked_property(name, klass.__dict__[name])
                break
    attributes = _checked_attributes(base)
    if attributes is not None:
        namespace.update(attributes)
        namespace[SHADOWED] = tuple(attributes)
        if "expunge_all" in namespace:  # (a new identity map: see _watch_new_map)
            session_class: Any = base
            namespace["expunge_all"] = checked_then_watching(
                "expunge_all", session_class.expunge_all, _watch_new_map
            )
    else:
        base_setattr: Callable[[Any, str, Any], None] = base.__setattr__  # type: ignore[assignment]
        namespace["__setattr__"] = checked_assignment(
            _ASSIGNMENT_CHECKED, _assign(base_setattr), base_setattr
        )
        namespace[SHADOWED] = ()
    namespace[GUARD_ATTRIBUTE] = None  # (until install() sets the instance's own)
    namespace.update(_inline_dispatch(base))
    return namespace


def _check_assignment(guard: Any, name: str) -> None:
    """What a checked attribute asks before a guarded session's ``info``, ``autoflush`` or
    ``expire_on_commit`` is assigned."""
    guard.check_use(f"={name}")


def shadow_of(name: str) -> str:
    """The instance attribute holding the value of checked attribute ``name``."""
    return f"_sessionscope_{name}"


class _CheckedAttributeInPython:
    """An assignment-checked attribute of a guarded session class (the C module's
    ``CheckedAttribute`` is the same, in C).

    A data descriptor, keeping the value in another instance attribute (:func:`shadow_of`), never
    through the instance's ``__dict__``: on CPython 3.11 asking for it ends the inline values that
    SQLAlchemy's specialized reads of the session use (see :class:`_InlineDispatch`). A
    descriptor per checked name rather than a class ``__setattr__``: CPython specializes an
    attribute store only on a class whose ``__setattr__`` is ``object``'s, and SQLAlchemy's own
    code assigns some twenty attributes in a session's life (``__init__``, ``close()``,
    transactions), each taking the generic path through a ``__setattr__`` (about 10,000
    instructions of a ``Session()`` then ``remove()`` of 124,000). Reading ``autoflush`` (each
    query's autoflush) now costs a descriptor call instead of an inline read.
    """

    __slots__ = ("__name__", "shadow", "check", "memoized")

    def __init__(
        self, name: str, shadow: str, check: Callable[[Any, str], None], memoized: bool = False
    ) -> None:
        self.__name__ = name
        self.shadow = shadow
        self.check = check
        self.memoized = memoized
        """``info``: with no value yet, a new dict, kept (SQLAlchemy's ``memoized_property``)."""

    def __get__(self, obj: Any, cls: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return object.__getattribute__(obj, self.shadow)
        except AttributeError:
            if not self.memoized:
                raise self._missing(obj) from None
        value: dict[Any, Any] = {}
        object.__setattr__(obj, self.shadow, value)
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        guard = obj._sessionscope_guard
        if guard is not None:  # (None: its __init__ is running, not guarded yet)
            self.check(guard, self.__name__)
        object.__setattr__(obj, self.shadow, value)

    def __delete__(self, obj: Any) -> None:
        try:
            object.__delattr__(obj, self.shadow)
        except AttributeError:
            raise self._missing(obj) from None

    def _missing(self, obj: Any) -> AttributeError:
        return AttributeError(f"{type(obj).__name__!r} object has no attribute {self.__name__!r}")

    def __repr__(self) -> str:
        return f"<checked attribute {self.__name__!r}>"


_CheckedAttribute: Any = (
    _CheckedAttributeInPython if speedups is None else speedups.CheckedAttribute
)


def _checked_attributes(base: type) -> dict[str, Any] | None:
    """Descriptors for the assignment-checked attributes of a guarded subclass of ``base``; None
    when ``base`` has a ``__setattr__`` of its own, or a descriptor that sets one of them (they
    must run as they are)."""
    if base.__setattr__ is not object.__setattr__:  # type: ignore[comparison-overlap]
        return None
    for name in WRITE_CHECKED_ATTRIBUTES:
        for klass in base.__mro__:
            if name in klass.__dict__:
                if hasattr(type(klass.__dict__[name]), "__set__"):
                    return None
                break
    memoized = {"info"}  # (SQLAlchemy's memoized_property: made on first read)
    return {
        name: _CheckedAttribute(name, shadow_of(name), _check_assignment, name in memoized)
        for name in WRITE_CHECKED_ATTRIBUTES
    }


def _watch_new_map(session: Any) -> None:
    """After a guarded session's ``expunge_all()``: its new identity map's flagging checked.

    SQLAlchemy makes a new identity map in ``__init__`` (watched as the guard is installed) and
    in ``expunge_all()``, which ``close()`` and ``reset()`` call; a map the application assigns
    by hand is not watched (with checked attributes; a class with its own ``__setattr__`` is
    checked by :func:`_assign`, which watches every map assigned).
    """
    guard = session._sessionscope_guard
    if guard is not None:
        watch_flagging(session.identity_map, guard)


def move_shadowed(session: Any, to: type) -> None:
    """Switch ``session`` to class ``to``, its checked attributes' values kept: between a class
    that keeps them as plain attributes and one that keeps them shadowed (:data:`SHADOWED`).

    Only for a class switch, which ends the instance's inline values anyway (reading its
    ``__dict__`` here costs nothing more).
    """
    before: tuple[str, ...] = getattr(type(session), SHADOWED, ())
    after: tuple[str, ...] = getattr(to, SHADOWED, ())
    values = {}
    state = session.__dict__
    for name in WRITE_CHECKED_ATTRIBUTES:
        key = shadow_of(name) if name in before else name
        if key in state:
            values[name] = state.pop(key)
    session.__class__ = to
    for name, value in values.items():
        state[shadow_of(name) if name in after else name] = value


def guard_session_state(session: Any, guard: Any) -> None:
    """Finish guarding a session that was created (and began a transaction) before its class
    switch."""
    watch_flagging(session.identity_map, guard)
    # a session guarded while in a transaction: what it may have handed out already
    transaction = session._transaction
    while transaction is not None:
        _switch(transaction, guard, _transaction_namespace, _TRANSACTION_CLASSES)
        for connection, *_ in transaction._connections.values():
            _switch(connection, guard, _connection_namespace, _CONNECTION_CLASSES)
        transaction = transaction._parent


# -- handles -------------------------------------------------------------------------------------

_CONNECTION_CLASSES = "_sessionscope_guarded_connection_class"
_TRANSACTION_CLASSES = "_sessionscope_guarded_transaction_class"
_RESULT_CLASSES = "_sessionscope_guarded_result_class"
_ENGINE_TRANSACTION_CLASSES = "_sessionscope_guarded_engine_transaction_class"


def _connection_namespace(base: type) -> dict[str, Any]:
    namespace = checked_methods(base, CONNECTION_METHODS, prefix="connection().")
    for name in CONNECTION_RETURNING_HANDLES:
        if callable(getattr(base, name, None)):
            namespace[name] = checked_returning(
                f"connection().{name}", getattr(base, name), hand_out
            )
    return namespace


def _engine_transaction_namespace(base: type) -> dict[str, Any]:
    """An engine-level transaction (``connection.begin()``, ``get_transaction()``) takes no
    attributes (``__slots__``): it finds the guard through its connection."""
    namespace = checked_methods(base, ENGINE_TRANSACTION_METHODS, prefix="connection().begin().")
    namespace[GUARD_ATTRIBUTE] = property(lambda self: self.connection.__dict__[GUARD_ATTRIBUTE])
    return namespace


def _transaction_namespace(base: type) -> dict[str, Any]:
    namespace = checked_methods(base, TRANSACTION_METHODS, prefix="begin().")
    for name in TRANSACTION_RETURNING_HANDLES:
        namespace[name] = checked_returning(f"begin().{name}", getattr(base, name), hand_out)
    namespace.update(_handing_out_methods(base, TRANSACTION_HANDING_OUT))
    for name in TRANSACTION_HANDING_OUT_PROPERTIES:
        descriptor = base.__dict__.get(name)
        if descriptor is not None:
            namespace[name] = _handing_out_property(descriptor)
    return namespace


def _switch(handle: Any, guard: Any, namespace_for: Any, cache: str) -> None:
    cls = type(handle)
    guarded = cls.__dict__.get(cache)  # (every handle but the first of its class)
    if guarded is not None:
        handle.__class__ = guarded
    elif not is_guarded_class(cls):
        handle.__class__ = checked_subclass(cls, namespace_for, cache)
    handle.__dict__[GUARD_ATTRIBUTE] = guard


def guard_handle(handle: Any, guard: Any) -> None:
    """Guard a handle as the session, or one of its guarded handles, hands it out.

    A result (for ``scalars()``/``mappings()`` filters, the result under them); a connection; a
    session transaction (and its parents, which it hands out as ``parent``); an engine-level
    transaction of a guarded connection (it finds the guard through its connection); a set of
    connections. Anything else (None, a value) is left alone.
    """
    if isinstance(handle, FilterResult):
        real = handle._real_result
        if isinstance(real, Result) and GUARD_ATTRIBUTE not in real.__dict__:
            _switch(real, guard, result_namespace, _RESULT_CLASSES)
        guard_filter(handle)
    elif isinstance(handle, Result):
        if GUARD_ATTRIBUTE not in handle.__dict__:
            _switch(handle, guard, result_namespace, _RESULT_CLASSES)
    elif isinstance(handle, Connection):
        _switch(handle, guard, _connection_namespace, _CONNECTION_CLASSES)
    elif isinstance(handle, SessionTransaction):
        _switch(handle, guard, _transaction_namespace, _TRANSACTION_CLASSES)
    elif isinstance(handle, Transaction):
        if not is_guarded_class(type(handle)):
            handle.__class__ = checked_subclass(
                type(handle), _engine_transaction_namespace, _ENGINE_TRANSACTION_CLASSES
            )
    elif isinstance(handle, (frozenset, set, tuple, list)):
        for each in handle:
            if isinstance(each, Connection):
                _switch(each, guard, _connection_namespace, _CONNECTION_CLASSES)


def _guard_handle_in_c_where_it_can() -> Callable[[Any, Any], None]:
    """What guarded handles give what they hand out to: ``speedups.guard_handle``, which does a
    result's usual case (its class's checked subclass made already) in C and hands the rest back
    to :func:`guard_handle`, where the extension is built and SQLAlchemy's result classes are
    plain classes (a metaclass could answer ``isinstance()`` otherwise than C's type check); else
    :func:`guard_handle` itself. A request that reads rows ran about 80 bytecodes here."""
    if speedups is None or type(FilterResult) is not type or type(Result) is not type:
        return guard_handle
    speedups.configure_handles(FilterResult, Result, guard_handle)
    guard_in_c: Callable[[Any, Any], None] = speedups.guard_handle
    return guard_in_c


hand_out = _guard_handle_in_c_where_it_can()
