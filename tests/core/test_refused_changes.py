"""What the caller refused is never written.

A registration (or a session's opening) that is refused because its commit did not come in
time is *withdrawn*: its operations still queued are dropped from the journal, so nothing of
it appears when the store is back. If it was committed after all (before the withdrawal, or by
the commit running at that moment), its end is recorded instead. Shown with SQLite's write
lock held by another connection (``SqliteLocked``), so the writer's commit is really in flight
(waiting out the busy timeout) or really failing, and with the journal itself for the case of
operations queued behind a commit in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from registry import ClientType, Registry
from registry.journal import Journal
from registry.store.dialect import create_engine
from registry.store.writes import Op, Row, apply
from tests.reliability.store_faults import SqliteLocked
from tests.support import sql, until

OLD_INFO = {"os": "linux", "release": 1}
NEW_INFO = {"os": "linux", "release": 2}


async def test_a_withdrawn_registration_is_never_written(tmp_path: Path) -> None:
    locked = SqliteLocked(tmp_path)
    async with Registry(locked.url, heartbeat_interval=60.0) as registry:
        registry.add_client("dev", "linux", object(), ClientType.DEVICE, {"run": 1})
        registry.set_device_info("dev", OLD_INFO)
        registry.remove_client("dev", reason="client_closed")
        await registry.flush()
        try:
            await locked.inject()
            socket = object()
            registry.add_client("dev", "linux", socket, ClientType.DEVICE, {"run": 2})
            registry.set_device_info("dev", NEW_INFO)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await registry.flush()
            registry.withdraw_client("dev", socket)
            assert not registry.is_online("dev")  # the id is free at once
            # The commit in flight fails on the lock; then the device info cached with the
            # withdrawn registration gives way to what the database holds.
            await until(lambda: registry.get_device_info("dev") == OLD_INFO)
        finally:
            await locked.clear()
        await registry.flush()
    rows = await sql(locked.url, "SELECT client_id, close_reason FROM connections")
    assert [tuple(row) for row in rows] == [("dev", "client_closed")]
    assert await sql(locked.url, "SELECT metadata FROM clients") == [('{"run": 1}',)]
    snapshots = await sql(locked.url, "SELECT info FROM device_info_snapshots")
    assert len(snapshots) == 1
    registered = await sql(
        locked.url, "SELECT count(*) FROM audit_events WHERE kind = 'client_registered'"
    )
    assert registered == [(1,)]


async def test_a_registration_committed_before_its_withdrawal_is_closed(
    database_url: str,
) -> None:
    async with Registry(database_url) as registry:
        socket = object()
        registry.add_client("dev", "linux", socket, ClientType.DEVICE)
        await registry.flush()
        registry.withdraw_client("dev", object())  # another connection's: not this one
        assert registry.is_online("dev")
        registry.withdraw_client("dev", socket)
        assert not registry.is_online("dev")
        await registry.flush()
    rows = await sql(database_url, "SELECT close_reason FROM connections")
    assert rows == [("store_unavailable",)]


async def test_a_withdrawal_during_a_commit_that_then_succeeds_records_the_close(
    tmp_path: Path,
) -> None:
    locked = SqliteLocked(tmp_path)
    async with Registry(locked.url, heartbeat_interval=60.0) as registry:
        try:
            await locked.inject()
            socket = object()
            registry.add_client("dev", "linux", socket, ClientType.DEVICE)
            await until(lambda: registry.journal.in_flight > 0)  # waiting on the lock
            registry.withdraw_client("dev", socket)
        finally:
            await locked.clear()  # within the busy timeout: that very commit goes through
    # Its close, journalled once that commit had succeeded, was written at the registry's close.
    rows = await sql(locked.url, "SELECT close_reason FROM connections")
    assert rows == [("store_unavailable",)]


async def test_a_session_whose_opening_is_withdrawn_is_never_written(tmp_path: Path) -> None:
    locked = SqliteLocked(tmp_path)
    async with Registry(locked.url, heartbeat_interval=60.0) as registry:
        registry.add_client("con", "linux", object(), ClientType.CONSTELLATION)
        registry.add_client("dev", "linux", object(), ClientType.DEVICE)
        await registry.flush()
        try:
            await locked.inject()
            before = registry.journal.last_sequence
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await registry.open_session("s-new", owner_id="con", executor_id="dev")
            assert registry.journal.last_sequence > before  # it was opened, then withdrawn
            await until(lambda: registry.get_session("s-new") is None)
            assert registry.get_device_sessions("dev") == set()
            assert registry.get_constellation_sessions("con") == set()
        finally:
            await locked.clear()
        await registry.flush()
    assert await sql(locked.url, "SELECT session_id FROM sessions") == []
    assert await sql(locked.url, "SELECT session_id FROM session_links") == []


async def test_operations_queued_behind_a_commit_are_dropped_at_once(database_url: str) -> None:
    """Retracted while a commit runs, operations queued behind it are dropped then and there;
    their places pass without a transaction, so a flush after them returns."""
    async with Registry(database_url):
        pass  # a migrated database
    applying = asyncio.Event()
    go_on = asyncio.Event()

    async def gated(connection: AsyncConnection, batch: Sequence[tuple[Op, Row]]) -> None:
        applying.set()
        await go_on.wait()
        await apply(connection, batch)

    def audit(kind: str) -> Row:
        return {
            "at": datetime.now(UTC),
            "node_id": None,
            "kind": kind,
            "client_id": None,
            "session_id": None,
            "details": {},
        }

    engine = create_engine(database_url)
    journal = Journal(engine, gated)
    journal.start()
    try:
        journal.append(Op.AUDIT, audit("first"))
        await applying.wait()
        assert journal.in_flight == 1
        queued = [journal.append(Op.AUDIT, audit("withdrawn"), 1000) for _ in range(2)]
        assert journal.depth_bytes == 3 * 600 + 2 * 1000
        outcome: list[str] = []
        journal.retract(
            queued,
            committed=lambda: outcome.append("committed"),
            dropped=lambda: outcome.append("dropped"),
        )
        assert outcome == ["dropped"]
        assert journal.depth_bytes == 600  # the one in flight
        go_on.set()
        await journal.flush()
        assert journal.depth == 0
        assert journal.depth_bytes == 0
        assert journal.committed_operations == 1
    finally:
        await journal.close(10)
        await engine.dispose()
    rows = await sql(database_url, "SELECT kind FROM audit_events WHERE node_id IS NULL")
    assert rows == [("first",)]
