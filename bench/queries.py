"""Query latency of the history API on a store with a million connection rows.

Run from the repository root::

    python -m bench.queries            # 1,000,000 connections; SQLite and PostgreSQL
    python -m bench.queries --quick    # 100,000 connections, fewer calls (a smoke run)
    python -m bench.queries --explain  # also the plan and time of every SQL statement

The goals (from the issues): over 1,000,000 connection rows, the first page of one client's
connection history (limit 100, newest first) returns in under 50 ms; the statistics of
``/api/stats`` (``availability=False``: per-device availability is paged apart) in 10 ms for
a 24-hour window and 25 ms for 7 and 30 days. The statistics read the rollups; the
statistics as computed before them, from the rows (``tests/core/raw_statistics.py``), are
timed in the same run for comparison. Every measure is a real
:class:`~registry.history.History` call through the registry's own engine
(:func:`registry.store.dialect.create_engine`), so it includes the pool checkout, the SQL and
building the records.

The data set is seeded (the same rows on both backends, checked by printing the same 24-hour
statistics for each): 5,000 clients (100 constellations) connecting over 30 days, a skewed
number of connections per client (one "flapping" device with 2% of all rows), durations from
a second to many hours that never overlap within a client, the newest connection of 70% of
the clients still open (one open row per live client, so about 0.4% of the rows), 50,000
sessions with their links, and the audit trail those events write (about 2 million rows), all
inserted in time order as a running registry would.

SQLite is a file in a temporary directory: the schema from the registry's migrations, filled
with raw ``sqlite3`` ``executemany`` (times in the text format of :func:`bench.seed.stamp`),
then the rollups built from the rows by :func:`registry.store.rollups.rebuild` (the
migration's backfill). It is not ``ANALYZE``d, because the registry never does that
(``--sqlite-analyze`` measures a file that was: the planner then picks other plans).
PostgreSQL is a throwaway database ``registry_bench_<pid>`` on ``--postgres-url`` (default
``$REGISTRY_TEST_POSTGRES_URL`` or the local ``test`` server), migrated with
:func:`registry.store.schema.ensure_schema`, loaded with ``COPY``, its rollups rebuilt,
``VACUUM ANALYZE``d (as autovacuum would) and dropped at the end; without a reachable server
it is skipped, with the reason in the notes. Progress goes to stderr, the markdown table to
stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from bench import seed
from bench.report import ms, percentile, progress_printer, table, yes_no
from registry.history import History
from registry.store import rollups
from registry.store.dialect import create_engine
from registry.store.schema import ensure_schema
from tests.core.raw_statistics import raw_statistics

GOAL_SECONDS = 0.050
DEFAULT_POSTGRES_URL = os.environ.get(
    "REGISTRY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
EPOCH = datetime(1970, 1, 1)
EPOCH_UTC = EPOCH.replace(tzinfo=UTC)
DAY_US = 86_400 * 1_000_000
PLATFORMS = ("windows", "Windows", "linux", "macos", "android")
PLATFORM_WEIGHTS = (45, 5, 30, 12, 8)
CLOSE_REASONS = ("removed", "replaced", "server_shutdown", "server_restart", "idle_timeout")
CLOSE_REASON_WEIGHTS = (80, 5, 5, 2, 8)
CLOSE_CODES = {
    "removed": 1000,
    "replaced": 4000,
    "server_shutdown": 1001,
    "server_restart": None,
    "idle_timeout": 4408,
}
SESSION_STATES = ("completed", "failed", "cancelled", "interrupted")
SESSION_STATE_WEIGHTS = (85, 8, 5, 2)


# -- the data set ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shape:
    """What the benchmark database holds."""

    clients: int = 5_000
    constellation_every: int = 50  # one client in 50 is a constellation (100 of 5,000)
    connections: int = 1_000_000  # rows in ``connections``, open ones included
    days: int = 30
    online_fraction: float = 0.7  # clients whose newest connection is still open
    busiest_share: float = 0.02  # the flapping device's share of all connections
    sessions: int = 50_000
    nodes: int = 4  # server runs over the period; the last one is running now

    def describe(self) -> str:
        return (
            f"{self.connections:,} connections of {self.clients:,} clients"
            f" ({self.clients // self.constellation_every:,} constellations) over"
            f" {self.days} days, {self.sessions:,} sessions with 2 links each,"
            f" {self.nodes} server runs"
        )


@dataclass(frozen=True, slots=True)
class Connection:
    """One generated connection; times are whole microseconds since the epoch (UTC)."""

    opened: int
    closed: int | None
    client: int
    reason: str | None


@dataclass(frozen=True, slots=True)
class Session:
    created: int
    ended: int | None
    owner: int
    executor: int
    state: str


#: ``(at, node index, kind, client id, session id, details)`` of one audit event.
AuditRow = tuple[int, int, str, str, str | None, str]


@dataclass(slots=True)
class Dataset:
    """The rows of one run, generated once from a fixed seed and loaded into each backend."""

    shape: Shape
    now: int
    client_ids: list[str]
    kinds: list[str]
    platforms: list[str]
    node_ids: list[str]
    connections: list[Connection]  # in connected_at order, as a live registry inserts them
    connection_ids: list[str]
    sessions: list[Session]  # in created_at order
    rows_per_client: list[int]
    audit_rows: list[AuditRow] = field(default_factory=list)

    @property
    def start(self) -> int:
        return self.now - self.shape.days * DAY_US

    def node_at(self, at: int) -> int:
        span = (self.now - self.start) // len(self.node_ids) + 1
        return (at - self.start) // span

    def typical_client(self) -> str:
        """The device with the median number of connections."""
        devices = sorted(
            (count, i) for i, count in enumerate(self.rows_per_client) if self.kinds[i] == "device"
        )
        return self.client_ids[devices[len(devices) // 2][1]]

    def busiest_client(self) -> str:
        counts = self.rows_per_client
        return self.client_ids[max(range(len(counts)), key=counts.__getitem__)]

    def busiest_constellation(self) -> str:
        """The client that owned the most sessions."""
        owners = Counter(s.owner for s in self.sessions)
        return self.client_ids[owners.most_common(1)[0][0]] if owners else ""

    def count_of(self, client_id: str) -> int:
        return self.rows_per_client[self.client_ids.index(client_id)]

    def open_count(self) -> int:
        return sum(1 for c in self.connections if c.closed is None)

    def audit(self) -> list[AuditRow]:
        """The audit trail these rows would have written, in event order (built once)."""
        if not self.audit_rows:
            self.audit_rows = self._audit()
        return self.audit_rows

    def _audit(self) -> list[AuditRow]:
        events: list[tuple[int, int, int]] = []  # (at, source, index)
        for i, c in enumerate(self.connections):
            events.append((c.opened, 0, i))
            if c.closed is not None:
                events.append((c.closed, 1, i))
        for i, s in enumerate(self.sessions):
            events.append((s.created, 2, i))
            if s.ended is not None:
                events.append((s.ended, 3, i))
        events.sort()
        rows: list[AuditRow] = []
        for at, source, index in events:
            node = self.node_at(at)
            if source < 2:
                c = self.connections[index]
                cid, connection_id = self.client_ids[c.client], self.connection_ids[index]
                if source == 0:
                    details = (
                        f'{{"connection_id": "{connection_id}", "client_type":'
                        f' "{self.kinds[c.client]}", "platform": "{self.platforms[c.client]}",'
                        ' "remote_address": "10.0.0.1"}'
                    )
                    rows.append((at, node, "client_registered", cid, None, details))
                else:
                    code = json.dumps(CLOSE_CODES[c.reason or ""])
                    details = (
                        f'{{"connection_id": "{connection_id}", "code": {code},'
                        f' "reason": "{c.reason}", "seconds": {(at - c.opened) / 1e6}}}'
                    )
                    rows.append((at, node, "client_removed", cid, None, details))
            else:
                s = self.sessions[index]
                sid, owner = session_id(index), self.client_ids[s.owner]
                if source == 2:
                    details = f'{{"executor_id": "{self.client_ids[s.executor]}"}}'
                    rows.append((at, node, "session_opened", owner, sid, details))
                else:
                    details = f'{{"state": "{s.state}", "reason": null}}'
                    rows.append((at, node, "session_ended", owner, sid, details))
        return rows


def session_id(index: int) -> str:
    return f"session-{index:07d}"


def generate(shape: Shape, now: int, rng: random.Random) -> Dataset:
    """A seeded, realistic data set (see the module docstring)."""
    start = now - shape.days * DAY_US
    span = now - start
    client_ids = [f"client-{i:05d}" for i in range(shape.clients)]
    kinds = [
        "constellation" if i % shape.constellation_every == 0 else "device"
        for i in range(shape.clients)
    ]
    platforms = rng.choices(PLATFORMS, PLATFORM_WEIGHTS, k=shape.clients)
    # Connections per client: log-normal spread, plus one flapping device far above the rest.
    weights = [rng.lognormvariate(0.0, 0.8) for _ in range(shape.clients)]
    busiest = 1  # client-00001, a device
    rest = shape.connections * (1 - shape.busiest_share)
    total = sum(w for i, w in enumerate(weights) if i != busiest)
    counts = [max(1, round(w / total * rest)) for w in weights]
    counts[busiest] = 0
    counts[busiest] = shape.connections - sum(counts)
    connections: list[Connection] = []
    median_duration = math.log(1200e6)  # 20 minutes, in µs
    for client, count in enumerate(counts):
        times = sorted(start + int(rng.random() * span) for _ in range(count))
        online = rng.random() < shape.online_fraction
        for n, opened in enumerate(times):
            last = n == count - 1
            if last and online:
                connections.append(Connection(opened, None, client, None))
                continue
            gap = (now if last else times[n + 1]) - opened
            # From a second to many hours, and never past the client's next connection.
            duration = min(max(1_000_000, int(rng.lognormvariate(median_duration, 1.6))), gap)
            reason = rng.choices(CLOSE_REASONS, CLOSE_REASON_WEIGHTS)[0]
            connections.append(Connection(opened, opened + duration * 95 // 100, client, reason))
    connections.sort(key=lambda c: c.opened)
    connection_ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in connections]
    devices = [i for i, kind in enumerate(kinds) if kind == "device"]
    owners = [i for i, kind in enumerate(kinds) if kind == "constellation"] or devices
    sessions: list[Session] = []
    median_session = math.log(120e6)
    for created in sorted(start + int(rng.random() * span) for _ in range(shape.sessions)):
        owner, executor = rng.choice(owners), rng.choice(devices)
        ended = created + int(rng.lognormvariate(median_session, 1.0))
        if ended >= now:
            sessions.append(Session(created, None, owner, executor, "active"))
        else:
            state = rng.choices(SESSION_STATES, SESSION_STATE_WEIGHTS)[0]
            sessions.append(Session(created, ended, owner, executor, state))
    node_ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(shape.nodes)]
    return Dataset(
        shape=shape,
        now=now,
        client_ids=client_ids,
        kinds=kinds,
        platforms=platforms,
        node_ids=node_ids,
        connections=connections,
        connection_ids=connection_ids,
        sessions=sessions,
        rows_per_client=counts,
    )


# -- loading ---------------------------------------------------------------------------------


def moment(us: int) -> datetime:
    """Microseconds since the epoch as an aware UTC datetime (exact, no float rounding)."""
    return EPOCH_UTC + timedelta(microseconds=us)


_DAYS: dict[int, str] = {}


def sqlite_text(us: int | None) -> str | None:
    """Microseconds since the epoch as SQLAlchemy stores a timestamp on SQLite, the format of
    :func:`bench.seed.stamp` (``YYYY-MM-DD HH:MM:SS.ffffff``), with the date part cached."""
    if us is None:
        return None
    day, rest = divmod(us, DAY_US)
    date = _DAYS.get(day)
    if date is None:
        date = _DAYS[day] = (EPOCH + timedelta(days=day)).strftime("%Y-%m-%d")
    seconds, fraction = divmod(rest, 1_000_000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"{date} {hour:02d}:{minute:02d}:{second:02d}.{fraction:06d}"


class Rows:
    """Every table's rows as tuples in column order, with times converted by ``when``."""

    def __init__(self, data: Dataset, when: Callable[[int | None], Any]) -> None:
        self.data, self.when = data, when

    def nodes(self) -> list[tuple[Any, ...]]:
        data, when = self.data, self.when
        span = (data.now - data.start) // len(data.node_ids) + 1
        rows = []
        for i, node in enumerate(data.node_ids):
            began = data.start + i * span
            running = i == len(data.node_ids) - 1
            ended = None if running else began + span - 1
            rows.append(
                (
                    node,
                    "registry",
                    "bench-host",
                    1000 + i,
                    when(began),
                    when(data.now if running else ended),
                    when(ended),
                    None if running else "shutdown",
                )
            )
        return rows

    def clients(self) -> list[tuple[Any, ...]]:
        data, when = self.data, self.when
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for c in data.connections:
            first.setdefault(c.client, c.opened)
            last[c.client] = max(last.get(c.client, 0), c.closed or data.now)
        return [
            (
                cid,
                data.kinds[i],
                data.platforms[i],
                when(first[i]),
                when(last[i]),
                f'{{"site": "site-{i % 40}", "rack": {i % 7}}}',
            )
            for i, cid in enumerate(data.client_ids)
        ]

    def connections(self) -> Iterator[tuple[Any, ...]]:
        data, when = self.data, self.when
        for c, connection_id in zip(data.connections, data.connection_ids, strict=True):
            yield (
                connection_id,
                data.client_ids[c.client],
                data.node_ids[data.node_at(c.opened)],
                data.kinds[c.client],
                data.platforms[c.client],
                f'{{"site": "site-{c.client % 40}", "rack": {c.client % 7}}}',
                f"10.{c.client // 250 % 256}.{c.client % 250}.{c.opened % 250 + 1}",
                when(c.opened),
                when(c.closed),
                None if c.reason is None else CLOSE_CODES[c.reason],
                c.reason,
            )

    def sessions(self) -> list[tuple[Any, ...]]:
        data, when = self.data, self.when
        return [
            (
                session_id(i),
                data.client_ids[s.owner],
                data.client_ids[s.executor],
                f"task-{i % 97}",
                s.state,
                data.node_ids[data.node_at(s.created)],
                when(s.created),
                when(s.ended),
                None if s.state in ("active", "completed") else s.state,
            )
            for i, s in enumerate(data.sessions)
        ]

    def links(self) -> list[tuple[Any, ...]]:
        data, when = self.data, self.when
        rows = []
        for i, s in enumerate(data.sessions):
            for n, (client, role) in enumerate(
                ((s.owner, "constellation"), (s.executor, "device"))
            ):
                link = str(uuid.UUID(int=(i << 1) | n, version=4))
                rows.append(
                    (
                        link,
                        session_id(i),
                        data.client_ids[client],
                        role,
                        when(s.created),
                        when(s.ended),
                    )
                )
        return rows

    def audit(self) -> Iterator[tuple[Any, ...]]:
        data, when = self.data, self.when
        for at, node, kind, cid, sid, details in data.audit():
            yield when(at), data.node_ids[node], kind, cid, sid, details


