"""The journal limit: at ``journal_limit`` operations waiting for the store, registrations and new
sessions are refused with :class:`JournalFullError` and nothing changes; ends (disconnects,
session ends) are still accepted; once the journal drains, everything accepted is in the
database and nothing refused is.

The sync reference API queues without awaiting, so the writer cannot run between calls: the
journal fills deterministically, with no fault to inject (the store faults themselves are in
``tests/reliability/test_store_faults.py``)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from registry import ClientType, InvalidArgumentError, JournalFullError, Registry, StoreError
from tests.support import sql


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
        assert f"{depth} operations are waiting for the store (journal limit 10)" in message
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
    path = tmp_path / "registry.db"
    async with Registry(f"sqlite+aiosqlite:///{path}", heartbeat_interval=0.02) as registry:
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            await asyncio.to_thread(holder.execute, "BEGIN EXCLUSIVE")
            await asyncio.sleep(0.5)  # some 25 intervals, while the writer waits on the lock
            assert registry.journal.depth == 1
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await registry.flush()
