"""The journal is bounded in bytes as well as in operations, and what a client may make it hold
is capped: metadata at ``max_metadata_bytes``, device info at ``max_device_info_bytes`` (as
canonical JSON). A refusal names the field and the cap, and journals nothing."""

from __future__ import annotations

from typing import Any

import pytest

from registry import ClientType, InvalidArgumentError, JournalFullError, Registry
from registry.journal import OPERATION_BYTES
from tests.support import sql

KIB = 1024


def _metadata(size: int) -> dict[str, str]:
    """A metadata document of exactly ``size`` bytes as canonical JSON."""
    return {"blob": "x" * (size - len('{"blob":""}'))}


async def test_the_byte_limit_refuses_at_once(database_url: str) -> None:
    """Registrations carrying 10 KiB each fill a 100 KiB journal long before its operation
    limit; the next is refused at once, naming the bytes, and nothing of it is queued."""
    async with Registry(database_url, journal_limit_bytes=100 * KIB) as registry:
        accepted: list[str] = []

        def add_until_refused() -> None:
            for number in range(100):
                registry.add_client(
                    f"dev-{number}", "linux", object(), ClientType.DEVICE, _metadata(10 * KIB)
                )
                accepted.append(f"dev-{number}")

        with pytest.raises(JournalFullError) as refused:
            add_until_refused()
        journal = registry.journal
        # The client and connection rows each carry the metadata: 20 KiB + 3 operations each.
        assert len(accepted) == 5
        assert journal.depth_bytes == 5 * (20 * KIB + 3 * OPERATION_BYTES)
        assert journal.depth == 15 < journal.limit
        message = str(refused.value)
        assert "15 operations holding 108.8 KiB" in message, message
        assert "journal limits 100000 operations, 100.0 KiB" in message, message
        assert "holding 108.8 KiB wait for the store (limit 100.0 KiB)" in (journal.fault() or "")
        assert not registry.is_online("dev-5")
        assert journal.refused == {"registration": 1}

        await registry.flush()  # committed: the bytes are free again
        assert journal.depth_bytes == 0
        assert journal.fault() is None
        registry.add_client("dev-5", "linux", object(), ClientType.DEVICE, _metadata(10 * KIB))
        await registry.flush()
    rows = await sql(database_url, "SELECT count(*) FROM connections")
    assert rows == [(6,)]


async def test_journal_limit_bytes_must_be_positive(database_url: str) -> None:
    with pytest.raises(InvalidArgumentError, match="journal_limit_bytes"):
        Registry(database_url, journal_limit_bytes=0)


@pytest.mark.parametrize("cap", ["max_metadata_bytes", "max_device_info_bytes"])
async def test_caps_must_be_positive(database_url: str, cap: str) -> None:
    caps: dict[str, Any] = {cap: -1}
    with pytest.raises(InvalidArgumentError, match=cap):
        Registry(database_url, **caps)


async def test_metadata_over_its_cap_is_refused_before_anything_is_journalled(
    registry: Registry, database_url: str
) -> None:
    cap = 64 * KIB  # the default
    registry.add_client("at-cap", "linux", object(), ClientType.DEVICE, _metadata(cap))
    await registry.flush()
    before = registry.journal.last_sequence
    with pytest.raises(InvalidArgumentError) as refused:
        registry.add_client("over", "linux", object(), ClientType.DEVICE, _metadata(cap + 1))
    assert refused.value.argument == "metadata"
    assert str(refused.value) == (
        "metadata: is 65,537 bytes as JSON, over the limit of 65,536 (max_metadata_bytes)"
    )
    assert registry.journal.last_sequence == before
    assert not registry.is_online("over")
    await registry.flush()
    rows = await sql(database_url, "SELECT client_id FROM clients")
    assert [row[0] for row in rows] == ["at-cap"]


async def test_device_info_over_its_cap_is_refused_before_anything_is_journalled(
    database_url: str,
) -> None:
    async with Registry(database_url, max_device_info_bytes=4 * KIB) as registry:
        registry.add_client("dev", "linux", object(), ClientType.DEVICE)
        registry.set_device_info("dev", _metadata(4 * KIB))
        before = registry.journal.last_sequence
        with pytest.raises(InvalidArgumentError) as refused:
            registry.set_device_info("dev", _metadata(4 * KIB + 1))
        assert str(refused.value) == (
            "device_info: is 4,097 bytes as JSON, over the limit of 4,096 (max_device_info_bytes)"
        )
        with pytest.raises(InvalidArgumentError, match="max_device_info_bytes"):
            await registry.set_device_info_durable("dev", _metadata(5 * KIB))
        assert registry.journal.last_sequence == before
        assert registry.get_device_info("dev") == _metadata(4 * KIB)  # the cache kept
        await registry.flush()
    rows = await sql(database_url, "SELECT count(*) FROM device_info_snapshots")
    assert rows == [(1,)]
