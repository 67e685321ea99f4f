"""How journalled operations become SQL: one statement per kind of operation and batch.

Operations of different kinds commute by construction (connection and link rows have ids that
are never reused, client and session rows are written as whole-row upserts), so a batch is
applied kind by kind, each as a single executemany, in :data:`ORDER`.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from sqlalchemy import Executable, bindparam, func, insert, update
from sqlalchemy.ext.asyncio import AsyncConnection

from registry.store import models
from registry.store.dialect import upsert

Row = dict[str, Any]


class Op(enum.Enum):
    """A kind of row operation carried by the journal."""

    CLIENT = "client"  # whole-row upsert of clients (first_seen kept from the first insert)
    CONNECTION_OPEN = "connection_open"  # insert into connections
    CONNECTION_CLOSE = "connection_close"  # b_id, b_at, b_code, b_reason
    SESSION = "session"  # whole-row upsert of sessions (owner/executor/created_at kept)
    LINK_OPEN = "link_open"  # insert into session_links
    LINK_CLOSE = "link_close"  # b_id, b_at
    DEVICE_INFO = "device_info"  # insert into device_info_snapshots
    AUDIT = "audit"  # insert into audit_events
    NODE_BEAT = "node_beat"  # b_id, b_at


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


def _last_by(key: str) -> Callable[[list[Row]], list[Row]]:
    def merge(rows: list[Row]) -> list[Row]:
        return list({row[key]: row for row in rows}.values())

    return merge


def _keep(rows: list[Row]) -> list[Row]:
    return rows


# Upserts touch a row at most once per statement (PostgreSQL refuses a second touch).
_MERGE: dict[Op, Callable[[list[Row]], list[Row]]] = defaultdict(
    lambda: _keep,
    {Op.CLIENT: _merge_clients, Op.SESSION: _last_by("session_id"), Op.NODE_BEAT: _last_by("b_id")},
)


@cache
def statement(op: Op, dialect_name: str) -> Executable:
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


async def apply(connection: AsyncConnection, batch: Sequence[tuple[Op, Row]]) -> None:
    """Apply ``batch`` inside the caller's transaction, one executemany per kind."""
    buckets: dict[Op, list[Row]] = defaultdict(list)
    for op, row in batch:
        buckets[op].append(row)
    dialect_name = connection.dialect.name
    for op in ORDER:
        rows = buckets.get(op)
        if rows:
            await connection.execute(statement(op, dialect_name), _MERGE[op](rows))
