"""Refusing anything but a sessionscope registry where an integration opens scopes on it.

Shared by the integrations of synchronous frameworks (WSGI, Flask, Celery); the core never uses
it.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

from ._arguments import refuse
from ._async_scoping import async_scoped_session
from ._scoping import scoped_session


def expect_registry(
    call: str, value: object, *, synchronous: str = "WSGI is", reusers: str = "servers"
) -> None:
    """Refuse anything but a sync ``sessionscope.scoped_session`` as the ``session`` argument.

    The request's scope is opened on the registry the application calls; a session, a
    sessionmaker or SQLAlchemy's own ``scoped_session`` would give the application's
    ``Session()`` another session than the one this integration commits and closes.
    ``synchronous`` and ``reusers`` name the caller's world in the fix (``sessionscope.celery``).
    """
    if isinstance(value, scoped_session):
        return
    if isinstance(value, async_scoped_session):
        fix = (
            f"{synchronous} synchronous: pass a sessionscope.scoped_session(sessionmaker(engine))."
        )
    elif hasattr(value, "registry") and hasattr(value, "session_factory"):
        fix = (
            f"SQLAlchemy's scoped_session keys sessions by thread, which {reusers} reuse: use "
            "`from sessionscope import scoped_session` for the registry."
        )
    else:
        fix = "Pass the registry your code calls: `Session = scoped_session(sessionmaker(engine))`."
    refuse(sa_exc.ArgumentError, call, "session", value, "a sessionscope.scoped_session", fix)
