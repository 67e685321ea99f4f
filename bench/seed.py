"""Databases for the benchmark, built fast with raw ``sqlite3``.

The schema always comes from the registry itself (start and close a :class:`Registry` once on
the file), so the rows written here land in exactly the tables, columns and indexes the
registry uses. Values are stored the way SQLAlchemy stores them on SQLite: timestamps as
``YYYY-MM-DD HH:MM:SS.ffffff`` UTC text, JSON documents as ``json.dumps`` text.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from registry import Registry

T = TypeVar("T")

SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def stamp(at: datetime) -> str:
    """A timestamp as SQLAlchemy writes it on SQLite (UTC, naive text, microseconds)."""
    return at.astimezone(UTC).strftime(SQLITE_TIME)


async def create_schema(path: Path) -> None:
    """Create the registry's schema in a new SQLite file (start and close a registry once)."""
    registry = Registry(sqlite_url(path), node_name="bench-schema")
    await registry.start()
    await registry.close()


def connect_raw(path: Path) -> sqlite3.Connection:
    """A plain ``sqlite3`` connection set up like the registry's (WAL, synchronous=NORMAL,
    foreign keys on), in autocommit mode so transactions are explicit."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.execute("PRAGMA foreign_keys = ON")
    return connection


@dataclass(frozen=True, slots=True)
class RecoveryShape:
    """What the start-up recovery database holds."""

    clients: int = 10_000
    closed_connections: int = 1_000_000
    open_connections: int = 10_000
    history_nodes: int = 100
    audit_rows: int = 100_000
    interrupted_sessions: int = 1_000  # active sessions of the crashed run, two open links each
    device_snapshots: int = 1_000

    def describe(self) -> str:
        return (
            f"{self.closed_connections:,} closed + {self.open_connections:,} open connection rows"
            f" ({self.clients:,} clients, {self.history_nodes} stopped runs + 1 crashed run),"
            f" {self.audit_rows:,} audit rows, {self.interrupted_sessions:,} active sessions"
            f" with {2 * self.interrupted_sessions:,} open links,"
            f" {self.device_snapshots:,} device info snapshots"
        )


def batched(rows: Iterable[T], size: int = 50_000) -> Iterator[list[T]]:
    """``rows`` in lists of ``size`` (the last one shorter), for ``executemany`` and ``COPY``."""
    batch: list[T] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_recovery_database(path: Path, shape: RecoveryShape) -> str:
    """Fill a schema-only file with history and one crashed run; returns the crashed node id.

    The crashed run has ``stopped_at`` NULL and leaves ``shape.open_connections`` connections
    open and ``shape.interrupted_sessions`` sessions active, as after a SIGKILL.
    """
    now = datetime.now(UTC)
    start = now - timedelta(days=30)
    crashed = str(uuid.uuid4())
    history = [str(uuid.uuid4()) for _ in range(shape.history_nodes)]
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -1000000")
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO nodes (node_id, name, hostname, pid, started_at, heartbeat_at,"
            " stopped_at, stop_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    node,
                    "bench",
                    "bench",
                    1000 + i,
                    stamp(start),
                    stamp(start),
                    stamp(start),
                    "shutdown",
                )
                for i, node in enumerate(history)
            ]
            + [
                (
                    crashed,
                    "bench",
                    "bench",
                    999,
                    stamp(now),
                    stamp(now - timedelta(seconds=3)),
                    None,
                    None,
                )
            ],
        )
        client_ids = [f"client-{i:06d}" for i in range(shape.clients)]
        kinds = ["constellation" if i % 1000 == 0 else "device" for i in range(shape.clients)]
        db.executemany(
            "INSERT INTO clients (client_id, client_type, platform, first_seen, last_seen,"
            " metadata) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (cid, kind, "windows", stamp(start), stamp(now), '{"site": "bench"}')
                for cid, kind in zip(client_ids, kinds, strict=True)
            ],
        )
        step = (now - start - timedelta(hours=1)) / max(1, shape.closed_connections)
        per_client = max(1, shape.closed_connections // shape.clients)

        def closed() -> Iterator[tuple[object, ...]]:
            for n in range(shape.closed_connections):
                i = n // per_client % shape.clients
                opened = start + step * n
                yield (
                    str(uuid.uuid4()),
                    client_ids[i],
                    history[n * len(history) // shape.closed_connections],
                    kinds[i],
                    "windows",
                    '{"site": "bench"}',
                    "10.0.0.1",
                    stamp(opened),
                    stamp(opened + timedelta(seconds=55)),
                    1000,
                    "removed",
                )

        def still_open() -> Iterator[tuple[object, ...]]:
            for n in range(shape.open_connections):
                i = n % shape.clients
                yield (
                    str(uuid.uuid4()),
                    client_ids[i],
                    crashed,
                    kinds[i],
                    "windows",
                    '{"site": "bench"}',
                    "10.0.0.1",
                    stamp(now - timedelta(minutes=30)),
                    None,
                    None,
                    None,
                )

        insert_connection = (
            "INSERT INTO connections (connection_id, client_id, node_id, client_type, platform,"
            " metadata, remote_address, connected_at, disconnected_at, close_code, close_reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        for batch in batched(closed()):
            db.executemany(insert_connection, batch)
        for batch in batched(still_open()):
            db.executemany(insert_connection, batch)

        def audit() -> Iterator[tuple[object, ...]]:
            for n in range(shape.audit_rows):
                i = n % shape.clients
                yield (
                    stamp(start + step * n),
                    history[n * len(history) // max(1, shape.audit_rows)],
                    "client_registered" if n % 2 == 0 else "client_removed",
                    client_ids[i],
                    None,
                    '{"reason": "removed"}',
                )

        for batch in batched(audit()):
            db.executemany(
                "INSERT INTO audit_events (at, node_id, kind, client_id, session_id, details)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                batch,
            )
        devices = [cid for cid, kind in zip(client_ids, kinds, strict=True) if kind == "device"]
        owners = [cid for cid, kind in zip(client_ids, kinds, strict=True) if kind != "device"]
        sessions = []
        links = []
        for n in range(shape.interrupted_sessions):
            session_id = f"session-{n:06d}"
            owner, executor = owners[n % len(owners)], devices[n % len(devices)]
            created = stamp(now - timedelta(minutes=10))
            sessions.append((session_id, owner, executor, "bench", "active", crashed, created))
            links.append((str(uuid.uuid4()), session_id, owner, "constellation", created))
            links.append((str(uuid.uuid4()), session_id, executor, "device", created))
        db.executemany(
            "INSERT INTO sessions (session_id, owner_id, executor_id, task_name, state, node_id,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            sessions,
        )
        db.executemany(
            "INSERT INTO session_links (link_id, session_id, client_id, role, bound_at)"
            " VALUES (?, ?, ?, ?, ?)",
            links,
        )
        db.executemany(
            "INSERT INTO device_info_snapshots (device_id, captured_at, digest, info)"
            " VALUES (?, ?, ?, ?)",
            [
                (devices[n % len(devices)], stamp(now), f"{n:064x}", '{"os": "Windows"}')
                for n in range(shape.device_snapshots)
            ],
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return crashed
