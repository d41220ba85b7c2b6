"""``ship`` / ``receive``: ORM objects as plain data, for another unit, process or machine.

``copy_to`` moves objects between units of one process (``merge``). Across processes (a task
queue, a message, a cache) there is no source object to merge from, only data, so ``ship`` turns
clean persistent objects into JSON-safe data and ``receive`` turns it back into objects attached
to a session, as if a query had loaded them, without a SELECT. Why each rule (docs/design.md,
"Shipping objects"):

- Only *clean persistent* state is shipped: it is what the database holds, so the receiver can
  trust it without asking. Pending, dirty and deleted objects are refused (their state is not the
  row's); so is a value that cannot round-trip exactly.
- Only what is loaded is read (the instance ``__dict__``): shipping never loads nor emits SQL,
  and what was not loaded arrives expired (columns) or unloaded (relationships), loading lazily.
- Objects are a flat table referenced by index, so a graph with cycles (``parent.children`` and
  ``child.parent``) comes back as one object per identity.
- Mappers are named ``module:QualName`` and resolved through the declarative registries, never
  imported by name from the payload: a payload cannot make the receiver import anything.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import enum
import importlib
import math
import sys
import uuid
import zoneinfo
from collections.abc import Awaitable, Iterable
from typing import Any, NoReturn, overload

from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session
from sqlalchemy.orm import Mapper, Session, make_transient_to_detached, scoped_session
from sqlalchemy.orm.attributes import instance_state, set_committed_value
from sqlalchemy.orm.exc import UnmappedInstanceError
from sqlalchemy.orm.state import InstanceState

from ._arguments import message, refuse, what_it_is
from .exc import NotShippableError, ShippedVersionError, background

FORMAT = 1
"""The payload's format version: ``receive`` refuses any other."""

_TAG = "$t"
_PLAIN = frozenset({str, int, bool, type(None)})
_TARGETS = (Session, AsyncSession, scoped_session, async_scoped_session)


# -- values ------------------------------------------------------------------------------------


def _name_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode(value: Any) -> Any:
    """A JSON-safe form of a column value that :func:`decode` turns back into an equal value.

    JSON's own scalars stay as they are; everything else (and every dict, so that a JSON column
    holding ``{"$t": ...}`` cannot be mistaken for a tag) becomes ``{"$t": tag, "v": ...}``.
    Raises :class:`TypeError` for a value with no exact form.
    """
    if type(value) in _PLAIN:  # the usual case first: exact types, so no IntEnum or str subclass
        return value
    if isinstance(value, bool | str):
        return value
    if isinstance(value, enum.Enum):  # before int: an IntEnum must come back as its member
        return {_TAG: "enum", "cls": _name_of(type(value)), "v": value.name}
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_TAG: "float", "v": repr(value)}
    if isinstance(value, dt.datetime):
        out = {_TAG: "datetime", "v": value.isoformat()}
        key = getattr(
            value.tzinfo, "key", None
        )  # a zoneinfo.ZoneInfo: keep the zone, not the offset
        if isinstance(key, str):
            out["tz"] = key
        return out
    if isinstance(value, dt.date):
        return {_TAG: "date", "v": value.isoformat()}
    if isinstance(value, dt.time):
        return {_TAG: "time", "v": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {_TAG: "timedelta", "v": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, decimal.Decimal):
        return {_TAG: "decimal", "v": str(value)}
    if isinstance(value, uuid.UUID):
        return {_TAG: "uuid", "v": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("a dict with keys that are not strings (JSON keys are strings)")
        return {_TAG: "dict", "v": {k: encode(v) for k, v in value.items()}}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {_TAG: "tuple", "v": [encode(v) for v in value]}
    raise TypeError(f"no exact JSON form for {type(value).__qualname__}")


def decode(value: Any) -> Any:
    """The value :func:`encode` was given."""
    if type(value) is not dict:
        return [decode(v) for v in value] if type(value) is list else value
    tag, raw = value[_TAG], value["v"]
    if tag == "dict":
        return {k: decode(v) for k, v in raw.items()}
    if tag == "tuple":
        return tuple(decode(v) for v in raw)
    if tag == "datetime":
        when = dt.datetime.fromisoformat(raw)
        if "tz" in value:
            when = when.astimezone(zoneinfo.ZoneInfo(value["tz"]))
        return when
    if tag == "enum":
        return _enum_class(value["cls"])[raw]
    return _DECODERS[tag](raw)


_DECODERS: dict[str, Any] = {
    "float": float,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "timedelta": lambda v: dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2]),
    "decimal": decimal.Decimal,
    "uuid": uuid.UUID,
    "bytes": base64.b64decode,
}