COLUMNS = {
    "nodes": (
        "node_id",
        "name",
        "hostname",
        "pid",
        "started_at",
        "heartbeat_at",
        "stopped_at",
        "stop_reason",
    ),
    "clients": ("client_id", "client_type", "platform", "first_seen", "last_seen", "metadata"),
    "connections": (
        "connection_id",
        "client_id",
        "node_id",
        "client_type",
        "platform",
        "metadata",
        "remote_address",
        "connected_at",
        "disconnected_at",
        "close_code",
        "close_reason",
    ),
    "sessions": (
        "session_id",
        "owner_id",
        "executor_id",
        "task_name",
        "state",
        "node_id",
        "created_at",
        "ended_at",
        "end_reason",
    ),
    "session_links": ("link_id", "session_id", "client_id", "role", "bound_at", "unbound_at"),
    "audit_events": ("at", "node_id", "kind", "client_id", "session_id", "details"),
}


def table_rows(rows: Rows) -> list[tuple[str, Iterator[tuple[Any, ...]] | list[tuple[Any, ...]]]]:
    """Each table with its rows, parents first (foreign keys)."""
    return [
        ("nodes", rows.nodes()),
        ("clients", rows.clients()),
        ("connections", rows.connections()),
        ("sessions", rows.sessions()),
        ("session_links", rows.links()),
        ("audit_events", rows.audit()),
    ]


