"""The registry while its store is behind or down.

The journal limit: at ``journal_limit`` operations waiting for the store, registrations and new
sessions are refused with :class:`JournalFullError` and nothing changes; ends (disconnects,
session ends) are still accepted; once the journal drains, everything accepted is in the
database and nothing refused is. The sync reference API queues without awaiting, so the writer
cannot run between calls: the journal fills deterministically, with no fault to inject.

With SQLite's write lock held by another connection (``SqliteLocked``, as in the server's
fault tests, ``tests/reliability/test_store_faults.py``): node beats do not pile up, and a
session whose opening is not durable in time is ended, not left active."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from registry import ClientType, InvalidArgumentError, JournalFullError, Registry, StoreError
from registry.store import models
from tests.reliability.store_faults import SqliteLocked, prepared
from tests.support import sql, until


async def _fill(registry: Registry) -> list[str]:
    """Register devices until the journal refuses one; the ids it accepted."""
    accepted: list[str] = []
    for number in range(1_000):
        client_id = f"d{number}"
        try:
            registry.add_client(client_id, "linux", object(), ClientType.DEVICE)
        except JournalFullError:
            return accepted
        accepted.append(client_id)
    raise AssertionError("the journal never refused a registration")


async def test_full_journal_refuses_new_work_and_keeps_ends(database_url: str) -> None:
    async with Registry(database_url, journal_limit=10) as registry:
        accepted = await _fill(registry)
        assert 1 <= len(accepted) < 10
        depth = registry.journal.depth
        assert depth >= 10

        with pytest.raises(JournalFullError) as refused:
            registry.add_client("late", "linux", object(), ClientType.DEVICE)
        message = str(refused.value)
        assert message.startswith("registration refused:"), message
        assert f"{depth} operations holding" in message, message
        assert "(journal limits 10 operations, 64.0 MiB)" in message, message
        assert isinstance(refused.value, StoreError)
        assert not registry.is_online("late")
        assert registry.journal.depth == depth  # a refusal queues nothing

        with pytest.raises(JournalFullError, match=r"^session refused:"):
            await registry.open_session("s1", owner_id=accepted[0], executor_id=accepted[0])
        assert registry.get_session("s1") is None

        # Ends are accepted beyond the limit: they happened.
        registry.remove_client(accepted[0], reason="client_closed")
        assert registry.journal.depth > depth
        assert registry.journal.refused == {"registration": 2, "session": 1}

        await registry.flush()
        registry.add_client("late", "linux", object(), ClientType.DEVICE)
        await registry.flush()

    ids = sorted(row[0] for row in await sql(database_url, "SELECT client_id FROM connections"))
    assert ids == sorted([*accepted, "late"])
    closed = await sql(
        database_url,
        "SELECT client_id, close_reason FROM connections WHERE client_id = :id",
        id=accepted[0],
    )
    assert [tuple(row) for row in closed] == [(accepted[0], "client_closed")]
    assert await sql(database_url, "SELECT session_id FROM sessions") == []


async def test_journal_limit_must_be_positive(database_url: str) -> None:
    with pytest.raises(InvalidArgumentError, match="journal_limit"):
        Registry(database_url, journal_limit=0)


async def test_node_beats_do_not_pile_up_while_the_store_is_locked(tmp_path: Path) -> None:
    """While a commit waits on the store, the node's heartbeat queues one beat, not one per
    interval: an outage grows the journal only by what clients do."""
    locked = SqliteLocked(tmp_path)
    async with Registry(locked.url, heartbeat_interval=0.02) as registry:
        try:
            await locked.inject()
            await asyncio.sleep(0.5)  # some 25 intervals, while the writer waits on the lock
            assert registry.journal.depth == 1
        finally:
            await locked.clear()
        await registry.flush()


@pytest.mark.postgres
async def test_the_beat_written_after_an_outage_is_fresh(tmp_path: Path) -> None:
    """The one beat queued during an outage keeps its time current, so the beat written when
    the store is back says when the node was last alive, not when the outage began."""
    async with prepared("postgresql-read-only", tmp_path) as read_only:
        registry = Registry(read_only.url, heartbeat_interval=0.05, auto_migrate=True)
        async with registry:
            try:
                await read_only.inject()
                await until(lambda: registry.journal.last_error is not None)
                failing_since = datetime.now(UTC)
                await asyncio.sleep(0.3)
            finally:
                await read_only.clear()
            await until(lambda: registry.journal.last_error is None and not registry.journal.depth)
            async with registry.engine.connect() as connection:
                query = select(models.nodes.c.heartbeat_at)
                beat = (await connection.execute(query)).scalar_one()
            assert beat > failing_since


async def test_a_session_not_durable_in_time_ends_failed(tmp_path: Path) -> None:
    """``open_session`` cancelled (here by a timeout) while its commit waits on a locked
    store: the session does not stay active in memory or in the database, it ends ``failed``
    with reason ``store_unavailable``."""
    locked = SqliteLocked(tmp_path)
    async with Registry(locked.url) as registry:
        registry.add_client("d1", "linux", object(), ClientType.DEVICE)
        registry.add_device_session("d1", "s1")  # live already: opening it skips the store
        await registry.flush()
        try:
            await locked.inject()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await registry.open_session("s1", owner_id="d1", executor_id="d1")
            assert registry.get_session("s1") is None
            assert registry.get_device_sessions("d1") == set()
        finally:
            await locked.clear()
        await registry.flush()
        rows = await sql(locked.url, "SELECT state, end_reason FROM sessions")
        assert [tuple(row) for row in rows] == [("failed", "store_unavailable")]
