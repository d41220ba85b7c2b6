"""``sessionscope.async_scoped_session``: one AsyncSession per task, no inheritance, no leaks.

A subclass of ``sqlalchemy.ext.asyncio.async_scoped_session`` (same proxies, forwarding, errors,
awaitable ``remove()``) where ``scopefunc`` is optional. Without it each asyncio task, including
children made by ``gather``, ``create_task``, ``TaskGroup`` and anyio task groups, and each
``to_thread`` thread, gets its own AsyncSession, which is closed (awaited, on its own loop) when
the task ends, whether it finished, failed or was cancelled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.asyncio import async_scoped_session as _sa_async_scoped_session

from ._arguments import async_session_factory, expect_flags, expect_scopefunc
from ._async_session_end import close_on_its_loop
from ._guard import Mode
from ._scope import AsyncSessionScope
from ._unit_scoping import UnitScoping

_AS = TypeVar("_AS", bound=AsyncSession)


class async_scoped_session(UnitScoping[_AS], _sa_async_scoped_session[_AS]):  # type: ignore[misc]
    """A drop-in ``async_scoped_session`` whose default scope is the current task.

    :param session_factory: an ``async_sessionmaker``, a ``sessionmaker(class_=AsyncSession)``,
     or any callable making an AsyncSession. A sync maker is refused here; another callable is
     checked on the first session it makes (and ``session_factory`` is then a thin wrapper,
     ``__wrapped__`` being the callable given), so a sync one fails at that call, not at task end.
    :param scopefunc: optional; with one, sessions are keyed by it exactly as in SQLAlchemy (and
     must be removed with ``await remove()`` as there).
    :param guard: ``"raise"`` (default), ``"warn"`` or ``"off"``, as for
     :class:`sessionscope.scoped_session`.
    """

    _scopes_coroutines = True

    def __new__(cls, session_factory: Any = None, scopefunc: Any = None, **kw: Any) -> Any:
        if scopefunc is not None and cls is async_scoped_session:
            cls = _scopefunc_async_scoped_session
        return super().__new__(cls)

    def __init__(
        self,
        session_factory: Callable[..., _AS],
        scopefunc: Callable[[], Any] | None = None,
        *,
        guard: Mode = "raise",
    ) -> None:
        call = "async_scoped_session()"
        checked = async_session_factory(call, session_factory)
        expect_scopefunc(call, scopefunc)
        self._set_up_registry(checked, scopefunc, guard=guard, on_unit_end=close_on_its_loop)

    async def remove(self) -> None:
        """Close and discard the current unit's implicit AsyncSession, if any.

        Inside ``scope()`` the scope's session is left alone: the block owns it.
        """
        session = self.registry.implicit()
        if session is not None:
            await session.close()
        self.registry.clear()

    def scope(self, *, new: bool = False, commit: bool = True, **kw: Any) -> AsyncSessionScope[_AS]:
        """``async with AsyncScoped.scope() as s:``: commit on success, roll back on error, close.

        The same semantics as ``scoped_session.scope()``: nested scopes join, ``new=True`` is
        independent, ``commit=False`` rolls back; work the block awaits in ``to_thread`` shares it.
        """
        if new.__class__ is not bool or commit.__class__ is not bool:
            expect_flags("async_scoped_session.scope()", new=new, commit=commit)
        return self._open_scope(AsyncSessionScope, new=new, commit=commit, session_kw=kw)


class _scopefunc_async_scoped_session(async_scoped_session[_AS]):
    """``async_scoped_session(factory, scopefunc)``: SQLAlchemy's registry and lookups."""

    _proxied = _sa_async_scoped_session._proxied
    __call__ = _sa_async_scoped_session.__call__