async def migrate(url: str | URL) -> None:
    engine = create_engine(url)
    try:
        await ensure_schema(engine, auto_migrate=True)
    finally:
        await engine.dispose()


async def build_rollups(url: str | URL) -> float:
    """Build the rollups from the loaded rows, as the migration that adds them does; returns
    the seconds it took."""
    began = time.perf_counter()
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(rollups.rebuild)
    finally:
        await engine.dispose()
    return time.perf_counter() - began


async def load_sqlite(path: Path, data: Dataset, *, analyze: bool) -> float:
    """Create the schema with the registry's migrations, then fill it with raw ``sqlite3``.

    The secondary indexes are dropped for the load and created again from their own SQL
    (building an index once is much faster than a million random inserts into it).
    ``ANALYZE`` only with ``analyze``: the registry never runs it, so by default the planner
    sees what it sees in production, no statistics.
    """
    await migrate(seed.sqlite_url(path))
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # No journal while loading (one write of each page); WAL again for the registry.
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -1000000")
        indexes = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        ).fetchall()
        db.execute("BEGIN")
        for name, _sql in indexes:
            db.execute(f'DROP INDEX "{name}"')
        for table, rows in table_rows(Rows(data, sqlite_text)):
            columns = COLUMNS[table]
            statement = (
                f"INSERT INTO {table} ({', '.join(columns)})"
                f" VALUES ({', '.join('?' for _ in columns)})"
            )
            for batch in seed.batched(rows):
                db.executemany(statement, batch)
        for _name, sql in indexes:
            db.execute(sql)
        db.execute("COMMIT")
        db.execute("PRAGMA journal_mode = WAL")
    finally:
        db.close()
    rollups_seconds = await build_rollups(seed.sqlite_url(path))
    if analyze:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("ANALYZE")
        finally:
            db.close()
    return rollups_seconds


def asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


SECONDARY_INDEXES = """
SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
WHERE t.relnamespace = 'public'::regnamespace AND NOT i.indisprimary AND NOT i.indisunique
"""


async def load_postgres(url: URL, data: Dataset) -> float:
    """Migrate, ``COPY`` every table with the secondary indexes dropped, create them again
    from their own definitions, then ``VACUUM ANALYZE`` (what autovacuum does on its own)."""
    await migrate(url)
    db = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await db.execute("SET maintenance_work_mem = '256MB'")
        indexes = await db.fetch(SECONDARY_INDEXES)
        async with db.transaction():
            for name, _definition in indexes:
                await db.execute(f"DROP INDEX {name}")
            for table, rows in table_rows(
                Rows(data, lambda us: None if us is None else moment(us))
            ):
                for batch in seed.batched(rows, 100_000):
                    await db.copy_records_to_table(table, records=batch, columns=COLUMNS[table])
            for _name, definition in indexes:
                await db.execute(definition)
        rollups_seconds = await build_rollups(url)
        await db.execute("VACUUM ANALYZE")
    finally:
        await db.close()
    return rollups_seconds


# -- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    quick: bool
    shape: Shape
    warmups: int
    calls: int
    budget: float = 15.0  # seconds of timed calls per query and backend, at least 5 calls

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            shape = Shape(clients=500, connections=100_000, sessions=5_000, constellation_every=50)
            return cls(quick=True, shape=shape, warmups=2, calls=10)
        return cls(quick=False, shape=Shape(), warmups=3, calls=30)


