"""Rollups against the rows: on seeded random histories, the statistics, hourly figures and
per-device availability read from the rollups equal what the rows themselves answer (the
queries of before the rollups, kept in ``tests/core/raw_statistics.py``).

The histories go through the writer's own path (``registry.store.writes.apply``, what the
journal calls) in random batches: connections that span hour and day boundaries, last no time
at all, overlap their successor (a replaced connection), close exactly on an hour, or stay
open; sessions that change state in a later batch. Then start-up recovery closes a gone run's
connections and interrupts its sessions, and prune deletes the old history; after each step
the answers still agree, and the rollup tables equal a rebuild from the rows (the
migration's backfill, also run for real by downgrading and upgrading the database).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.history import History
from registry.prune import prune
from registry.recovery import close_gone_runs
from registry.store import models, rollups
from registry.store.dialect import create_engine
from registry.store.schema import alembic_config
from registry.store.writes import Op, apply
from tests.core.raw_statistics import raw_hourly, raw_statistics
from tests.databases import migrate

H = timedelta(hours=1)
REASONS = ("removed", "replaced", "idle_timeout", "server_shutdown", None)
PLATFORMS = ("linux", "Linux", "windows", "macos")


@dataclass
class History_:
    """A generated history: the journal's batches and what the checks need to know."""

    now: datetime
    batches: list[list[tuple[Op, dict[str, Any]]]] = field(default_factory=list)
    this_node: str = field(default_factory=lambda: str(uuid.uuid4()))
    gone_node: str = field(default_factory=lambda: str(uuid.uuid4()))
    old_node: str = field(default_factory=lambda: str(uuid.uuid4()))
    gone_beat: datetime | None = None


def _moment(rng: random.Random, start: datetime, end: datetime) -> datetime:
    """A random instant in ``[start, end)``, now and then exactly on an hour."""
    at = start + (end - start) * rng.random()
    if rng.random() < 0.15:
        at = max(start, at.replace(minute=0, second=0, microsecond=0))
    return at


def generate(seed: int) -> History_:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    history = History_(now=now)
    begin = now - timedelta(days=4)
    history.gone_beat = now - timedelta(hours=rng.uniform(1, 20))
    events: list[tuple[datetime, int, Op, dict[str, Any]]] = []
    clients = []
    for n in range(14):
        client_id = f"client-{n:02d}"
        kind = "constellation" if n % 5 == 0 else "device"
        platform = rng.choice(PLATFORMS)
        clients.append((client_id, kind, platform))
        events.append(
            (
                begin - H,
                0,
                Op.CLIENT,
                {
                    "client_id": client_id,
                    "client_type": kind,
                    "platform": platform,
                    "first_seen": begin,
                    "last_seen": begin,
                    "metadata": {},
                },
            )
        )
    order = 0
    for client_id, kind, platform in clients:
        at = _moment(rng, begin, begin + timedelta(hours=12))
        while at < now - timedelta(minutes=5):
            order += 1
            node = history.old_node if at < now - timedelta(days=2) else history.this_node
            if rng.random() < 0.3 and at > history.gone_beat - timedelta(hours=6):
                node = history.gone_node
            connection_id = str(uuid.uuid4())
            events.append(
                (
                    at,
                    order,
                    Op.CONNECTION_OPEN,
                    {
                        "connection_id": connection_id,
                        "client_id": client_id,
                        "node_id": node,
                        "client_type": kind,
                        "platform": platform,
                        "metadata": {},
                        "remote_address": None,
                        "connected_at": at,
                    },
                )
            )
            shape = rng.random()
            if shape < 0.08:
                length = timedelta(0)  # closed at its own start
            elif shape < 0.6:
                length = timedelta(seconds=rng.uniform(1, 3000))
            else:
                length = timedelta(hours=rng.uniform(0.5, 30))  # over hours, maybe days
            ended = at + length
            if rng.random() < 0.2:  # close exactly on an hour
                ended = max(at, (ended + H).replace(minute=0, second=0, microsecond=0))
            stays_open = ended >= now or (node == history.gone_node and rng.random() < 0.7)
            if not stays_open:
                order += 1
                events.append(
                    (
                        ended,
                        order,
                        Op.CONNECTION_CLOSE,
                        {
                            "b_id": connection_id,
                            "b_at": ended,
                            "b_code": 1000,
                            "b_reason": rng.choice(REASONS),
                        },
                    )
                )
            if stays_open:
                break
            # The next one: after a gap, or just before this one closed (replaced).
            if rng.random() < 0.1:
                at = max(at, ended - timedelta(seconds=rng.uniform(0, 5)))
            else:
                at = ended + timedelta(seconds=rng.uniform(0, 4 * 3600))
    for n in range(40):
        session_id = f"session-{seed}-{n}"
        created = _moment(rng, begin, now - timedelta(minutes=1))
        node = rng.choice((history.this_node, history.gone_node))
        row = {
            "session_id": session_id,
            "owner_id": rng.choice(clients)[0],
            "executor_id": rng.choice(clients)[0],
            "task_name": "task",
            "state": "active",
            "node_id": node,
            "created_at": created,
            "ended_at": None,
            "end_reason": None,
        }
        order += 1
        events.append((created, order, Op.SESSION, row))
        ended = created + timedelta(minutes=rng.uniform(0, 600))
        if ended < now and not (node == history.gone_node and rng.random() < 0.5):
            order += 1
            state = rng.choice(("completed", "failed", "cancelled"))
            events.append((ended, order, Op.SESSION, {**row, "state": state, "ended_at": ended}))
    events.sort(key=lambda event: (event[0], event[1]))
    batch: list[tuple[Op, dict[str, Any]]] = []
    for _at, _order, op, row in events:
        batch.append((op, row))
        if rng.random() < 0.25:
            history.batches.append(batch)
            batch = []
    history.batches.append(batch)
    return history


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    await migrate(database_url)
    engine = create_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def write(engine: AsyncEngine, history: History_) -> None:
    """The nodes, then every batch through the writer, each in its own transaction."""
    beat = history.gone_beat
    assert beat is not None
    async with engine.begin() as connection:
        for node_id, name, stopped, heartbeat in (
            (history.old_node, "old", history.now - timedelta(days=2), history.now),
            (history.gone_node, "gone", None, beat),
            (history.this_node, "this", None, history.now),
        ):
            await connection.execute(
                insert(models.nodes).values(
                    node_id=node_id,
                    name=name,
                    hostname="test",
                    pid=1,
                    started_at=history.now - timedelta(days=5),
                    heartbeat_at=heartbeat,
                    stopped_at=stopped,
                )
            )
    for batch in history.batches:
        async with engine.begin() as connection:
            await apply(connection, batch)


