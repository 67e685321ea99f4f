"""Explicit retention: delete history and audit older than a cutoff, in bounded batches.

Never touches an open connection, an active or interrupted session (nor its links), the latest
info snapshot of any device, or a node row that connections still name. Each run is itself
recorded in the audit trail. Deleted connections and sessions leave the rollups in the same
transaction, so statistics keep answering for the rows that remain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, delete, exists, func, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from registry.audit import AuditKind
from registry.errors import InvalidArgumentError, store_errors
from registry.store import models, rollups
from registry.types import SessionState

DEFAULT_BATCH = 5000
Progress = Callable[[str, int], None]

_LIVE_STATES = (SessionState.ACTIVE.value, SessionState.INTERRUPTED.value)


@dataclass(frozen=True, slots=True)
class PruneReport:
    """Rows deleted (or, for a dry run, that would be) per table."""

    cutoff: datetime
    dry_run: bool
    connections: int = 0
    sessions: int = 0
    session_links: int = 0
    device_info_snapshots: int = 0
    audit_events: int = 0
    nodes: int = 0

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, int) and k != "dry_run"}


def _targets(cutoff: datetime) -> list[tuple[str, Table, ColumnElement[bool]]]:
    """(name, table, which rows) in deletion order: links before their sessions, connections
    before the nodes they name."""
    c, s, link = models.connections.c, models.sessions.c, models.session_links.c
    d, a, n = models.device_info_snapshots.c, models.audit_events.c, models.nodes.c
    old_session = (s.ended_at < cutoff) & s.state.not_in(_LIVE_STATES)
    latest = select(func.max(d.snapshot_id)).group_by(d.device_id)
    return [
        ("connections", models.connections, c.disconnected_at < cutoff),
        (
            "session_links",
            models.session_links,
            link.session_id.in_(select(s.session_id).where(old_session)),
        ),
        ("sessions", models.sessions, old_session),
        (
            "device_info_snapshots",
            models.device_info_snapshots,
            (d.captured_at < cutoff) & d.snapshot_id.not_in(latest),
        ),
        ("audit_events", models.audit_events, a.at < cutoff),
        (
            # No connection named by the node survives this run (judged on the connections
            # rather than on what is left of them, so a dry run counts the same nodes).
            "nodes",
            models.nodes,
            (n.stopped_at < cutoff)
            & ~exists().where(
                c.node_id == n.node_id,
                or_(c.disconnected_at.is_(None), c.disconnected_at >= cutoff),
            ),
        ),
    ]


async def prune(
    engine: AsyncEngine,
    cutoff: datetime,
    *,
    dry_run: bool = False,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> PruneReport:
    """Delete (or count, with ``dry_run``) history older than ``cutoff``, ``batch_size`` rows
    per transaction; ``progress(table, rows_so_far)`` is called after each batch."""
    if cutoff.tzinfo is None:
        raise InvalidArgumentError("cutoff", "must be a timezone-aware datetime")
    if batch_size < 1:
        raise InvalidArgumentError("batch_size", "must be at least 1")
    counts: dict[str, int] = {}
    with store_errors("prune failed"):
        for name, table, condition in _targets(cutoff):
            counts[name] = await _prune_table(
                engine, name, table, condition, dry_run, batch_size, progress
            )
        report = PruneReport(cutoff=cutoff, dry_run=dry_run, **counts)
        if not dry_run:
            async with engine.begin() as connection:
                await connection.execute(
                    insert(models.audit_events).values(
                        at=datetime.now(UTC),
                        kind=AuditKind.PRUNED.value,
                        details={"cutoff": cutoff.isoformat(), **report.counts()},
                    )
                )
    return report


async def _forget(connection: AsyncConnection, table: Table, keys: list[str]) -> set[str]:
    """Take the rows about to be deleted out of the rollups (same transaction), so that
    statistics answer for the rows that remain; rollup rows left empty are deleted too.
    Returns the clients whose connections go (their activity is recounted after)."""
    delta = rollups.Delta()
    clients: set[str] = set()
    if table is models.connections:
        c = models.connections.c
        found = await connection.execute(
            select(*rollups.connection_facts()).where(c.connection_id.in_(keys))
        )
        for row in found:
            facts = rollups.ConnectionFacts(*row)
            delta.connection(facts, -1)
            clients.add(facts.client_id)
    else:
        s = models.sessions.c
        for created_at, state in await connection.execute(
            select(s.created_at, s.state).where(s.session_id.in_(keys))
        ):
            delta.session(created_at, state, -1)
    await rollups.apply(connection, delta, cleanup=True)
    return clients


async def _prune_table(
    engine: AsyncEngine,
    name: str,
    table: Table,
    condition: ColumnElement[bool],
    dry_run: bool,
    batch_size: int,
    progress: Progress | None,
) -> int:
    if dry_run:
        async with engine.connect() as connection:
            count = (
                await connection.execute(select(func.count()).select_from(table).where(condition))
            ).scalar_one()
        if progress is not None:
            progress(name, count)
        return int(count)
    key = next(iter(table.primary_key.columns))
    total = 0
    while True:
        batch: Any = select(key).where(condition).limit(batch_size)
        async with engine.begin() as connection:
            clients: set[str] = set()
            if table is models.connections or table is models.sessions:
                batch = list((await connection.execute(batch)).scalars())  # taken back
                clients = await _forget(connection, table, batch)
            else:
                batch = batch.scalar_subquery()
            deleted = (await connection.execute(delete(table).where(key.in_(batch)))).rowcount
            await rollups.recount_activity(connection, clients)
        total += deleted
        if progress is not None:
            progress(name, total)
        if deleted < batch_size:
            return total