@dataclass(frozen=True, slots=True)
class Measure:
    """One timed history call: ``call`` returns how many items it got back."""

    key: str
    label: str
    goal: float | None  # the issues' goal for this query, in seconds
    call: Callable[[History], Awaitable[int]]


@dataclass(slots=True)
class Timing:
    median: float
    p95: float
    items: int
    calls: int


@dataclass(slots=True)
class Backend:
    name: str
    timings: dict[str, Timing] = field(default_factory=dict)
    facts: list[str] = field(default_factory=list)
    measures: list[Measure] = field(default_factory=list)
    skipped: str | None = None


progress = progress_printer("bench.queries")


async def measures(history: History, data: Dataset, engine: AsyncEngine) -> list[Measure]:
    """The calls to time, with what they need (a page-2 cursor) looked up once beforehand."""
    typical, busiest = data.typical_client(), data.busiest_client()
    constellation = data.busiest_constellation()
    now = moment(data.now)
    first = await history.connections(busiest, limit=100)
    cursor = first.next_cursor

    async def connections(client: str, cursor: str | None = None) -> int:
        return len((await history.connections(client, limit=100, cursor=cursor)).items)

    async def window(days: int) -> int:
        since = now - timedelta(days=days)
        stats = await history.statistics(since=since, until=now, availability=False)
        return stats.connections

    async def from_rows(days: int) -> int:
        async with engine.connect() as connection:
            stats = await raw_statistics(connection, now - timedelta(days=days), now)
        return stats.connections

    async def hourly() -> int:
        return len((await history.hourly(since=now - timedelta(days=1), until=now)).items)

    async def availability(every: bool) -> int:
        since = now - timedelta(days=1)
        if every:
            devices = (await history.statistics(since=since, until=now)).availability
            return len(devices or {})
        return len((await history.availability(since=since, until=now, limit=100)).items)

    async def audit(**filters: Any) -> int:
        return len((await history.audit(limit=100, **filters)).items)

    async def sessions(client: str) -> int:
        return len((await history.sessions(client, limit=100)).items)

    return [
        Measure(
            "typical",
            f"connections of a typical device ({data.count_of(typical):,} rows), page 1",
            GOAL_SECONDS,
            lambda _h: connections(typical),
        ),
        Measure(
            "busiest",
            f"connections of the busiest device ({data.count_of(busiest):,} rows), page 1",
            GOAL_SECONDS,
            lambda _h: connections(busiest),
        ),
        Measure(
            "page2",
            "connections of the busiest device, page 2 (cursor)",
            None,
            lambda _h: connections(busiest, cursor),
        ),
        Measure("stats1", "statistics, last 24 h", 0.010, lambda _h: window(1)),
        Measure("stats7", "statistics, 7-day window", 0.025, lambda _h: window(7)),
        Measure("stats30", "statistics, 30-day window", 0.025, lambda _h: window(30)),
        Measure(
            "raw1", "statistics from the rows (before), last 24 h", None, lambda _h: from_rows(1)
        ),
        Measure(
            "raw7", "statistics from the rows (before), 7-day window", None, lambda _h: from_rows(7)
        ),
        Measure("hourly", "hourly figures, last 24 h", None, lambda _h: hourly()),
        Measure(
            "devices",
            "per-device availability, last 24 h, page 1 (100 devices)",
            None,
            lambda _h: availability(False),
        ),
        Measure(
            "all_devices",
            "per-device availability, last 24 h, every device (all pages)",
            None,
            lambda _h: availability(True),
        ),
        Measure("audit", "audit trail, page 1 (oldest first)", False, lambda _h: audit()),
        Measure(
            "audit_new",
            "audit trail, page 1 (newest first)",
            None,
            lambda _h: audit(newest_first=True),
        ),
        Measure(
            "audit_client",
            "audit trail of a typical device, page 1 (newest first)",
            None,
            lambda _h: audit(client_id=typical, newest_first=True),
        ),
        Measure(
            "sessions",
            "sessions of the busiest constellation, page 1",
            None,
            lambda _h: sessions(constellation),
        ),
    ]