def _enum_class(name: str) -> type[enum.Enum]:
    """An Enum class named in a payload: only one its module already defines (never imported)."""
    module_name, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if not (isinstance(found, type) and issubclass(found, enum.Enum)):
        raise ValueError(f"unknown Enum class {name!r} (its module must be imported)")
    return found


# -- ship --------------------------------------------------------------------------------------


def ship(objects: Any) -> dict[str, Any]:
    """Clean persistent ORM objects, and the relationships loaded on them, as JSON-safe data.

    Reads only what is loaded (never emits SQL nor loads anything), so it can be called in the
    unit that owns the objects' session, or on detached objects.

    :param objects: one mapped object, or an iterable of them.
    :return: a dict that ``json.dumps`` accepts; give it to :func:`receive`.
    :raises NotShippableError: an object is pending/transient, deleted, has unflushed changes,
     or holds a value with no exact JSON form.
    """
    single = _is_mapped(objects)
    if single:
        roots = [objects]
    elif isinstance(objects, Iterable) and not isinstance(objects, str | bytes | dict):
        roots = list(objects)
        for position, obj in enumerate(roots):
            if not _is_mapped(obj):
                _refuse_unmapped("ship()", f"objects[{position}]", obj)
    else:
        _refuse_unmapped("ship()", "objects", objects)
    table: list[dict[str, Any]] = []
    index: dict[int, int] = {}
    root_refs = [_ship_one(instance_state(obj), table, index) for obj in roots]
    return {"format": FORMAT, "many": not single, "roots": root_refs, "objects": table}


def _is_mapped(obj: Any) -> bool:
    return isinstance(inspect(obj, raiseerr=False), InstanceState)


def _refuse_unmapped(call: str, name: str, value: Any) -> NoReturn:
    raise UnmappedInstanceError(
        value,
        message(call, name, value, "a mapped instance, or an iterable of them", "", "ship-state"),
    )


class _Plan:
    """What ``ship``/``receive`` read of one mapper, worked out once (mappers are configured)."""

    def __init__(self, mapper: Mapper[Any]) -> None:
        self.mapper = mapper
        self.name = _name_of(mapper.class_)
        self.columns = tuple(p.key for p in mapper.column_attrs)
        self.relationships = tuple((r.key, r.uselist) for r in mapper.relationships)
        self.primary_key = tuple(mapper.get_property_by_column(c).key for c in mapper.primary_key)
        version = mapper.version_id_col
        self.version = None if version is None else mapper.get_property_by_column(version).key


_plans: dict[Mapper[Any], _Plan] = {}


def _plan(mapper: Mapper[Any]) -> _Plan:
    plan = _plans.get(mapper)
    if plan is None:
        plan = _plans[mapper] = _Plan(mapper)
    return plan


