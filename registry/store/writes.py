"""How journalled operations become SQL: one statement per kind of operation and batch.

Operations of different kinds commute by construction (connection and link rows have ids that
are never reused, client and session rows are written as whole-row upserts), so a batch is
applied kind by kind, each as a single executemany, in :data:`ORDER`.

On SQLite the rows are turned into driver parameters here rather than by SQLAlchemy's
per-row machinery: the same compiled SQL and the same type processors, but a value object that
several rows of a batch share (one mutation stamps its client, connection and audit rows with
one ``datetime``, its client and connection rows with one metadata dict) is converted once.
The stored values are the ones SQLAlchemy would write. Other dialects use SQLAlchemy's
executemany as it is. The plan reads compiler internals (``positiontup``,
``escaped_bind_names``): pyproject pins SQLAlchemy to the versions that
``tests/core/test_fast_path.py`` checks it on.
"""

from __future__ import annotations

import enum
import weakref
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from operator import itemgetter
from typing import Any, TypedDict

from sqlalchemy import Dialect, bindparam, func, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import UpdateBase

from registry.store import models, rollups
from registry.store.dialect import upsert

#: A journalled row as the writer handles it: one of the row shapes below.
Row = Mapping[str, Any]


class ClientRow(TypedDict):
    """:data:`Op.CLIENT`: a whole ``clients`` row."""

    client_id: str
    client_type: str
    platform: str
    first_seen: datetime
    last_seen: datetime
    metadata: dict[str, Any]


class ConnectionOpenRow(TypedDict):
    """:data:`Op.CONNECTION_OPEN`: a new ``connections`` row."""

    connection_id: str
    client_id: str
    node_id: str
    client_type: str
    platform: str
    metadata: dict[str, Any]
    remote_address: str | None
    connected_at: datetime


class Stamp(TypedDict):
    """An update of one row by its id at a time. The keys are bind names, not column names:
    SQLAlchemy keeps the column names for the values an UPDATE sets."""

    b_id: str
    b_at: datetime


class ConnectionCloseRow(Stamp):
    """:data:`Op.CONNECTION_CLOSE`: the end of a ``connections`` row (``b_id``)."""

    b_code: int | None
    b_reason: str


class SessionRow(TypedDict):
    """:data:`Op.SESSION`: a whole ``sessions`` row."""

    session_id: str
    owner_id: str | None
    executor_id: str | None
    task_name: str | None
    state: str
    node_id: str
    created_at: datetime
    ended_at: datetime | None
    end_reason: str | None


class LinkOpenRow(TypedDict):
    """:data:`Op.LINK_OPEN`: a new ``session_links`` row."""

    link_id: str
    session_id: str
    client_id: str
    role: str
    bound_at: datetime


class DeviceInfoRow(TypedDict):
    """:data:`Op.DEVICE_INFO`: a new ``device_info_snapshots`` row."""

    device_id: str
    captured_at: datetime
    digest: str
    info: dict[str, Any]


class AuditRow(TypedDict):
    """:data:`Op.AUDIT`: a new ``audit_events`` row."""

    at: datetime
    node_id: str | None
    kind: str
    client_id: str | None
    session_id: str | None
    details: dict[str, Any]


class Op(enum.Enum):
    """A kind of row operation carried by the journal."""

    CLIENT = "client"  # whole-row upsert of clients (first_seen kept from the first insert)
    CONNECTION_OPEN = "connection_open"  # insert into connections
    CONNECTION_CLOSE = "connection_close"  # end a connections row
    SESSION = "session"  # whole-row upsert of sessions (owner/executor/created_at kept)
    LINK_OPEN = "link_open"  # insert into session_links
    LINK_CLOSE = "link_close"  # unbind a session_links row
    DEVICE_INFO = "device_info"  # insert into device_info_snapshots
    AUDIT = "audit"  # insert into audit_events
    NODE_BEAT = "node_beat"  # a nodes row's heartbeat


#: The row shape each operation carries (a :class:`Stamp` for the link close and the beat).
ROWS: dict[Op, type[Mapping[str, Any]]] = {
    Op.CLIENT: ClientRow,
    Op.CONNECTION_OPEN: ConnectionOpenRow,
    Op.CONNECTION_CLOSE: ConnectionCloseRow,
    Op.SESSION: SessionRow,
    Op.LINK_OPEN: LinkOpenRow,
    Op.LINK_CLOSE: Stamp,
    Op.DEVICE_INFO: DeviceInfoRow,
    Op.AUDIT: AuditRow,
    Op.NODE_BEAT: Stamp,
}

ORDER = (
    Op.CLIENT,
    Op.CONNECTION_OPEN,
    Op.CONNECTION_CLOSE,
    Op.SESSION,
    Op.LINK_OPEN,
    Op.LINK_CLOSE,
    Op.DEVICE_INFO,
    Op.AUDIT,
    Op.NODE_BEAT,
)