async def time_call(measure: Measure, history: History, config: Config) -> Timing:
    for _ in range(config.warmups):
        await measure.call(history)
    samples: list[float] = []
    items = 0
    deadline = time.perf_counter() + config.budget
    while len(samples) < config.calls and (len(samples) < 5 or time.perf_counter() < deadline):
        began = time.perf_counter()
        items = await measure.call(history)
        samples.append(time.perf_counter() - began)
    return Timing(statistics.median(samples), percentile(samples, 0.95), items, len(samples))


async def explain(engine: AsyncEngine, measure: Measure, history: History) -> list[str]:
    """Every statement one call of ``measure`` runs, each timed alone, with its plan."""
    captured: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        captured.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        await measure.call(history)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    postgres = engine.dialect.name == "postgresql"
    out = [f"### {engine.dialect.name}: {measure.label}", ""]
    async with engine.connect() as connection:
        for statement, parameters in captured:
            samples = []
            for _ in range(5):
                began = time.perf_counter()
                await connection.exec_driver_sql(statement, parameters)
                samples.append(time.perf_counter() - began)
            prefix = "EXPLAIN (ANALYZE, BUFFERS) " if postgres else "EXPLAIN QUERY PLAN "
            plan: Sequence[Any] = (
                await connection.exec_driver_sql(prefix + statement, parameters)
            ).all()
            out.append(f"{statistics.median(samples) * 1e3:8.2f} ms  {' '.join(statement.split())}")
            if postgres:
                out.extend(f"    {row[0]}" for row in plan)
            else:
                depth: dict[int, int] = {}
                for row in plan:
                    node, parent, detail = row[0], row[1], row[3]
                    depth[node] = depth.get(parent, -1) + 1
                    out.append(f"    {'  ' * depth[node]}{detail}")
            out.append("")
    return out


