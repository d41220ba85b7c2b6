"""What sessionscope's ``scoped_session`` and ``async_scoped_session`` add to SQLAlchemy's.

Mixed in front of SQLAlchemy's own classes, so all their generated proxies, ``configure``, errors
and warnings stay SQLAlchemy's. This mixin swaps the registry for a :class:`UnitRegistry`, and
makes ``_proxied`` (what every proxy calls) the registry's own lookup, :func:`unit_session`,
reading the registry's storage through aliases: one Python frame per proxied call, as in
SQLAlchemy.

With an explicit ``scopefunc`` the registry is SQLAlchemy's ``ScopedRegistry`` and the classes
switch (in ``__new__``) to a variant whose ``_proxied`` and ``__call__`` are SQLAlchemy's own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Generic, TypeVar, overload

from . import _fork_pools
from ._arguments import expect_flags, refuse
from ._guard import Mode, born_guarded, check_mode, install
from ._guard._install import guard_new_session
from ._registry import ScopefuncRegistry, UnitRegistry, unit_session
from ._scope import ScopeState, SessionScope, scoped_decorator
from ._work import WorkUnit

S = TypeVar("S")
SC = TypeVar("SC", bound=SessionScope[Any])
F = TypeVar("F", bound=Callable[..., Any])


class UnitScoping(Generic[S]):
    """The registry set-up and the fast ``_proxied`` shared by the sync and async classes."""

    registry: UnitRegistry[S] | ScopefuncRegistry[S]
    session_factory: Callable[..., S]
    _scope_var: ContextVar[ScopeState[S] | None]
    _key: str
    _make_session: Callable[..., S]
    _made_by: Callable[..., S]
    guard_mode: Mode
    """How this registry's sessions (implicit and scopes') are guarded: raise, warn or off."""

    def _set_up_registry(
        self,
        session_factory: Callable[..., S],
        scopefunc: Callable[[], Any] | None,
        *,
        guard: Mode,
        on_unit_end: Callable[[S], None],
    ) -> None:
        self.session_factory = session_factory
        self.guard_mode = check_mode(guard, f"{type(self).__name__}()", "guard")
        _fork_pools.remember_factory(session_factory)  # even for guard="off"
        make = self._make_session = born_guarded(session_factory, self.guard_mode)
        self._made_by = session_factory
        self._scope_var = ContextVar("sessionscope.scope", default=None)

        mode = self.guard_mode

        def adopt_set(session: S, work: WorkUnit | None = None, depth: int = 2) -> None:
            # (called by the registry's set or _miss: at least two frames of sessionscope's own)
            if (  # install()'s usual case, without its frame (the walk starts one frame nearer)
                guard_new_session is not None
                and work is not None
                and guard_new_session(session, mode, None, forget, work, depth - 1) is not None
            ):
                return
            install(session, mode, on_hand_off=forget, work=work, depth=depth)

        if scopefunc:
            self.registry = ScopefuncRegistry(
                self._created_by(make, adopt_set), scopefunc, self._scope_var, adopt_set
            )
            # Keys that never match: a subclass that kept the fast _proxied still answers right.
            self._key = ""
        else:
            registry = self.registry = UnitRegistry(
                make, self._scope_var, on_unit_end, adopt_set, adopt_set
            )
            self._key = registry._key
            # What the lookup calls on a miss (``_miss`` below, without its frame): the walk for
            # the "created at" site starts three frames above the guard's install (adopt_set,
            # the registry's _miss, then the lookup's caller: the application when ``__call__``
            # and the lookup are C's; their frames, or SQLAlchemy's proxy, are stepped over)
            self._miss = functools.partial(registry._miss, 3)  # type: ignore[method-assign]
        forget = self.registry.forget  # one bound method for all the registry's sessions

    def session_maker(self) -> Callable[..., S]:
        """What the registry's scopes make their sessions with: ``session_factory``'s sessions,
        born guarded (:func:`~sessionscope._guard.born_guarded`), also after it is replaced."""
        if self.session_factory is not self._made_by:
            self._made_by = self.session_factory
            self._make_session = born_guarded(self.session_factory, self.guard_mode)
        return self._make_session

    @staticmethod
    def _created_by(factory: Callable[[], S], on_create: Callable[[S], None]) -> Callable[[], S]:
        def create() -> S:
            session = factory()
            on_create(session)
            return session

        return create

    _proxied = property(unit_session)

    def _miss(self) -> S:
        """What the lookup calls when it finds nothing (its key never matches with an explicit
        ``scopefunc``): SQLAlchemy's registry. A ``UnitRegistry``'s own ``_miss`` replaces this
        per instance (see :meth:`_set_up_registry`)."""
        return self.registry()

    _scopes_coroutines = False
    """True for the async registry: its ``scoped`` decorates coroutine functions."""

    def scope(self, *, new: bool = False, commit: bool = True, **kw: Any) -> SessionScope[S]:
        raise NotImplementedError  # each registry opens its own kind of scope

    def _open_scope(
        self, kind: type[SC], *, new: bool, commit: bool, session_kw: dict[str, Any]
    ) -> SC:
        """A scope of ``kind`` over this registry's scope variable, factory and guard mode.

        The registry's lookup goes with it: after the misuse of exiting a scope from another unit,
        the unit that opened it looks its session up again without the scope.
        """
        return kind(
            self._scope_var,
            self.session_maker(),
            new=new,
            commit=commit,
            session_kw=session_kw,
            guard=self.guard_mode,
            lookup=self.registry,
        )

    @overload
    def scoped(self, fn: F, /) -> F: ...

    @overload
    def scoped(
        self, fn: None = None, /, *, new: bool = False, commit: bool = True, **kw: Any
    ) -> Callable[[F], F]: ...

    def scoped(
        self, fn: F | None = None, /, *, new: bool = False, commit: bool = True, **kw: Any
    ) -> Any:
        """Decorator form of ``scope()``: ``@Session.scoped`` or ``@Session.scoped(new=True)``.

        Each call of the decorated function runs in a scope of its own; for the async registry
        the function must be a coroutine function.
        """
        if fn is not None and not callable(fn):
            refuse(
                TypeError, f"{type(self).__name__}.scoped", "fn", fn, "a function to run in a scope"
            )
        expect_flags(f"{type(self).__name__}.scoped", new=new, commit=commit)
        return scoped_decorator(
            self.scope,
            fn,
            new=new,
            commit=commit,
            session_kw=kw,
            for_coroutines=self._scopes_coroutines,
        )

    def __call__(self, **kw: Any) -> S:
        """Return the current unit's session, creating it if needed (as SQLAlchemy's).

        With keyword arguments and no session yet, a session is made with them; if one exists,
        SQLAlchemy's "Scoped session is already present" error is raised.
        """
        if kw:
            return super().__call__(**kw)  # type: ignore[misc,no-any-return]
        return unit_session(self)