def _ship_one(state: InstanceState[Any], table: list[dict[str, Any]], index: dict[int, int]) -> int:
    """Add ``state`` (and what it references) to ``table`` once; return its position."""
    seen = index.get(id(state))
    if seen is not None:
        return seen
    _check_shippable(state)
    plan = _plan(state.mapper)
    data = state.dict
    assert state.key is not None
    columns = {key: _encoded(state, key, data[key]) for key in plan.columns if key in data}
    relationships: dict[str, Any] = {}
    entry: dict[str, Any] = {
        "mapper": plan.name,
        "identity": [_encoded(state, "identity", v) for v in state.key[1]],
        "columns": columns,
        "relationships": relationships,
    }
    if plan.version is not None and plan.version in columns:
        entry["version"] = columns[plan.version]
    position = index[id(state)] = len(table)
    table.append(entry)
    for key, uselist in plan.relationships:
        if key not in data:
            continue
        value = data[key]
        if value is None:
            relationships[key] = None
        elif uselist:
            relationships[key] = [_ship_one(instance_state(v), table, index) for v in value]
        else:
            relationships[key] = _ship_one(instance_state(value), table, index)
    return position


def _check_shippable(state: InstanceState[Any]) -> None:
    obj = state.obj()
    if state.key is None:
        _not_shippable(
            obj,
            "is transient or pending: it has no row (no identity) yet",
            "Flush and commit it first, or ship its data yourself.",
            "ship-state",
        )
    session = state.session
    if state.deleted or state.was_deleted or (session is not None and obj in session.deleted):
        _not_shippable(
            obj,
            "is deleted (or marked for deletion) in its session",
            "Ship objects whose rows exist; pass the id if the receiver needs to know.",
            "ship-state",
        )
    if state.modified:
        changed = sorted(k for k in state.committed_state if state.attrs[k].history.has_changes())
        if changed:
            _not_shippable(
                obj,
                f"has changes not yet flushed and committed ({', '.join(changed)})",
                "Flush and commit first (the receiver trusts shipped state as the row's), or "
                "ship it before changing it.",
                "ship-dirty",
            )


def _encoded(state: InstanceState[Any], key: str, value: Any) -> Any:
    try:
        return encode(value)
    except TypeError as exc:
        _not_shippable(
            state.obj(),
            f"holds a value with no exact JSON form in {key!r}: {exc}",
            "Expire or defer that attribute before shipping (it then arrives unloaded).",
            "ship-value",
        )


def _not_shippable(obj: Any, why: str, fix: str, anchor: str) -> NoReturn:
    raise NotShippableError(f"ship(): {_describe(obj)} {why}. {fix} {background(anchor)}")


def _describe(obj: Any) -> str:
    state = inspect(obj)
    key = state.key[1] if state.key is not None else None
    return f"{type(obj).__name__} {key if key is not None else f'at 0x{id(obj):x}'}"


# -- receive -----------------------------------------------------------------------------------


@overload
def receive(
    session: AsyncSession | async_scoped_session[Any],
    shipped: dict[str, Any],
    check_version: bool = False,
    populate_existing: bool = False,
) -> Awaitable[Any]: ...


@overload
def receive(
    session: Session | scoped_session[Any],
    shipped: dict[str, Any],
    check_version: bool = False,
    populate_existing: bool = False,
) -> Any: ...