async def run_backend(
    backend: Backend, url: str | URL, data: Dataset, config: Config, plans: list[str] | None
) -> None:
    engine = create_engine(url)
    try:
        history = History(engine)
        backend.measures = await measures(history, data, engine)
        for measure in backend.measures:
            progress(f"{backend.name}: {measure.label}")
            backend.timings[measure.key] = await time_call(measure, history, config)
            if plans is not None:
                plans.extend(await explain(engine, measure, history))
        now = moment(data.now)
        day = await history.statistics(since=now - timedelta(days=1), until=now)
        backend.facts.append(
            f"{backend.name}: statistics of the last 24 h = {day.connections:,} connections of"
            f" {day.distinct_clients:,} clients, mean {day.mean_duration_seconds or 0:,.0f} s,"
            f" p95 {day.p95_duration_seconds or 0:,.0f} s, {sum(day.online_by_type.values()):,}"
            f" online, availability of {len(day.availability or {}):,} devices"
        )
    finally:
        await engine.dispose()


async def bench_sqlite(
    data: Dataset, config: Config, plans: list[str] | None, *, analyze: bool
) -> Backend:
    backend = Backend("SQLite + ANALYZE" if analyze else "SQLite")
    directory = Path(tempfile.mkdtemp(prefix="registry-bench-queries-"))
    try:
        path = directory / "registry.db"
        began = time.perf_counter()
        progress("SQLite: loading")
        rollups_seconds = await load_sqlite(path, data, analyze=analyze)
        how = "then ANALYZE" if analyze else "no ANALYZE, as the registry leaves it"
        backend.facts.append(
            f"SQLite {sqlite3.sqlite_version}: built in {time.perf_counter() - began:,.1f} s"
            f" (raw sqlite3 executemany, rollups built from the rows in"
            f" {rollups_seconds:,.1f} s; {how}), {path.stat().st_size / 2**20:,.0f} MiB"
        )
        await run_backend(backend, seed.sqlite_url(path), data, config, plans)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return backend


