"""Explicit scopes: ``with Session.scope() as s:`` commits, rolls back, closes.

The active scope of a registry lives in a :class:`contextvars.ContextVar`, which is exactly what
makes it follow the block into work the block hands off and waits for: ``asyncio.to_thread``,
``contextvars.copy_context().run``, anyio/Starlette thread pools and asgiref all run that work in a
copy of the caller's context. (``loop.run_in_executor`` does not copy the context; work sent there
gets its own implicit session.) A unit that outlives the block and still asks for the scope's
session gets :class:`~sessionscope.exc.ScopeEndedError` instead of a closed session.

Nesting: a ``scope()`` inside an active one joins its session inside a SAVEPOINT
(``begin_nested()``), as Django's ``atomic()`` does: a nested block that raises takes back only its
own work, one that succeeds leaves its work to the outer block's commit or rollback.
``scope(new=True)`` always starts an independent session. Scopes end in the reverse order they
began; a scope that ends while scopes nested in it are still open rolls their work back with its
own and raises.

How a scope ends (commit or release, roll back, close) is written once, as a generator of steps
that :func:`_run` calls and :func:`_run_async` awaits, so the sync and async scopes cannot drift
apart.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import sys
from collections.abc import Callable, Generator, Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType, TracebackType
from typing import Any, Generic, TypeVar

from sqlalchemy import exc as sa_exc

from . import _fork
from ._async_session_end import close_shielded
from ._guard import Mode, cleanup, install
from ._guard._site import Site
from ._session_end import seal
from ._units import Unit, current_unit, describe_unit
from ._units._asyncio import _get_running_loop
from ._work import WorkUnit, current_work, unit_and_work, work_var
from .exc import CrossUnitError, ScopeEndedError, background

S = TypeVar("S")
F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("sessionscope")

Step = Callable[[], Any]
"""One database operation of a scope's end: called by :func:`_run`, called and awaited by
:func:`_run_async`."""
Steps = Generator[Step, None, None]
Within = tuple[Unit, WorkUnit, Site | None]
"""What a request's boundary passes to :meth:`SessionScope.enter`: the unit and the unit of work
it has just opened, and the "created at" site of its sessions (None: looked for as usual)."""
_modules = sys.modules

_IN_ORDER = (
    "Scopes end in the reverse order they began: leave nested `with`/`async with` blocks first, "
    "and close a generator that holds a scope (contextlib.closing, contextlib.aclosing) before "
    "the block around it ends."
)


class ScopeState(Generic[S]):
    """The session of one active (or ended) scope, who opened it, and the scopes nested in it.

    What the registry's scope variable holds, apart from the :class:`SessionScope`: the scope
    keeps the variable's ``Token``, and a token holds the context it was made in, so a context
    holding the scope itself would be a reference cycle. A request whose body the server drops
    without ``close()`` would then end (and close its session) only when the collector runs,
    instead of as its context is freed (``tests/test_flask.py`` caught it when the two were
    merged to save an object per request).
    """

    __slots__ = ("session", "owner", "ended", "nested", "recover")

    def __init__(self, session: S, owner: Unit) -> None:
        self.session = session
        self.owner = owner
        self.ended = False
        self.nested: list[SessionScope[S]] | None = None
        """The nested scopes still open on this session (each in a savepoint), innermost last;
        None until one is (most scopes never nest one: no list per request)."""
        self.recover: Callable[[], S] | None = None
        """Set when the scope ended in another context than its opener's (exited from another
        unit): the opener, still pointing at it, then looks its session up without it."""

    def session_for_use(self) -> S:
        """The scope's session: what the registries answer whenever a scope is set.

        On the hot path only ``ended`` is read. An ended scope is an error for a unit that outlived
        the block; the unit that opened a scope which another unit then exited gets the session it
        would have had without the scope (that exit could not reset the opener's context).
        """
        if self.ended:
            if self.recover is not None and current_unit() is self.owner:
                return self.recover()
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

    Inside another scope (without ``new=True``) it works in a savepoint of that scope's session
    instead: released when the block succeeds, rolled back when it raises, and rolled back on
    success too with ``commit=False`` (the nested block's work is discarded, as a top-level
    ``commit=False`` block's is); the transaction itself is the enclosing block's to end.
    """

    # What a scope learns as it runs; class-level defaults, so that making one (per request)
    # sets only what it was given.
    _entered_by: Unit | None = None
    _entered_in: WorkUnit | None = None
    _exited = False
    _state: ScopeState[S] | None = None
    """The scope's own session: set for a scope that is not nested."""
    _token: Token[ScopeState[S] | None] | None = None
    _joined: ScopeState[S] | None = None
    """The scope a nested scope works in, in ``_savepoint``."""
    _savepoint: Any = None
    _ends_in_one_frame = True
    """Whether ``__exit__`` may end the scope's own session with :meth:`_end_session`."""
    _session_kw: Mapping[str, Any] = MappingProxyType({})
    """What the scope's session is made with (``scope(**kw)``)."""

    def __init__(
        self,
        scope_var: ContextVar[ScopeState[S] | None],
        factory: Callable[..., S],
        new: bool,
        commit: bool,
        session_kw: dict[str, Any],
        guard: Mode = "raise",
        lookup: Callable[[], S] | None = None,
    ) -> None:
        """``lookup`` is the registry's own (``registry()``), for the opener after a misuse.

        (Positional arguments are accepted: a class called with keywords builds a dict per call,
        and every request makes a scope.)"""
        self._var = scope_var
        self._factory = factory
        self._new = new
        self._commit = commit
        if session_kw:  # (most scopes take none: no dict kept per request)
            self._session_kw = session_kw
        self._guard = guard
        self._lookup = lookup

    def enter(self, _callers: int = 1, within: Within | None = None) -> S:
        """Open the scope, or find the scope to join; shared by the sync and async protocols.

        A nested scope's savepoint is begun by the caller (awaited for an AsyncSession), which
        then calls :meth:`work_in`. ``_callers``: how many of the frames calling this one are
        sessionscope's (``__enter__``: 2), where the search for the "created at" site starts.
        ``within``: (unit, work, site) when the caller has just opened the running unit of work
        itself (a request's boundary): then nothing is looked up, and the session's "created
        at" site is ``site`` (the integration's, found once) unless that is None.
        """
        if self._entered_by is not None:
            raise sa_exc.InvalidRequestError(
                "This Session.scope() was already entered; call Session.scope() again for "
                "another block."
            )
        if within is None:
            unit, work = unit_and_work()  # (one lookup of the running task for both)
            site = None
        else:
            unit, work, site = within
        self._entered_by, self._entered_in = unit, work
        outer = self._var.get()
        if outer is not None and not outer.ended and not self._new:
            if self._session_kw:
                raise sa_exc.InvalidRequestError(
                    "A nested Session.scope() joins the enclosing scope's session and cannot take "
                    f"session arguments ({', '.join(sorted(self._session_kw))}); use "
                    "Session.scope(new=True, ...) for an independent session."
                )
            self._joined = outer
            return outer.session
        session = install(
            self._factory(**self._session_kw),
            self._guard,
            site=site,
            on_hand_off=_stays_in_its_scope,
            work=work,
            depth=_callers + 1,
        )
        self._state = state = ScopeState(session, unit)
        self._token = self._var.set(state)
        return session

    def work_in(self, savepoint: Any) -> None:
        """A nested scope's savepoint has begun: it is now the innermost open scope."""
        joined = self._joined
        assert joined is not None
        self._savepoint = savepoint
        if joined.nested is None:
            joined.nested = [self]
        else:
            joined.nested.append(self)

    def __enter__(self) -> S:
        session = self.enter(2)
        if self._joined is not None:
            self.work_in(session.begin_nested())  # type: ignore[attr-defined]
        return session

    def how_to_end(
        self, exc_type: type[BaseException] | None
    ) -> tuple[bool, bool, sa_exc.InvalidRequestError | None]:
        """(commit, failing, misuse) for an exit: a misuse is raised once the scope has ended.

        Two exits are misuses, and their work is rolled back, never committed: from another unit
        than the one that entered (that unit does not own the session), and while scopes nested
        in this one are still open (their blocks have not decided). The nested scopes left open
        are orphaned: their own exit raises and touches nothing.
        """
        if self._entered_by is None:
            raise sa_exc.InvalidRequestError("Session.scope() exited without being entered.")
        if self._exited:
            raise sa_exc.InvalidRequestError("This Session.scope() was already exited.")
        self._exited = True
        if self._joined is not None and self not in (self._joined.nested or ()):
            raise sa_exc.InvalidRequestError(
                "This nested Session.scope() was exited after a scope around it had ended, which "
                "rolled back its savepoint with its own work; nothing was done now. " + _IN_ORDER
            )
        if self._joined is None and self._state is not None:  # (_leave_stack(), inlined)
            nested = self._state.nested
            left_open = len(nested) if nested else 0
            if left_open:
                self._state.nested = None
        else:
            left_open = self._leave_stack()
        # the unit of work that entered it (its jobs included: FastAPI enters a sync dependency's
        # scope in one pool job and exits it in another), or one nested in it
        entered_in = self._entered_in
        assert entered_in is not None
        exiting_work = work_var.get()
        if (  # current_work() is entered_in, the usual answer, tested without its calls
            exiting_work is not entered_in
            or entered_in.ended
            or entered_in.generation != _fork.generation
            or _get_running_loop() is not None
            or "trio" in _modules
        ):
            exiting_work = current_work()
            if exiting_work is not entered_in and (
                exiting_work is None or not exiting_work.within(entered_in)
            ):
                return False, True, self._cross_unit(current_unit())
        if left_open:
            return False, True, self._ended_before_nested(left_open)
        return self._commit and exc_type is None, exc_type is not None, None

    def _leave_stack(self) -> int:
        """Take this scope and those nested in it off the stack: how many of those were open."""
        if self._joined is not None:
            stack = self._joined.nested
            assert stack is not None  # (this scope is in it: how_to_end() checked)
            position = stack.index(self)
            left_open = len(stack) - position - 1
            del stack[position:]
            return left_open
        assert self._state is not None
        nested = self._state.nested
        self._state.nested = None
        return len(nested) if nested else 0

    def _what_was_rolled_back(self) -> str:
        if self._joined is not None:
            return "its work was rolled back to its savepoint (not released)"
        return "its work was rolled back (not committed) and its session closed"

    def _cross_unit(self, exiting: Unit) -> CrossUnitError:
        assert self._entered_by is not None
        return CrossUnitError(
            f"Session.scope() was entered in {describe_unit(self._entered_by)} but exited in "
            f"{describe_unit(exiting)}. A scope must end in the unit that began it; "
            f"{self._what_was_rolled_back()}. Use `with`/`async with` in one unit, and give other "
            "units copies of objects (Session.merge()) or a scope of their own. "
            + background("scope-cross-unit")
        )

    def _ended_before_nested(self, left_open: int) -> sa_exc.InvalidRequestError:
        return sa_exc.InvalidRequestError(
            f"This Session.scope() was exited while {left_open} scope(s) nested in it were still "
            f"open; {self._what_was_rolled_back()}, with theirs. " + _IN_ORDER
        )

    def _recover(self) -> S:
        """The opener's session after this scope was exited in another context (another unit).

        That exit could not reset the scope variable in the opener's context (a variable is reset
        only in the context that set it), so the context still points at this ended scope. Point
        it back at what it held before the scope began, and look again.
        """
        assert self._token is not None and self._lookup is not None
        before = self._token.old_value
        self._var.set(None if before is Token.MISSING else before)
        return self._lookup()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        commit, failing, misuse = self.how_to_end(exc_type)
        if misuse is None and self._joined is None and self._ends_in_one_frame:
            self._end_session(commit=commit, failing=failing)  # the usual end, in one frame
            return
        with _exempt_if(misuse):
            _run(self.ending(commit=commit, failing=failing))
        if misuse is not None:
            raise misuse

    def _end_session(self, *, commit: bool, failing: bool) -> None:
        """:meth:`_session_ending` run synchronously, without a generator: a scope's usual end.

        Every request pays for this, so it is written out once more for the sync case (the
        steps, generator and ``_run`` loop cost more than the rest of the exit); the steps and
        their error handling are the same as ``_session_ending``'s with ``_close_and_seal``,
        which ``tests/test_scope.py`` exercises on both paths.
        """
        state = self._state
        assert state is not None
        session: Any = state.session
        try:
            if commit:
                session.commit()
        except BaseException:
            failing = True
            raise
        finally:
            state.ended = True
            try:
                try:  # (_close_and_seal(), inlined)
                    session.close()
                finally:
                    seal(session)
            except Exception:
                if not failing:
                    raise
                log.exception("sessionscope: closing a scope's session failed")
            finally:
                self._reset_var()

    def ending(self, *, commit: bool, failing: bool) -> Steps:
        """The steps that end this scope, for :func:`_run` or :func:`_run_async`."""
        if self._joined is not None:
            return _savepoint_ending(self._savepoint, commit=commit, failing=failing)
        assert self._state is not None
        return self._session_ending(self._state, commit=commit, failing=failing)

    def _session_ending(self, state: ScopeState[S], *, commit: bool, failing: bool) -> Steps:
        """Commit if asked, then always close (and seal) the scope's own session."""
        try:
            if commit:
                yield state.session.commit  # type: ignore[attr-defined]
        except BaseException:
            failing = True
            raise
        finally:
            state.ended = True
            try:
                yield self._closing(state.session)
            except Exception:
                if not failing:
                    raise
                log.exception("sessionscope: closing a scope's session failed")
            finally:
                self._reset_var()

    def _closing(self, session: S) -> Step:
        """The step that closes this scope's session and seals it against reuse."""
        return functools.partial(_close_and_seal, session)

    def _reset_var(self) -> None:
        if self._token is None:
            return
        try:
            self._var.reset(self._token)
        except ValueError:
            # Exited in another context (another unit's, as a rule): the entering context still
            # points at this ended scope. Its unit recovers on its next lookup.
            if self._state is not None and self._lookup is not None:
                self._state.recover = self._recover


class AsyncSessionScope(SessionScope[S]):
    """What ``AsyncScoped.scope()`` returns: ``async with`` around one AsyncSession.

    The same rules as :class:`SessionScope`; the savepoint, commit and close are awaited, and the
    close runs in a task that cancellation cannot stop (as SQLAlchemy's own
    ``AsyncSession.__aexit__`` does), so a block cancelled in the middle of a flush or commit still
    returns its connection.
    """

    _ends_in_one_frame = False  # its close is awaited (``_closing``)

    def __enter__(self) -> S:
        raise TypeError("An AsyncSession scope is entered with `async with`, not `with`.")

    async def __aenter__(self) -> S:
        session = self.enter(2)
        if self._joined is not None:
            self.work_in(await session.begin_nested())  # type: ignore[attr-defined]
        return session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        commit, failing, misuse = self.how_to_end(exc_type)
        with _exempt_if(misuse):
            await _run_async(self.ending(commit=commit, failing=failing))
        if misuse is not None:
            raise misuse

    def _closing(self, session: S) -> Step:
        return functools.partial(close_shielded, session, then_seal=True)


def _run(steps: Steps) -> None:
    """End a scope synchronously: call each step; a step's failure is raised inside the steps."""
    step = next(steps, None)
    while step is not None:
        try:
            step()
        except BaseException as error:
            step = _throw(steps, error)
        else:
            step = next(steps, None)


async def _run_async(steps: Steps) -> None:
    """End a scope asynchronously: :func:`_run`, awaiting each step."""
    step = next(steps, None)
    while step is not None:
        try:
            await step()
        except BaseException as error:
            step = _throw(steps, error)
        else:
            step = next(steps, None)


def _throw(steps: Steps, error: BaseException) -> Step | None:
    """Raise ``error`` where the failed step was yielded: the next step, or None once done."""
    try:
        return steps.throw(error)
    except StopIteration:
        return None


def _savepoint_ending(savepoint: Any, *, commit: bool, failing: bool) -> Steps:
    """Release a nested scope's savepoint, or roll it back; a failed release rolls it back too."""
    if not _still_open(savepoint):
        return  # the block ended it itself: session.commit(), rollback() and close() end them all
    if commit:
        try:
            yield savepoint.commit
        except BaseException:
            if _still_open(savepoint):  # a failed flush deactivates it; a failed RELEASE keeps it
                try:
                    yield savepoint.rollback
                except Exception:
                    log.exception("sessionscope: rolling back a savepoint whose release failed")
            raise
        return
    try:
        yield savepoint.rollback
    except Exception:
        if not failing:
            raise
        log.exception("sessionscope: rolling back a nested scope's savepoint failed")


def _still_open(savepoint: Any) -> bool:
    """Whether a savepoint is still one of its session's open transactions (it may have ended)."""
    sync = getattr(savepoint, "sync_transaction", savepoint)  # an AsyncSessionTransaction's
    transaction = sync.session.get_nested_transaction()
    while transaction is not None:
        if transaction is sync:
            return True
        transaction = transaction.parent
    return False


def _close_and_seal(session: Any) -> None:
    try:
        session.close()
    finally:
        seal(session)


def _exempt_if(
    misuse: sa_exc.InvalidRequestError | None,
) -> contextlib.AbstractContextManager[None]:
    """Exited from the wrong unit: the scope's own rollback and close pass the guard."""
    return cleanup() if isinstance(misuse, CrossUnitError) else contextlib.nullcontext()


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
