"""Greenlets and OS threads: the current greenlet is the unit, unless it is a thread's main one.

Every OS thread has exactly one *main* greenlet (``parent is None``) for its whole life, whatever
gevent or eventlet patched and whenever they patched it, so "main greenlet" is how sessionscope
recognises "plain thread code" and the main greenlet's ``__dict__`` is where a thread keeps its
sessions. (The thread's identity and the signal of its end live in ``_thread``: a main greenlet is
freed late, by the main thread.)

SQLAlchemy's own greenlets (``__sqlalchemy_greenlet_provider__``, spawned by AsyncSession to run the
ORM) are looked through: code in them belongs to the greenlet that drives them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from greenlet import getcurrent, greenlet

SQLALCHEMY_PROVIDER = "__sqlalchemy_greenlet_provider__"


def driving_greenlet() -> greenlet:
    """The current greenlet, looking through SQLAlchemy's internal greenlets."""
    current = getcurrent()
    while getattr(current, SQLALCHEMY_PROVIDER, False) and current.parent is not None:
        current = current.parent
    return current


def main_greenlet() -> greenlet:
    """The current thread's main greenlet, where a thread keeps its sessions."""
    main = getcurrent()
    while main.parent is not None:
        main = main.parent
    return main


def hub_spawner() -> Callable[[Callable[[], None]], None] | None:
    """If running in a gevent or eventlet hub, a way to run work in a fresh greenlet instead.

    Closing a session may do network I/O, and a hub must never block: gevent raises
    ``BlockingSwitchOutError`` and eventlet deadlocks. (Work that cannot block may run in the
    hub itself: a fresh greenlet per ended unit is most of what a gevent unit's end costs.)
    """
    gevent_hub = sys.modules.get("gevent.hub")  # (no hub without its module: nothing to ask)
    if gevent_hub is not None and isinstance(getcurrent(), gevent_hub.Hub):
        import gevent

        return lambda fn: gevent.spawn(fn) and None
    eventlet_hubs = sys.modules.get("eventlet.hubs")
    if eventlet_hubs is not None:
        hub = getattr(eventlet_hubs._threadlocal, "hub", None)
        if hub is not None and hub.greenlet is getcurrent():
            import eventlet

            return lambda fn: eventlet.spawn_n(fn) and None
    return None


def watch_end(unit: greenlet, listener: Any) -> None:
    """Call ``listener.unit_ended()`` when a gevent or eventlet greenlet finishes or is killed.

    Those announce their end (``rawlink`` / ``link``), so the session is closed as the greenlet
    finishes even if the application keeps the greenlet object. Raw greenlets announce nothing:
    their unit of work ends as their context is freed with them (``_work``), or in a sweep.
    """
    if hasattr(unit, "rawlink"):  # gevent.Greenlet
        unit.rawlink(listener)
    elif hasattr(unit, "link") and hasattr(unit, "_exit_event"):  # eventlet GreenThread
        unit.link(listener)


def describe(unit: greenlet) -> str:
    if unit.parent is None:  # a thread's main greenlet stands for a thread sessionscope never named
        return f"an OS thread (its main greenlet at {id(unit):#x})"
    name = getattr(unit, "name", None) or type(unit).__name__
    return f"greenlet {name!r} at {id(unit):#x}"