def receive(
    session: Any, shipped: Any, check_version: bool = False, populate_existing: bool = False
) -> Any:
    """Objects from :func:`ship`'s data, attached to ``session`` as persistent, without a SELECT.

    Shipped columns and relationships are set as if loaded; columns not shipped arrive expired
    and relationships not shipped unloaded (each loads on first access). An identity the session
    already has keeps the session's copy (as a query without ``populate_existing`` does): only
    what it has not loaded is filled in from the shipped state.

    :param session: a Session or scoped session of the current unit; an AsyncSession or
     ``async_scoped_session`` makes the result awaitable.
    :param shipped: what :func:`ship` returned (after a JSON round trip or not).
    :param check_version: with objects whose mapper has a ``version_id_col``, one SELECT per
     mapper of the shipped rows' versions; :class:`ShippedVersionError` if one changed.
    :param populate_existing: for identities the session already has, the shipped state
     replaces what the session's copy loaded (as SQLAlchemy's ``populate_existing``), except for
     attributes the session's copy changed and has not flushed: those changes stay. Use it to
     take back objects that another unit changed and committed (``fan_out`` does).
    :return: one object, or a list in the order shipped.
    """
    if not isinstance(session, _TARGETS):
        refuse(
            sa_exc.ArgumentError,
            "receive()",
            "session",
            session,
            "a Session, an AsyncSession or a scoped session (the target)",
            what_it_is(session),
        )
    if check_version is not True and check_version is not False:
        refuse(TypeError, "receive()", "check_version", check_version, "True or False")
    if populate_existing is not True and populate_existing is not False:
        refuse(TypeError, "receive()", "populate_existing", populate_existing, "True or False")
    _check_payload(shipped)
    if isinstance(session, async_scoped_session):
        session = session()  # the current task's session
    if isinstance(session, AsyncSession):
        return session.run_sync(_receive, shipped, check_version, populate_existing)
    return _receive(session, shipped, check_version, populate_existing)


def _check_payload(shipped: Any) -> None:
    ok = (
        isinstance(shipped, dict)
        and shipped.get("format") == FORMAT
        and isinstance(shipped.get("objects"), list)
        and isinstance(shipped.get("roots"), list)
    )
    if not ok:
        _refuse_payload(shipped, "Pass ship()'s result, or json.loads() of its JSON.")


def _refuse_payload(shipped: Any, fix: str) -> NoReturn:
    refuse(
        sa_exc.ArgumentError,
        "receive()",
        "shipped",
        shipped,
        f"what sessionscope.ship() returned (format {FORMAT})",
        fix,
        "receive-payload",
    )


def _receive(
    session: Any, shipped: dict[str, Any], check_version: bool, populate_existing: bool = False
) -> Any:
    if isinstance(session, scoped_session):
        session = session()
    try:
        return _attach(session, shipped, check_version, populate_existing)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        # A payload that is not ship()'s (edited, truncated, from elsewhere): say so, not "KeyError"
        _refuse_payload(
            shipped,
            f"Its content does not decode ({type(exc).__name__}: {exc}); pass ship()'s result, "
            "or json.loads() of its JSON, unchanged.",
        )


def _attach(
    session: Session, shipped: dict[str, Any], check_version: bool, populate_existing: bool
) -> Any:
    entries: list[dict[str, Any]] = shipped["objects"]
    mappers = [_mapper_named(e.get("mapper")) for e in entries]
    keys = [
        m.identity_key_from_primary_key(tuple(decode(v) for v in e["identity"]))
        for m, e in zip(mappers, entries, strict=True)
    ]
    if check_version:
        _check_versions(session, mappers, entries, keys)
    identity_map = session.identity_map
    objects: list[Any] = []
    fresh: list[bool] = []
    for mapper, entry, key in zip(mappers, entries, keys, strict=True):
        existing = identity_map.get(key)
        if existing is not None:
            objects.append(existing)
            fresh.append(False)
            _fill_existing(instance_state(existing), entry, populate_existing)
            continue
        obj = mapper.class_manager.new_instance()
        data = obj.__dict__
        for name, value in entry["columns"].items():
            data[name] = decode(value)
        for name, value in zip(_plan(mapper).primary_key, key[1], strict=True):
            data.setdefault(name, value)
        make_transient_to_detached(obj)  # history reset as if loaded; the rest expired
        objects.append(obj)
        fresh.append(True)
    for obj, entry, new in zip(objects, entries, fresh, strict=True):
        if not entry["relationships"]:
            continue
        data = obj.__dict__
        kept = () if new else _kept(instance_state(obj), populate_existing)
        for name, ref in entry["relationships"].items():
            if name in kept:
                continue  # the session's copy wins
            if type(ref) is list:
                set_committed_value(obj, name, [objects[i] for i in ref])
            else:
                set_committed_value(obj, name, None if ref is None else objects[ref])
    add = session.add
    for obj, new in zip(objects, fresh, strict=True):
        if new:
            add(obj)  # detached with an identity: persistent, no SQL
    roots = [objects[i] for i in shipped["roots"]]
    return roots if shipped.get("many", True) else roots[0]