def windows(seed: int, now: datetime) -> list[tuple[datetime, datetime]]:
    rng = random.Random(seed * 7919)
    hour = now.replace(minute=0, second=0, microsecond=0)
    chosen = [
        (now - timedelta(days=1), now),
        (now - timedelta(days=7), now),
        (hour - 30 * H, hour - 2 * H),  # whole hours only
        (hour - 50 * H + timedelta(minutes=10), hour - 50 * H + timedelta(minutes=50)),
        (hour.replace(hour=0) - timedelta(days=2), hour.replace(hour=0)),  # whole days
        (now - timedelta(hours=3), now + timedelta(hours=2)),  # into the future
        (now - timedelta(days=9), now - timedelta(days=8)),  # before everything
    ]
    for _ in range(14):
        since = now - timedelta(days=5) * rng.random()
        length = timedelta(seconds=rng.choice((90, 1800, 5400, 86400, 3 * 86400)) * rng.random())
        chosen.append((since, since + max(length, timedelta(minutes=1))))
    return chosen


async def agree(engine: AsyncEngine, seed: int, now: datetime) -> None:
    """The rollups' answers are the rows' answers, for every window."""
    history = History(engine)
    async with engine.connect() as connection:
        still_open = (
            await connection.execute(
                select(func.count()).where(models.connections.c.disconnected_at.is_(None))
            )
        ).scalar_one()
    for since, until in windows(seed, now):
        began = time.monotonic()
        got = await history.statistics(since=since, until=until)
        async with engine.connect() as connection:
            raw = await raw_statistics(connection, since, until)
        # What is still open counts up to each answer's own now.
        drift = time.monotonic() - began + 1e-3
        where = (since, until)
        assert got.online_by_type == raw.online_by_type, where
        assert got.online_by_platform == raw.online_by_platform, where
        assert got.connections == raw.connections, where
        assert got.distinct_clients == raw.distinct_clients, where
        assert got.disconnects_by_reason == raw.disconnects_by_reason, where
        assert got.sessions_by_state == raw.sessions_by_state, where
        if raw.mean_duration_seconds is None:
            assert got.mean_duration_seconds is None, where
            assert got.p95_duration_seconds is None, where
        else:
            assert got.mean_duration_seconds == pytest.approx(
                raw.mean_duration_seconds, abs=2e-3
            ), where
            assert raw.p95_duration_seconds is not None
            error = abs((got.p95_duration_seconds or 0.0) - raw.p95_duration_seconds)
            assert error <= rollups.RELATIVE_ACCURACY * raw.p95_duration_seconds + 2e-3, where
        assert got.availability is not None
        assert raw.availability is not None
        assert set(got.availability) == set(raw.availability), where
        length = (until - since).total_seconds()
        for device, fraction in raw.availability.items():
            assert got.availability[device] == pytest.approx(fraction, abs=drift / length + 1e-6), (
                where,
                device,
            )
        # The same, a page of three devices at a time.
        began = time.monotonic()
        paged: dict[str, float] = {}
        cursor = None
        while True:
            page = await history.availability(since=since, until=until, limit=3, cursor=cursor)
            assert len(page.items) <= 3
            paged.update((item.device_id, item.availability) for item in page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert list(paged) == sorted(got.availability), where
        drift += time.monotonic() - began
        assert paged == pytest.approx(got.availability, abs=drift / length + 1e-6)

    for hours in (24, 30, 100):
        start = now.replace(minute=0, second=0, microsecond=0) - (hours - 1) * H
        began = time.monotonic()
        got_hours = await history.hourly(since=start, until=start + hours * H)
        async with engine.connect() as connection:
            raw_hours = await raw_hourly(connection, start, start + hours * H)
        drift = (time.monotonic() - began) * still_open + 0.05
        assert len(got_hours.items) == len(raw_hours) == hours
        for mine, theirs in zip(got_hours.items, raw_hours, strict=True):
            assert mine.hour == theirs.hour
            assert (mine.connects, mine.disconnects) == (theirs.connects, theirs.disconnects)
            assert mine.disconnects_by_reason == theirs.disconnects_by_reason, mine.hour
            assert mine.connected_seconds == pytest.approx(theirs.connected_seconds, abs=drift), (
                mine.hour
            )


async def tables(engine: AsyncEngine) -> dict[str, set[tuple[Any, ...]]]:
    """Every rollup row that holds something."""
    found: dict[str, set[tuple[Any, ...]]] = {}
    async with engine.connect() as connection:
        for sums in rollups.TABLES:
            rows = (await connection.execute(select(sums.table))).all()
            found[sums.table.name] = {
                tuple(row)
                for row in rows
                if not sums.counters or any(getattr(row, name) for name in sums.counters)
            }
    return found


async def rebuilt(engine: AsyncEngine) -> dict[str, set[tuple[Any, ...]]]:
    """What :func:`rollups.rebuild` makes of the rows (rolled back after)."""
    async with engine.connect() as connection:
        transaction = await connection.begin()
        await connection.run_sync(rollups.rebuild)
        found: dict[str, set[tuple[Any, ...]]] = {}
        for sums in rollups.TABLES:
            found[sums.table.name] = set(map(tuple, await connection.execute(select(sums.table))))
        await transaction.rollback()
    return found


def without_first_openings(found: dict[str, set[tuple[Any, ...]]]) -> dict[str, set[Any]]:
    """The tables with device days' earliest openings left out (a lower bound after prune)."""
    return {
        name: {row[:-1] for row in rows} if name == "device_days" else rows
        for name, rows in found.items()
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_rollups_answer_as_the_rows_do(engine: AsyncEngine, seed: int) -> None:
    history = generate(seed)
    await write(engine, history)
    await agree(engine, seed, history.now)
    assert await tables(engine) == await rebuilt(engine)

    # Start-up recovery of another run closes the gone run's connections (at its last beat,
    # or at their own start) and interrupts its sessions, in set-based statements.
    async with engine.begin() as connection:
        closed, interrupted, nodes = await close_gone_runs(
            connection,
            node_id=history.this_node,
            node_name="this",
            now=history.now,
            node_timeout=timedelta(seconds=30),
            single_node=False,
        )
    assert nodes == [history.gone_node]
    assert closed > 0
    assert interrupted > 0
    await agree(engine, seed, history.now)
    assert await tables(engine) == await rebuilt(engine)

    # Prune: the rollups answer for the rows that remain.
    report = await prune(engine, history.now - timedelta(days=2), batch_size=7)
    assert report.connections > 0
    assert report.sessions > 0
    await agree(engine, seed, history.now)
    mine, rows = await tables(engine), await rebuilt(engine)
    assert without_first_openings(mine) == without_first_openings(rows)
    first_openings = {row[:2]: row[-1] for row in rows["device_days"]}
    for row in mine["device_days"]:  # still a lower bound
        assert row[-1] <= first_openings[row[:2]]


async def test_migration_backfills_the_rollups(engine: AsyncEngine, database_url: str) -> None:
    history = generate(4)
    await write(engine, history)
    written = await tables(engine)
    await engine.dispose()  # the migration runs on connections of its own
    config = alembic_config(database_url)
    await asyncio.to_thread(command.downgrade, config, "0001")
    await asyncio.to_thread(command.upgrade, config, "head")
    assert await tables(engine) == written
    await agree(engine, 4, history.now)
