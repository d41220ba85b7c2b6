"""``unit_scoped(db)``: an existing Flask-SQLAlchemy 3.x ``db.session``, one session per request.

Flask-SQLAlchemy keys ``db.session`` by ``id()`` of the application context and removes it at the
context's teardown. An ``id()`` is reused as soon as the context is freed, nothing stops a thread
started inside a request (or a greenlet, or another request holding an object) from using the
session or its objects, and a context pushed twice shares one session by accident rather than by
rule. :func:`unit_scoped` keeps everything Flask-SQLAlchemy configured (its ``Session`` class,
which picks the engine by bind key, ``query_cls``, ``session_options``, the teardown that calls
``db.session.remove()``) and replaces only the registry:

- every application context (a request's, or one pushed by hand, by the CLI or by a test) is a
  :func:`sessionscope.unit_of_work`: opened when the context is pushed (Flask's
  ``appcontext_pushed`` signal), ended after every other teardown function of the context has run,
  so the session is closed (rolled back if uncommitted) even if nobody calls ``remove()``;
- an ``async def`` view (one task that Flask runs through asgiref while the request's thread
  waits) is lent the unit of work, so it uses the request's session; its child tasks do not;
- ``db.session`` is a :class:`sessionscope.scoped_session` over Flask-SQLAlchemy's own
  ``sessionmaker``, so the unit of work keys the session and the share-nothing guard owns it: a
  request's session or objects used by another thread or greenlet raise
  :class:`~sessionscope.CrossUnitError` (``guard="raise"``), warn (``"warn"``) or pass (``"off"``);
- ``db.session`` outside an application context still raises ``RuntimeError``, as
  Flask-SQLAlchemy's does (its ``get_bind`` needs the application's engines).

Flask and Flask-SQLAlchemy are imported when :func:`unit_scoped` runs: ``import sessionscope``
never needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import sessionmaker

from ._arguments import refuse
from ._guard import Mode, check_mode
from ._scoping import scoped_session
from ._work import UnitOfWork

if TYPE_CHECKING:
    from flask import Flask
    from flask.ctx import AppContext
    from flask_sqlalchemy import SQLAlchemy

__all__ = ["unit_scoped"]

_WORK_ATTR = "_sessionscope_unit_of_work"
"""Where an application context keeps the unit of work opened for it (one per context object)."""


class _AppContextSessionmaker(sessionmaker[Any]):
    """Flask-SQLAlchemy's ``sessionmaker``, refusing to make a session outside an app context.

    Flask-SQLAlchemy's registry raises there because its scope is the app context's ``id()``;
    sessionscope's registry would happily key a session by the thread instead, and the mistake
    would surface later, in ``get_bind``, or never (``db.session.add()`` needs no engine). A
    ``sessionmaker`` (not a wrapper function) so that ``event.listen(db.session, ...)`` (which
    Flask-SQLAlchemy's ``SQLALCHEMY_TRACK_MODIFICATIONS`` does) still finds the session class.
    """

    def __call__(self, **local_kw: Any) -> Any:
        from flask import has_app_context

        if not has_app_context():
            raise RuntimeError(
                "Working outside of application context: db.session needs one (as with "
                "Flask-SQLAlchemy's own db.session). Use 'with app.app_context():' around code "
                "that runs outside a request."
            )
        return super().__call__(**local_kw)


class UnitScopedSession(scoped_session[Any]):
    """``db.session`` after :func:`unit_scoped`: sessionscope's registry, marked as installed."""


def unit_scoped(db: SQLAlchemy, *, guard: Mode = "raise") -> UnitScopedSession:
    """Make ``db.session`` one guarded session per request (per application context).

    Call it once per ``SQLAlchemy`` instance, before or after ``db.init_app(app)`` /
    ``SQLAlchemy(app)``: applications already initialised are hooked now, later ``init_app``
    calls hook theirs. Call it before ``db.session`` is first used (at import or in the app
    factory); an application context already active when its app is hooked becomes a unit of work
    at once. Calling it again with the same ``guard`` returns the same registry.

    :param db: a Flask-SQLAlchemy 3.x ``SQLAlchemy`` instance; its ``session_options`` (session
     class, bind keys through that class, ``query_cls``, a custom ``scopefunc``) are kept.
    :param guard: ``"raise"`` (default), ``"warn"`` or ``"off"``: the share-nothing guard on
     ``db.session``'s sessions.
    :returns: the new ``db.session``.
    """
    from flask_sqlalchemy import SQLAlchemy

    if not isinstance(db, SQLAlchemy):
        refuse(
            sa_exc.ArgumentError,
            "unit_scoped()",
            "db",
            db,
            "a flask_sqlalchemy.SQLAlchemy instance",
            "pass the extension object, e.g. unit_scoped(db) after db = SQLAlchemy()",
        )
    mode = check_mode(guard, "unit_scoped()", "guard")
    current = db.session
    if isinstance(current, UnitScopedSession):
        if current.guard_mode != mode:
            raise sa_exc.InvalidRequestError(
                f"unit_scoped() was already applied to this SQLAlchemy instance with "
                f"guard={current.guard_mode!r}; it cannot be applied again with guard={mode!r}. "
                f"Use sessionscope.guard(session, mode) to change one session's mode."
            )
        return current

    registry = UnitScopedSession(
        _session_factory(current.session_factory), _custom_scopefunc(current), guard=mode
    )
    db.session = registry
    for app in list(db._app_engines):  # apps SQLAlchemy(app) / init_app() already saw
        _hook(app)
    _wrap_init_app(db)
    return registry


def _session_factory(factory: Any) -> _AppContextSessionmaker:
    """Flask-SQLAlchemy's sessionmaker (class, ``db``, ``query_cls``, options), as ours."""
    if not isinstance(factory, sessionmaker):
        refuse(
            sa_exc.ArgumentError,
            "unit_scoped()",
            "db.session.session_factory",
            factory,
            "the sessionmaker Flask-SQLAlchemy 3.x makes",
            "unit_scoped() works on db.session as SQLAlchemy() made it",
        )
    kw = dict(factory.kw)
    return _AppContextSessionmaker(class_=factory.class_, **kw)


def _custom_scopefunc(current: Any) -> Callable[[], Any] | None:
    """An application's own ``session_options={"scopefunc": ...}``; None for the app-context id.

    Flask-SQLAlchemy's default, the app context's ``id()``, is exactly what the unit of work
    replaces. A scopefunc the application chose on purpose is kept: sessionscope's registry then
    keys sessions by it, as SQLAlchemy's does, and the guard still applies.
    """
    from flask_sqlalchemy.session import _app_ctx_id

    scopefunc = getattr(current.registry, "scopefunc", None)
    if scopefunc is None or scopefunc is _app_ctx_id:
        return None
    return scopefunc  # type: ignore[no-any-return]


def _wrap_init_app(db: SQLAlchemy) -> None:
    """Hook every app ``db.init_app(app)`` initialises from now on (once per instance)."""
    init_app = db.init_app
    if getattr(init_app, "_sessionscope_hooks", False):
        return

    def hooked_init_app(app: Flask) -> None:
        init_app(app)
        _hook(app)

    hooked_init_app._sessionscope_hooks = True  # type: ignore[attr-defined]
    hooked_init_app.__doc__ = init_app.__doc__
    db.init_app = hooked_init_app  # type: ignore[method-assign]


def _hook(app: Flask) -> None:
    """Open a unit of work per app context of ``app``, ended after all its teardown functions.

    The end is inserted *first* in ``teardown_appcontext_funcs`` (Flask runs them in reverse), so
    teardown functions that still use ``db.session`` (Flask-SQLAlchemy's ``remove()``, an
    application's commit-on-teardown) run inside the unit of work.
    """
    from flask import appcontext_pushed, has_app_context
    from flask.globals import app_ctx

    if _end_for_app_context in app.teardown_appcontext_funcs:
        return
    app.teardown_appcontext_funcs.insert(0, _end_for_app_context)
    appcontext_pushed.connect(_open_for_app_context, app)
    if has_app_context() and app_ctx.app is app:
        _open(app_ctx._get_current_object())  # type: ignore[attr-defined]


def _open_for_app_context(sender: Flask, **_: Any) -> None:
    from flask.globals import app_ctx

    _open(app_ctx._get_current_object())  # type: ignore[attr-defined]


def _open(ctx: AppContext) -> None:
    """A unit of work for ``ctx``; a context pushed again (same object) keeps its first one."""
    if getattr(ctx, _WORK_ATTR, None) is not None:
        return
    work = UnitOfWork(lend_to_tasks=True)
    # Lent, as pytest's thread lends its work to async fixtures: Flask runs an ``async def`` view
    # as one task (asgiref) while the request's thread waits for it, so that task takes the work
    # over and uses the request's db.session, one task at a time; its child tasks stay units of
    # their own.
    work.__enter__()
    setattr(ctx, _WORK_ATTR, work)


def _end_for_app_context(exc: BaseException | None) -> None:
    """The context's last teardown: its unit of work ends, closing the sessions it holds."""
    from flask.globals import app_ctx

    ctx = app_ctx._get_current_object()  # type: ignore[attr-defined]
    work: UnitOfWork | None = getattr(ctx, _WORK_ATTR, None)
    if work is None:
        return
    setattr(ctx, _WORK_ATTR, None)
    work.__exit__(None if exc is None else type(exc), exc, None)
