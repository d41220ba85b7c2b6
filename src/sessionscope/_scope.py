"""Explicit scopes: ``with Session.scope() as s:`` commits, rolls back, closes.

The active scope of a registry lives in a :class:`contextvars.ContextVar`, which is exactly what
makes it follow the block into work the block hands off and waits for: ``asyncio.to_thread``,
``contextvars.copy_context().run``, anyio/Starlette thread pools and asgiref all run that work in a
copy of the caller's context. (``loop.run_in_executor`` does not copy the context; work sent there
gets its own implicit session.) A unit that outlives the block and still asks for the scope's
session gets :class:`~sessionscope.exc.ScopeEndedError` instead of a closed session.

Nesting: a ``scope()`` inside an active one joins it (same session; the outer block alone commits
or rolls back); ``scope(new=True)`` always starts an independent session.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, Generic, TypeVar

from sqlalchemy import exc as sa_exc

from ._async_session_end import close_shielded
from ._guard import Mode, cleanup, install
from ._session_end import seal
from ._units import Unit, current_unit, describe_unit
from .exc import CrossUnitError, ScopeEndedError, background

S = TypeVar("S")
F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("sessionscope")


class ScopeState(Generic[S]):
    """The session of one active (or ended) scope and who opened it."""

    __slots__ = ("session", "owner", "ended")

    def __init__(self, session: S, owner: Unit) -> None:
        self.session = session
        self.owner = owner
        self.ended = False

    def session_for_use(self) -> S:
        if self.ended:
            raise ScopeEndedError(
                f"The session of a Session.scope() block opened in {describe_unit(self.owner)} "
                f"was requested by {describe_unit(current_unit())} after the block had ended; the "
                "session is closed. Wait for work you hand off before leaving the block (await "
                "it, join it), or give that work a scope of its own. " + background("scope-ended")
            )
        return self.session


class SessionScope(Generic[S]):
    """What ``Session.scope()`` returns: a context manager around one session.

    On a successful block the session commits (or rolls back with ``commit=False``); when the
    block raises it rolls back and the exception propagates unchanged; either way it is closed.
    """

    def __init__(
        self,
        scope_var: ContextVar[ScopeState[S] | None],
        factory: Callable[..., S],
        *,
        new: bool,
        commit: bool,
        session_kw: dict[str, Any],
        guard: Mode = "raise",
    ) -> None:
        self._var = scope_var
        self._factory = factory
        self._new = new
        self._commit = commit
        self._session_kw = session_kw
        self._guard = guard
        self._entered_by: Unit | None = None
        self._state: ScopeState[S] | None = None
        self._token: Token[ScopeState[S] | None] | None = None

    def enter(self) -> S:
        """Open (or join) the scope; shared by the sync and async context-manager protocols."""
        if self._entered_by is not None:
            raise sa_exc.InvalidRequestError(
                "This Session.scope() was already entered; call Session.scope() again for "
                "another block."
            )
        self._entered_by = current_unit()
        outer = self._var.get()
        if outer is not None and not outer.ended and not self._new:
            if self._session_kw:
                raise sa_exc.InvalidRequestError(
                    "A nested Session.scope() joins the enclosing scope's session and cannot take "
                    f"session arguments ({', '.join(sorted(self._session_kw))}); use "
                    "Session.scope(new=True, ...) for an independent session."
                )
            return outer.session
        session = install(
            self._factory(**self._session_kw), self._guard, on_hand_off=_stays_in_its_scope
        )
        self._state = ScopeState(session, self._entered_by)
        self._token = self._var.set(self._state)
        return self._state.session

    def __enter__(self) -> S:
        return self.enter()

    def how_to_end(
        self, exc_type: type[BaseException] | None
    ) -> tuple[bool, bool, CrossUnitError | None]:
        """(commit, failing, misuse) for an exit: a misuse is raised after the session is closed.

        Exiting from another unit than the one that entered is a misuse: the scope's work is then
        rolled back, never committed from a unit that does not own the session.
        """
        if self._entered_by is None:
            raise sa_exc.InvalidRequestError("Session.scope() exited without being entered.")
        exiting = current_unit()
        if exiting is self._entered_by:
            return self._commit and exc_type is None, exc_type is not None, None
        message = (
            f"Session.scope() was entered in {describe_unit(self._entered_by)} but exited in "
            f"{describe_unit(exiting)}. A scope must end in the unit that began it"
        )
        if self._state is not None:
            message += "; its work was rolled back (not committed) and its session closed"
        misuse = CrossUnitError(
            message + ". Use `with`/`async with` in one unit, and give other units copies of "
            "objects (Session.merge()) or a scope of their own. " + background("scope-cross-unit")
        )
        return False, True, misuse

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        commit, failing, misuse = self.how_to_end(exc_type)
        with _exempt_if(misuse):
            self.finish(commit=commit, failing=failing)
        if misuse is not None:
            raise misuse

    def finish(self, *, commit: bool, failing: bool) -> None:
        """Commit if asked, then always close; a joined scope leaves this to its outer block."""
        state = self._state
        if state is None:
            return
        try:
            if commit:
                state.session.commit()  # type: ignore[attr-defined]
        except BaseException:
            failing = True
            raise
        finally:
            state.ended = True
            try:
                state.session.close()  # type: ignore[attr-defined]
            except Exception:
                if not failing:
                    raise
                log.exception("sessionscope: closing a scope's session failed")
            finally:
                seal(state.session)
                self._reset_var()

    def _reset_var(self) -> None:
        if self._token is None:
            return
        # exited in another context: ValueError, and that context's copy keeps the ended state
        with contextlib.suppress(ValueError):
            self._var.reset(self._token)


class AsyncSessionScope(SessionScope[S]):
    """What ``AsyncScoped.scope()`` returns: ``async with`` around one AsyncSession.

    The same rules as :class:`SessionScope`; commit and close are awaited, and the close runs in
    a task that cancellation cannot stop (as SQLAlchemy's own ``AsyncSession.__aexit__`` does), so a
    block cancelled in the middle of a flush or commit still returns its connection.
    """

    def __enter__(self) -> S:
        raise TypeError("An AsyncSession scope is entered with `async with`, not `with`.")

    async def __aenter__(self) -> S:
        return self.enter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        commit, failing, misuse = self.how_to_end(exc_type)
        with _exempt_if(misuse):
            await self.finish_async(commit=commit, failing=failing)
        if misuse is not None:
            raise misuse

    async def finish_async(self, *, commit: bool, failing: bool) -> None:
        """As :meth:`SessionScope.finish`, awaited; the close survives a cancelled waiter."""
        state = self._state
        if state is None:
            return
        try:
            if commit:
                await state.session.commit()  # type: ignore[attr-defined]
        except BaseException:
            failing = True
            raise
        finally:
            state.ended = True
            try:
                await close_shielded(state.session, then_seal=True)
            except Exception:
                if not failing:
                    raise
                log.exception("sessionscope: closing a scope's AsyncSession failed")
            finally:
                self._reset_var()


def _exempt_if(misuse: CrossUnitError | None) -> contextlib.AbstractContextManager[None]:
    """Exited from the wrong unit: the scope's own rollback and close pass the guard."""
    return cleanup() if misuse is not None else contextlib.nullcontext()


def _stays_in_its_scope(session: Any) -> None:
    raise sa_exc.InvalidRequestError(
        "A Session.scope() session is closed by its block, so it cannot be handed off or "
        "shared; make the session to hand off with the sessionmaker itself, or finish the work "
        "inside the block (work it awaits in to_thread or a framework's thread pool may use it)."
    )


def scoped_decorator(
    open_scope: Callable[..., SessionScope[Any]],
    fn: F | None,
    *,
    new: bool,
    commit: bool,
    session_kw: dict[str, Any],
    for_coroutines: bool = False,
) -> Any:
    """``@Session.scoped`` / ``@Session.scoped(new=True)``: run each call in its own scope."""
    if fn is None:
        return lambda f: scoped_decorator(
            open_scope,
            f,
            new=new,
            commit=commit,
            session_kw=session_kw,
            for_coroutines=for_coroutines,
        )
    if for_coroutines:
        return _scoped_coroutine(
            open_scope,  # type: ignore[arg-type]  # the async registry opens AsyncSessionScopes
            fn,
            new=new,
            commit=commit,
            session_kw=session_kw,
        )
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"@scoped on {fn.__qualname__}: a coroutine needs an AsyncSession scope; use "
            "sessionscope.async_scoped_session(...).scoped."
        )
    if inspect.isgeneratorfunction(fn):
        raise TypeError(
            f"@scoped on generator {fn.__qualname__}: the scope would end at the first yield; "
            "open `with Session.scope():` inside the generator instead."
        )

    @functools.wraps(fn)
    def run_in_scope(*args: Any, **kwargs: Any) -> Any:
        with open_scope(new=new, commit=commit, **session_kw):
            return fn(*args, **kwargs)

    return run_in_scope


def _scoped_coroutine(
    open_scope: Callable[..., AsyncSessionScope[Any]],
    fn: F,
    *,
    new: bool,
    commit: bool,
    session_kw: dict[str, Any],
) -> Any:
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"@scoped of an async_scoped_session on {fn.__qualname__}: only coroutine functions "
            "(async def) can run in an AsyncSession scope; use sessionscope.scoped_session for "
            "synchronous code."
        )

    @functools.wraps(fn)
    async def run_in_scope(*args: Any, **kwargs: Any) -> Any:
        async with open_scope(new=new, commit=commit, **session_kw):
            return await fn(*args, **kwargs)

    return run_in_scope
