"""Retention: ``registry.prune.prune`` and ``registry prune`` delete exactly the history older
than the cutoff, never what is still live, and record the run in the audit trail.

The database holds two server runs: the scenario's (stopped: its connections closed, task-d@1
``interrupted``), then a second run that is still serving, with dev-win and dev-lin connected
(dev-win with new system info) and dev-lin's own session task-e@1 ``active``. Rows are then
backdated by 100 days with SQL UPDATE, including rows that must survive anyway.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest

from registry.prune import prune
from registry.store.dialect import create_engine
from tests.operator.conftest import (
    GONE_INFO_2,
    LIN_INFO,
    WIN_INFO,
    Fleet,
    cli,
    is_sqlite,
    now,
    running_server,
)
from tests.support import Clients, Server, sql

pytestmark = pytest.mark.timeout(90)

WIN_INFO_2 = {**WIN_INFO, "memory_gb": 64}
TABLES = [
    "connections",
    "sessions",
    "session_links",
    "device_info_snapshots",
    "audit_events",
    "nodes",
]


@dataclass
class TwoRuns:
    url: str
    server: Server  # the second run, still serving
    old_node: str
    new_node: str


@asynccontextmanager
async def two_runs(fleet: Fleet) -> AsyncIterator[TwoRuns]:
    old_node = fleet.registry.node_id
    await fleet.stop()
    async with running_server(fleet.database_url) as server:
        clients = Clients(server)
        try:
            await clients.register("dev-win", platform="Windows", system_info=WIN_INFO_2)
            lin = await clients.register("dev-lin", platform="linux", system_info=LIN_INFO)
            await lin.task("task-e@1", "task-e")
            await lin.recv_type("command")  # never answered: task-e@1 stays active
            await server.registry.flush()
            yield TwoRuns(fleet.database_url, server, old_node, server.registry.node_id)
        finally:
            await clients.aclose()


def stamp(url: str, days: float) -> Any:
    """``days`` ago, bound as the backend stores it (text on SQLite)."""
    value = now() - timedelta(days=days)
    return value.strftime("%Y-%m-%d %H:%M:%S.%f") if is_sqlite(url) else value


async def backdate(runs: TwoRuns, *, spare_connection_of: str = "") -> None:
    """Make the first run's history 100 days old (except one connection, if named); also make
    rows that must never be pruned look old: an open connection, the interrupted and the
    active session (ended_at too), every device's latest snapshot."""
    url, old = runs.url, stamp(runs.url, 100)
    statements = [
        (
            "UPDATE connections SET connected_at = :old, disconnected_at = :old "
            "WHERE node_id = :node AND client_id <> :spare",
            {"node": runs.old_node, "spare": spare_connection_of},
        ),
        (
            "UPDATE connections SET connected_at = :old WHERE node_id = :node",
            {"node": runs.new_node},
        ),
        ("UPDATE sessions SET created_at = :old, ended_at = :old", {}),
        ("UPDATE session_links SET bound_at = :old", {}),
        ("UPDATE device_info_snapshots SET captured_at = :old", {}),
        ("UPDATE audit_events SET at = :old WHERE node_id = :node", {"node": runs.old_node}),
        (
            "UPDATE nodes SET started_at = :old, heartbeat_at = :old, stopped_at = :old "
            "WHERE node_id = :node",
            {"node": runs.old_node},
        ),
    ]
    for statement, params in statements:
        await sql(url, statement, old=old, **params)


async def counts(url: str) -> dict[str, int]:
    return {table: (await sql(url, f"SELECT count(*) FROM {table}"))[0][0] for table in TABLES}


async def latest_snapshots(url: str) -> set[int]:
    rows = await sql(url, "SELECT max(snapshot_id) FROM device_info_snapshots GROUP BY device_id")
    return {row[0] for row in rows}


async def pruned_events(url: str) -> list[Any]:
    return await sql(url, "SELECT details FROM audit_events WHERE kind = 'pruned'")


