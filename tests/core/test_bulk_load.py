"""Bulk work through the library: a loop of mutations that outruns a healthy writer.

The journal limit protects memory while the store is down; a loop that merely adds faster than
the writer commits keeps pace with ``await registry.room()`` (README, "Bulk loads") and
completes, with everything in the database. A plain loop that outruns the writer is refused
with an error that says what to do, not one that blames a healthy store; ``room()`` itself
raises only when the store is actually failing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from registry import ClientType, JournalFullError, Registry, StoreUnavailableError
from tests.reliability.store_faults import SqliteLocked
from tests.support import sql, until

#: Small enough that the load passes the limit many times over.
LIMIT = 1_000
CLIENTS = 20_000


async def test_a_bulk_load_that_awaits_room_completes(database_url: str) -> None:
    started = time.monotonic()
    async with Registry(database_url, journal_limit=LIMIT) as registry:
        deepest = 0
        for number in range(CLIENTS):
            await registry.room()
            registry.add_client(f"dev-{number}", "linux", object(), ClientType.DEVICE)
            deepest = max(deepest, registry.journal.depth)
        assert registry.journal.refused == {}
        assert deepest < LIMIT  # never near the limit: the loop waited for the writer
        await registry.flush()
    took = time.monotonic() - started
    # Closing it recorded every one of them leaving (many commits' worth, in steps).
    rows = await sql(
        database_url,
        "SELECT count(*), count(DISTINCT client_id), count(disconnected_at) FROM connections",
    )
    assert tuple(rows[0]) == (CLIENTS, CLIENTS, CLIENTS)
    print(f"\n{CLIENTS:,} add_client calls paced by room(), limit {LIMIT:,}: {took:.1f}s")


async def test_a_plain_loop_that_outruns_a_healthy_writer_is_told_what_to_do(
    database_url: str,
) -> None:
    async with Registry(database_url, journal_limit=LIMIT) as registry:

        def add_all() -> None:
            for number in range(LIMIT):
                registry.add_client(f"dev-{number}", "linux", object(), ClientType.DEVICE)

        with pytest.raises(JournalFullError) as refused:
            add_all()
        message = str(refused.value)
        assert "await registry.room()" in message, message
        assert "the store is healthy" in message, message
        assert "waiting for the store" not in message, message
        # Paced, the same loop goes on from there.
        for number in range(registry.get_online_count(), 2 * LIMIT):
            await registry.room()
            registry.add_client(f"dev-{number}", "linux", object(), ClientType.DEVICE)
        await registry.flush()
    assert await sql(database_url, "SELECT count(*) FROM connections") == [(2 * LIMIT,)]


async def test_room_raises_while_the_store_fails(tmp_path: Path) -> None:
    """Above the low-water mark with the store failing, ``room()`` raises at the first failed
    commit instead of waiting for ever; below it, it returns at once, failing store or not."""
    locked = SqliteLocked(tmp_path)
    async with Registry(locked.url, journal_limit=10) as registry:
        try:
            await locked.inject()
            registry.add_client("dev-0", "linux", object(), ClientType.DEVICE)
            await registry.room()  # 3 of 10: room
            registry.add_client("dev-1", "linux", object(), ClientType.DEVICE)
            with pytest.raises(StoreUnavailableError, match="the store is failing") as failing:
                await registry.room()  # 6 of 10, and the commit fails on the lock
            assert "database is locked" in str(failing.value)
        finally:
            await locked.clear()
        await until(lambda: registry.journal.last_error is None)  # the writer's next retry
        await registry.room()
        await registry.flush()
    assert await sql(locked.url, "SELECT count(*) FROM connections") == [(2,)]
