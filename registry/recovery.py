"""Start-up recovery: close what earlier, vanished server runs left open, and load this node's
memory back from the store.

A run is *gone* when it has no ``stopped_at`` and either shares this run's node name (it was
this server before a crash), the database is SQLite (one registry at a time: the caller holds
the file's lock, so no other run of it is alive), or its heartbeat expired.
Its open connections are closed at its last heartbeat (the best known time; one opened after
that beat closes at its own start) with reason ``server_restart`` (same name or SQLite) or
``node_lost`` (another node), its active sessions become ``interrupted``, and each step is
audited. The rollups follow in the same transaction (:mod:`registry.store.rollups`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Insert,
    and_,
    case,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from registry import closes
from registry.audit import AuditKind
from registry.store import models, rollups
from registry.store.dialect import json_object
from registry.types import LinkRole, SessionInfo, SessionState
from registry.validation import canonical_json


@dataclass(slots=True)
class RecoveredState:
    """What recovery read back, to load into memory: the interrupted sessions, their open links
    (session id, role, client id, link id) and each device's latest info (document, digest)."""

    sessions: dict[str, SessionInfo] = field(default_factory=dict)
    links: list[tuple[str, LinkRole, str, str]] = field(default_factory=list)
    device_info: dict[str, tuple[str, str]] = field(default_factory=dict)


def _audit_each(
    now: datetime,
    node_id: str,
    kind: AuditKind,
    client_id: ColumnElement[Any],
    session_id: ColumnElement[Any],
    details: ColumnElement[Any],
    where: ColumnElement[bool],
) -> Insert:
    """One audit event per row matching ``where``, written by the database in one statement."""
    return insert(models.audit_events).from_select(
        ["at", "node_id", "kind", "client_id", "session_id", "details"],
        select(
            literal(now, models.UTCDateTime()),
            literal(node_id),
            literal(kind.value),
            client_id,
            session_id,
            details,
        ).where(where),
    )


async def close_gone_runs(
    connection: AsyncConnection,
    *,
    node_id: str,
    node_name: str,
    now: datetime,
    node_timeout: timedelta,
    single_node: bool,
) -> tuple[int, int, list[str]]:
    """Close the connections and interrupt the sessions of every gone run.

    Returns (connections closed, sessions interrupted, node ids recovered): start-up records
    them in its ``node_recovered`` audit event; the rollup tests check them.
    """
    n, c, s = models.nodes.c, models.connections.c, models.sessions.c
    gone_rule = [n.stopped_at.is_(None), n.node_id != node_id]
    if not single_node:
        gone_rule.append(or_(n.name == node_name, n.heartbeat_at < now - node_timeout))
    gone = (
        await connection.execute(select(n.node_id, n.name, n.heartbeat_at).where(*gone_rule))
    ).all()
    dialect = connection.dialect.name
    closed = interrupted = 0
    delta = rollups.Delta()
    for gone_id, gone_name, last_beat in gone:
        same_node = single_node or gone_name == node_name
        reason = (closes.SERVER_RESTART if same_node else closes.NODE_LOST).reason
        open_rows = and_(c.node_id == gone_id, c.disconnected_at.is_(None))
        await connection.execute(
            _audit_each(
                now,
                node_id,
                AuditKind.CONNECTION_RECOVERED,
                c.client_id,
                null(),
                json_object(
                    dialect,
                    connection_id=c.connection_id,
                    reason=literal(reason),
                    node_id=literal(gone_id),
                ),
                open_rows,
            )
        )
        # The best known time is the last heartbeat, but a connection opened after it
        # closes at its own start: never before it was opened.
        for row in await connection.execute(select(*rollups.connection_facts()).where(open_rows)):
            before = rollups.ConnectionFacts(*row)
            ended = max(before.connected_at, last_beat)
            delta.close(before, before._replace(disconnected_at=ended, close_reason=reason))
        last_known = literal(last_beat, models.UTCDateTime())
        result = await connection.execute(
            update(models.connections)
            .where(open_rows)
            .values(
                disconnected_at=case(
                    (c.connected_at > last_known, c.connected_at), else_=last_known
                ),
                close_reason=reason,
            )
        )
        closed += result.rowcount
        active = and_(s.state == str(SessionState.ACTIVE), s.node_id == gone_id)
        for (created_at,) in await connection.execute(select(s.created_at).where(active)):
            delta.session(created_at, str(SessionState.ACTIVE), -1)
            delta.session(created_at, str(SessionState.INTERRUPTED))
        await connection.execute(
            _audit_each(
                now,
                node_id,
                AuditKind.SESSION_INTERRUPTED,
                s.owner_id,
                s.session_id,
                json_object(dialect, reason=literal(reason), node_id=literal(gone_id)),
                active,
            )
        )
        result = await connection.execute(
            update(models.sessions)
            .where(active)
            .values(state=str(SessionState.INTERRUPTED), end_reason=reason)
        )
        interrupted += result.rowcount
        await connection.execute(
            update(models.nodes)
            .where(n.node_id == gone_id)
            .values(stopped_at=last_beat, stop_reason=reason)
        )
    await rollups.apply(connection, delta)
    if gone:
        await connection.execute(
            insert(models.audit_events).values(
                at=now,
                node_id=node_id,
                kind=str(AuditKind.NODE_RECOVERED),
                details={
                    "nodes": [row[0] for row in gone],
                    "closed_connections": closed,
                    "interrupted_sessions": interrupted,
                },
            )
        )
    return closed, interrupted, [row[0] for row in gone]


async def load_state(connection: AsyncConnection) -> RecoveredState:
    """Read back the interrupted sessions with their open links and the latest device info."""
    state = RecoveredState()
    s, link = models.sessions.c, models.session_links.c
    rows = await connection.execute(
        select(
            s.session_id,
            s.owner_id,
            s.executor_id,
            s.task_name,
            s.state,
            s.created_at,
            s.end_reason,
            link.role,
            link.client_id,
            link.link_id,
        )
        .join(models.session_links, link.session_id == s.session_id)
        .where(link.unbound_at.is_(None), s.state == str(SessionState.INTERRUPTED))
    )
    for row in rows:
        if row.session_id not in state.sessions:
            state.sessions[row.session_id] = SessionInfo(
                session_id=row.session_id,
                owner_id=row.owner_id,
                executor_id=row.executor_id,
                task_name=row.task_name,
                state=SessionState(row.state),
                created_at=row.created_at,
                end_reason=row.end_reason,
            )
        state.links.append((row.session_id, LinkRole(row.role), row.client_id, row.link_id))
    d = models.device_info_snapshots.c
    latest = select(func.max(d.snapshot_id).label("snapshot_id")).group_by(d.device_id).subquery()
    for device_id, info, digest in await connection.execute(
        select(d.device_id, d.info, d.digest).join(latest, latest.c.snapshot_id == d.snapshot_id)
    ):
        state.device_info[device_id] = (canonical_json(info, "device_info"), digest)
    return state