def _kept(state: InstanceState[Any], populate_existing: bool) -> Any:
    """The attributes of the session's copy that shipped values do not replace.

    By default every loaded one (the session's copy wins, as a query without
    ``populate_existing``); with ``populate_existing``, only those with changes not yet flushed
    (the shipped state becomes what was loaded; the application's own change stays on top).
    """
    if state.deleted or state.was_deleted:
        return _EVERYTHING
    if populate_existing:
        return state.committed_state.keys() & state.dict.keys()
    return state.dict.keys()


class _Everything:
    def __contains__(self, name: object) -> bool:
        return True


_EVERYTHING = _Everything()


def _fill_existing(state: InstanceState[Any], entry: dict[str, Any], populate: bool) -> None:
    """Shipped column values onto the session's copy of an identity, as far as :func:`_kept`
    lets them."""
    kept = _kept(state, populate)
    obj = state.obj()
    for name, value in entry["columns"].items():
        if name not in kept:
            set_committed_value(obj, name, decode(value))


_mapper_cache: dict[str, Mapper[Any]] = {}


def _mapper_named(name: Any) -> Mapper[Any]:
    """The mapper of the class named ``module:QualName``, looked up in the declarative registries.

    Never imports: a name no registry knows is refused (import the models' module first).
    """
    found = _mapper_cache.get(name) if isinstance(name, str) else None
    if found is not None:
        return found
    mapperlib = importlib.import_module("sqlalchemy.orm.mapper")
    for registry in mapperlib._all_registries():
        for mapper in registry.mappers:
            _mapper_cache.setdefault(_name_of(mapper.class_), mapper)
    found = _mapper_cache.get(name) if isinstance(name, str) else None
    if found is None:
        refuse(
            sa_exc.ArgumentError,
            "receive()",
            "shipped",
            name,
            "objects of mapped classes this process knows (a mapper named 'module:QualName')",
            "Import the module defining that model before receiving (no registry maps it).",
            "receive-unknown-mapper",
        )
    return found


def _check_versions(
    session: Session, mappers: list[Mapper[Any]], entries: list[dict[str, Any]], keys: list[Any]
) -> None:
    """One SELECT of the version column per mapper; refuse the first object whose row changed."""
    wanted: dict[Mapper[Any], dict[tuple[Any, ...], Any]] = {}
    for mapper, entry, key in zip(mappers, entries, keys, strict=True):
        if "version" in entry and mapper.version_id_col is not None:
            wanted.setdefault(mapper, {})[key[1]] = decode(entry["version"])
    for mapper, shipped in wanted.items():
        pk, version_col = mapper.primary_key, mapper.version_id_col
        assert version_col is not None
        if len(pk) == 1:  # a plain IN: cached and compiled more simply than a tuple IN
            where = pk[0].in_([ident[0] for ident in shipped])
        else:
            where = tuple_(*pk).in_(list(shipped))
        stmt = select(*pk, version_col).where(where)
        current = {tuple(row[:-1]): row[-1] for row in session.execute(stmt)}
        for ident, version in shipped.items():
            now = current.get(tuple(ident), _GONE)
            if now != version:
                row = "deleted" if now is _GONE else f"version {now!r}"
                raise ShippedVersionError(
                    f"receive(): {mapper.class_.__name__} {tuple(ident)} was shipped at version "
                    f"{version!r}, but its row is now {row}: it changed after it was shipped. "
                    "Ship it again from fresh state, or receive with check_version=False to "
                    f"accept the shipped state. {background('receive-version')}"
                )


_GONE = object()