def _merge_clients(rows: list[Row]) -> list[Row]:
    merged: dict[str, Row] = {}
    for row in rows:
        earlier = merged.get(row["client_id"])
        if earlier is not None:
            row = {**row, "first_seen": min(earlier["first_seen"], row["first_seen"])}
        merged[row["client_id"]] = row
    return list(merged.values())


def _merge_sessions(rows: list[Row]) -> list[Row]:
    """One row per session, as the upsert applied row by row would leave it: the first known
    owner and executor, the first row's ``created_at``, the last row's everything else."""
    merged: dict[str, Row] = {}
    for row in rows:
        earlier = merged.get(row["session_id"])
        if earlier is not None:
            row = {
                **row,
                "owner_id": row["owner_id"] if earlier["owner_id"] is None else earlier["owner_id"],
                "executor_id": (
                    row["executor_id"] if earlier["executor_id"] is None else earlier["executor_id"]
                ),
                "created_at": earlier["created_at"],
            }
        merged[row["session_id"]] = row
    return list(merged.values())


def _last_by(key: str) -> Callable[[list[Row]], list[Row]]:
    def merge(rows: list[Row]) -> list[Row]:
        return list({row[key]: row for row in rows}.values())

    return merge


def _keep(rows: list[Row]) -> list[Row]:
    return rows


# Upserts touch a row at most once per statement (PostgreSQL refuses a second touch).
_MERGE: dict[Op, Callable[[list[Row]], list[Row]]] = defaultdict(
    lambda: _keep,
    {Op.CLIENT: _merge_clients, Op.SESSION: _merge_sessions, Op.NODE_BEAT: _last_by("b_id")},
)


@cache
def statement(op: Op, dialect_name: str) -> UpdateBase:
    """The statement that applies a list of ``op`` rows (cached per dialect)."""
    c, s = models.connections.c, models.sessions.c
    at = bindparam("b_at", type_=models.UTCDateTime())
    match op:
        case Op.CLIENT:
            return upsert(
                dialect_name,
                models.clients,
                ["client_id"],
                lambda excluded: {
                    name: excluded[name]
                    for name in ("client_type", "platform", "last_seen", "metadata")
                },
            )
        case Op.SESSION:
            return upsert(
                dialect_name,
                models.sessions,
                ["session_id"],
                lambda excluded: {
                    "owner_id": func.coalesce(s.owner_id, excluded.owner_id),
                    "executor_id": func.coalesce(s.executor_id, excluded.executor_id),
                    **{
                        name: excluded[name]
                        for name in ("task_name", "state", "node_id", "ended_at", "end_reason")
                    },
                },
            )
        case Op.CONNECTION_OPEN:
            return insert(models.connections)
        case Op.CONNECTION_CLOSE:
            return (
                update(models.connections)
                .where(c.connection_id == bindparam("b_id"))
                .values(
                    disconnected_at=at,
                    close_code=bindparam("b_code"),
                    close_reason=bindparam("b_reason"),
                )
            )
        case Op.LINK_OPEN:
            return insert(models.session_links)
        case Op.LINK_CLOSE:
            return (
                update(models.session_links)
                .where(models.session_links.c.link_id == bindparam("b_id"))
                .values(unbound_at=at)
            )
        case Op.DEVICE_INFO:
            return insert(models.device_info_snapshots)
        case Op.AUDIT:
            return insert(models.audit_events)
        case Op.NODE_BEAT:
            return (
                update(models.nodes)
                .where(models.nodes.c.node_id == bindparam("b_id"))
                .values(heartbeat_at=at)
            )


Processor = Callable[[Any], Any]
TypeKey = tuple[type, str]

#: Value types worth converting once per batch when rows share the object.
_SHARED_TYPES = (datetime, dict, list)


@dataclass(frozen=True, slots=True)
class DriverPlan:
    """A statement compiled for one dialect, with how to turn a row into driver parameters.

    ``values`` picks the row's values in bind order; ``conversions`` lists (position, bind
    processor, key of the bind's type) for the binds whose type converts the value. Types with
    equal keys convert a value the same way, so a shared value object is converted once.
    """

    sql: str
    values: Callable[[Row], tuple[Any, ...]]
    conversions: tuple[tuple[int, Processor, TypeKey], ...]


_PLANS: weakref.WeakKeyDictionary[
    Dialect, dict[tuple[UpdateBase, tuple[str, ...]], DriverPlan | None]
]
_PLANS = weakref.WeakKeyDictionary()