async def bench_postgres(
    data: Dataset, config: Config, admin_url: str, plans: list[str] | None
) -> Backend:
    backend = Backend("PostgreSQL")
    admin = make_url(admin_url).set(drivername="postgresql+asyncpg")
    name = f"registry_bench_{os.getpid()}"
    try:
        connection = await asyncpg.connect(asyncpg_dsn(admin), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        backend.skipped = f"PostgreSQL skipped: cannot reach {admin.render_as_string()}: {exc}"
        return backend
    try:
        version = await connection.fetchval("SHOW server_version")
        await connection.execute(f'CREATE DATABASE "{name}"')
        url = admin.set(database=name)
        try:
            began = time.perf_counter()
            progress(f"PostgreSQL: loading into {name}")
            rollups_seconds = await load_postgres(url, data)
            backend.facts.append(
                f"PostgreSQL {version}: built in {time.perf_counter() - began:,.1f} s"
                f" (migrations, COPY, rollups built from the rows in {rollups_seconds:,.1f} s,"
                " VACUUM ANALYZE)"
            )
            await run_backend(backend, url, data, config, plans)
        finally:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()
    return backend


# -- the report ------------------------------------------------------------------------------


def markdown(labels: list[Measure], backends: list[Backend], notes: list[str], calls: int) -> str:
    ran = [b for b in backends if b.skipped is None]
    head = ["Query", "Issue goal"]
    for b in ran:
        head += [f"{b.name} median", f"{b.name} p95"]
    head.append("Under the goal (p95; 50 ms where none)")
    rows = []
    for measure in labels:
        goal = measure.goal or GOAL_SECONDS
        cells = [measure.label, f"≤ {measure.goal * 1e3:g} ms" if measure.goal else "—"]
        verdicts = []
        for b in ran:
            timing = b.timings[measure.key]
            fewer = f" ({timing.calls} calls)" if timing.calls < calls else ""
            cells += [ms(timing.median) + fewer, ms(timing.p95)]
            verdicts.append(f"{b.name} {yes_no(timing.p95 <= goal)}")
        cells.append(", ".join(verdicts))
        rows.append(cells)
    out = [table(head, rows), ""]
    out.extend(f"- {note}" for note in notes)
    for b in backends:
        out.extend(f"- {fact}" for fact in b.facts)
        if b.skipped:
            out.append(f"- {b.skipped}")
    return "\n".join(out)


async def main_async(
    config: Config, postgres_url: str | None, *, show_plans: bool, sqlite_analyze: bool
) -> str:
    began = time.perf_counter()
    load_before = os.getloadavg()[0]
    now = int(time.time()) * 1_000_000
    progress(f"generating {config.shape.describe()}")
    data = generate(config.shape, now, random.Random(20240601))
    plans: list[str] | None = [] if show_plans else None
    backends = [await bench_sqlite(data, config, plans, analyze=sqlite_analyze)]
    if postgres_url is not None:
        backends.append(await bench_postgres(data, config, postgres_url, plans))
    labels = next((b.measures for b in backends if b.measures), [])
    notes = [
        f"Data: {config.shape.describe()}; {data.open_count():,} connections open now,"
        f" {len(data.audit()):,} audit rows. Each query: median and p95 of {config.calls} calls"
        f" after {config.warmups} warm-ups (fewer where marked: at most"
        f" {config.budget:.0f} s per query), through `History` (pool checkout and records"
        " included).",
        f"{platform.python_implementation()} {platform.python_version()},"
        f" {os.cpu_count()} CPUs, 1-minute load average {load_before:.1f} at the start and"
        f" {os.getloadavg()[0]:.1f} at the end; whole run {time.perf_counter() - began:,.0f} s.",
    ]
    report = markdown(labels, backends, notes, config.calls)
    if plans:
        report += "\n\n## Plans\n\n```text\n" + "\n".join(plans) + "\n```\n"
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.queries", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100,000 rows, fewer calls")
    parser.add_argument(
        "--postgres-url",
        default=DEFAULT_POSTGRES_URL,
        help="an admin URL of a PostgreSQL server to create a throwaway database on",
    )
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument(
        "--sqlite-analyze",
        action="store_true",
        help="run ANALYZE on the SQLite file (the registry itself never does)",
    )
    parser.add_argument(
        "--explain", action="store_true", help="append each statement's time and plan"
    )
    args = parser.parse_args(argv)
    config = Config.make(args.quick)
    postgres_url = None if args.no_postgres else args.postgres_url
    report = main_async(
        config, postgres_url, show_plans=args.explain, sqlite_analyze=args.sqlite_analyze
    )
    print(asyncio.run(report))


if __name__ == "__main__":
    main()