def details(value: Any) -> dict[str, Any]:
    """A JSON column read by plain SQL: text on SQLite, a dict on PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else dict(value)


async def check_survivors(runs: TwoRuns, latest: set[int], *, old_connections: list[str]) -> None:
    """What must be left: the second run's rows, the live sessions with their links, each
    device's latest snapshot, the spared connection (and so the first run's node row)."""
    url = runs.url
    connections = await sql(url, "SELECT client_id, node_id, disconnected_at FROM connections")
    assert sorted((row.client_id, row.node_id) for row in connections) == sorted(
        [("dev-lin", runs.new_node), ("dev-win", runs.new_node)]
        + [(client, runs.old_node) for client in old_connections]
    )
    open_ = [row.client_id for row in connections if row.disconnected_at is None]
    assert sorted(open_) == ["dev-lin", "dev-win"]  # old-looking, but open: kept
    sessions = await sql(url, "SELECT session_id, state FROM sessions ORDER BY session_id")
    assert [tuple(row) for row in sessions] == [
        ("task-d@1", "interrupted"),
        ("task-e@1", "active"),
    ]
    links = await sql(url, "SELECT session_id, client_id FROM session_links")
    assert sorted(tuple(row) for row in links) == [
        ("task-d@1", "const-1"),
        ("task-d@1", "dev-lin"),
        ("task-e@1", "dev-lin"),
    ]
    snapshots = await sql(url, "SELECT snapshot_id, device_id, info FROM device_info_snapshots")
    assert {row.snapshot_id for row in snapshots} == latest
    assert {row.device_id: details(row.info) for row in snapshots} == {
        "dev-win": WIN_INFO_2,
        "dev-lin": LIN_INFO,
        "dev-gone": GONE_INFO_2,
    }
    assert await sql(
        url, "SELECT count(*) FROM audit_events WHERE node_id = :node", node=runs.old_node
    ) == [(0,)]
    nodes = await sql(url, "SELECT node_id FROM nodes")
    expected_nodes = [runs.new_node] + ([runs.old_node] if old_connections else [])
    assert sorted(row.node_id for row in nodes) == sorted(expected_nodes)

    # The server still answers from what is left.
    async with runs.server.http() as http:
        info = (await http.get("/api/devices/dev-gone/info")).json()
        assert info["info"] == GONE_INFO_2
        assert (await http.get("/api/clients/dev-win")).json()["online"] is True


async def test_prune_function(fleet: Fleet) -> None:
    async with two_runs(fleet) as runs:
        url = runs.url
        await backdate(runs)
        old_audit = (
            await sql(url, "SELECT count(*) FROM audit_events WHERE node_id = :n", n=runs.old_node)
        )[0][0]
        new_audit = (await counts(url))["audit_events"] - old_audit
        latest = await latest_snapshots(url)
        before = await counts(url)
        expected = {
            "connections": 5,
            "sessions": 3,
            "session_links": 5,
            "device_info_snapshots": 2,
            "audit_events": old_audit,
            "nodes": 1,
        }
        cutoff = now() - timedelta(days=90)

        engine = create_engine(url)
        try:
            planned = await prune(engine, cutoff, dry_run=True)
            assert planned.dry_run is True
            assert planned.counts() == expected
            assert await counts(url) == before  # a dry run deletes nothing
            assert await pruned_events(url) == []  # nor records a run

            progress: list[tuple[str, int]] = []
            report = await prune(
                engine, cutoff, batch_size=2, progress=lambda t, n: progress.append((t, n))
            )
        finally:
            await engine.dispose()
        assert report.dry_run is False
        assert report.counts() == planned.counts()
        done = {table: rows for table, rows in progress}  # the last total of each table
        assert done == expected
        assert len([t for t, _ in progress if t == "connections"]) >= 3  # batches of 2

        after = await counts(url)
        # one "pruned" event more; other new events of the running server may have come in
        assert after["audit_events"] >= new_audit + 1
        for table, deleted in expected.items():
            if table != "audit_events":
                assert after[table] == before[table] - deleted, table
        await check_survivors(runs, latest, old_connections=[])

        (event,) = await pruned_events(url)
        recorded = details(event.details)
        assert recorded == {"cutoff": cutoff.isoformat(), **expected}

        # Nothing old is left: a second run deletes nothing.
        engine = create_engine(url)
        try:
            again = await prune(engine, cutoff, dry_run=True)
        finally:
            await engine.dispose()
        assert set(again.counts().values()) == {0}


async def test_prune_command(fleet: Fleet) -> None:
    async with two_runs(fleet) as runs:
        url = runs.url
        # const-1's connection of the first run stays young: its node row must stay too.
        await backdate(runs, spare_connection_of="const-1")
        latest = await latest_snapshots(url)
        before = await counts(url)

        dry_json, dry_table = await asyncio.gather(
            cli("prune", "--older-than", "90d", "--dry-run", "--json", "--database-url", url),
            cli("prune", "--older-than", "90d", "--dry-run", "--database-url", url),
        )
        assert dry_json.code == 0, dry_json
        planned = dry_json.json()
        assert planned["dry_run"] is True
        counted = {k: v for k, v in planned.items() if k not in ("cutoff", "dry_run")}
        assert counted["connections"] == 4
        assert counted["sessions"] == 3
        assert counted["session_links"] == 5
        assert counted["device_info_snapshots"] == 2
        assert counted["nodes"] == 0  # still named by const-1's connection
        assert counted["audit_events"] > 0
        assert dry_table.code == 0, dry_table
        assert "would delete" in dry_table.stdout
        assert "device_info_snapshots" in dry_table.stdout
        assert await counts(url) == before
        assert await pruned_events(url) == []

        done = await cli("prune", "--older-than", "90d", "--json", "--database-url", url)
        assert done.code == 0, done
        report = done.json()
        assert report["dry_run"] is False
        assert {k: v for k, v in report.items() if k not in ("cutoff", "dry_run")} == counted
        after = await counts(url)
        for table in ("connections", "sessions", "session_links", "device_info_snapshots"):
            assert after[table] == before[table] - counted[table], table
        await check_survivors(runs, latest, old_connections=["const-1"])
        (event,) = await pruned_events(url)
        assert {k: v for k, v in details(event.details).items() if k != "cutoff"} == counted