def driver_plan(dialect: Dialect, dml: UpdateBase, keys: tuple[str, ...]) -> DriverPlan | None:
    """The driver-level plan for rows with ``keys`` of a statement built once (cached per
    statement object), or None to let SQLAlchemy execute the statement (other dialects, or a
    statement the plan cannot express)."""
    plans = _PLANS.get(dialect)
    if plans is None:
        plans = _PLANS[dialect] = {}
    try:
        return plans[dml, keys]
    except KeyError:
        pass
    plan = None
    if dialect.name == "sqlite":
        compiled = dml.compile(dialect=dialect, column_keys=list(keys), for_executemany=True)
        names = compiled.positiontup
        if (
            compiled.positional
            and names
            and not compiled.escaped_bind_names
            and not compiled.effective_returning
            and set(names) <= set(keys)
        ):
            conversions = []
            for position, name in enumerate(names):
                type_ = compiled.binds[name].type
                processor = type_.dialect_impl(dialect).bind_processor(dialect)
                if processor is not None:
                    conversions.append((position, processor, (type(type_), repr(type_))))
            pick = itemgetter(*names)
            values = pick if len(names) > 1 else lambda row: (pick(row),)
            plan = DriverPlan(compiled.string, values, tuple(conversions))
    plans[dml, keys] = plan
    return plan


def driver_parameters(
    plan: DriverPlan, rows: Sequence[Row], converted: dict[tuple[TypeKey, int], Any]
) -> list[tuple[Any, ...]] | None:
    """``rows`` as positional driver parameters, or None when a row lacks a key the plan needs
    or a value fails to convert (SQLAlchemy then executes the rows and reports the error as it
    always does).

    ``converted`` memoises conversions of shared value objects; keep it for one batch only
    (an id names one object only while the batch's rows hold it).
    """
    pick, conversions = plan.values, plan.conversions
    parameters: list[tuple[Any, ...]] = []
    try:
        for row in rows:
            if not conversions:
                parameters.append(pick(row))
                continue
            values = list(pick(row))
            for position, processor, kind in conversions:
                value = values[position]
                if isinstance(value, _SHARED_TYPES):
                    memo = (kind, id(value))
                    try:
                        values[position] = converted[memo]
                    except KeyError:
                        values[position] = converted[memo] = processor(value)
                else:
                    values[position] = processor(value)
            parameters.append(tuple(values))
    except Exception:
        return None
    return parameters


async def _roll_up(
    connection: AsyncConnection, op: Op, rows: list[Row], delta: rollups.Delta
) -> None:
    """Record in ``delta`` what applying ``rows`` of ``op`` changes in the rollups (called
    before they are applied: a close or a session update reads the row it replaces)."""
    if op is Op.CONNECTION_OPEN:
        for row in rows:
            facts: dict[str, Any] = {
                name: row.get(name) for name in rollups.ConnectionFacts._fields
            }
            delta.connection(rollups.ConnectionFacts(**facts))
    elif op is Op.CONNECTION_CLOSE:
        closes = {row["b_id"]: row for row in rows}  # applied in order: the last one stays
        for connection_id, before in await rollups.stored_facts(connection, list(closes)):
            close = closes[connection_id]
            after = before._replace(disconnected_at=close["b_at"], close_reason=close["b_reason"])
            delta.close(before, after)
    elif op is Op.SESSION:
        stored = await rollups.stored_sessions(connection, [row["session_id"] for row in rows])
        for row in rows:  # merged: one per session
            created_at, state = stored.get(row["session_id"], (row["created_at"], None))
            if state is not None:
                delta.session(created_at, state, -1)
            delta.session(created_at, str(row["state"]))


async def apply(connection: AsyncConnection, batch: Sequence[tuple[Op, Row]]) -> None:
    """Apply ``batch`` inside the caller's transaction, one executemany per kind, and add what
    it changes to the rollups."""
    buckets: dict[Op, list[Row]] = defaultdict(list)
    for op, row in batch:
        buckets[op].append(row)
    dialect = connection.dialect
    converted: dict[tuple[TypeKey, int], Any] = {}
    delta = rollups.Delta()
    for op in ORDER:
        rows = buckets.get(op)
        if not rows:
            continue
        rows = _MERGE[op](rows)
        await _roll_up(connection, op, rows, delta)
        await _execute(connection, statement(op, dialect.name), rows, converted)
    for rollup, rollup_rows in delta.statements(dialect.name):
        await _execute(connection, rollup, rollup_rows, converted)


async def _execute(
    connection: AsyncConnection,
    dml: UpdateBase,
    rows: Sequence[Row],
    converted: dict[tuple[TypeKey, int], Any],
) -> None:
    """Execute ``dml`` once per row: at the driver level where a plan can, else through
    SQLAlchemy."""
    plan = driver_plan(connection.dialect, dml, tuple(rows[0]))
    parameters = None if plan is None else driver_parameters(plan, rows, converted)
    if plan is None or parameters is None:
        await connection.execute(dml, rows)
    else:
        await connection.exec_driver_sql(plan.sql, parameters)
