"""Replacing a live registration: ``add_client(..., replacing=websocket)`` displaces exactly the
registration on that websocket whatever the duplicate policy (what the server does to a holder
that did not answer its ping), and a replaced registration's record is closed with code 4411,
reason ``replaced``, under either policy. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from registry import ClientType, DuplicateClientError, Registry
from registry.audit import AuditKind
from registry.registry import CODE_REPLACED


async def _closings(reg: Registry, client_id: str) -> dict[str, tuple[int | None, str | None]]:
    """Connection id -> (close code, close reason) of the client's closed connections."""
    await reg.flush()
    rows = (await reg.history.connections(client_id)).items
    return {
        row.connection_id: (row.close_code, row.close_reason) for row in rows if row.disconnected_at
    }


async def test_replacing_displaces_exactly_the_named_websocket(registry: Registry) -> None:
    first, second, stranger = object(), object(), object()
    registry.add_client("d1", "linux", first, ClientType.DEVICE)
    held = registry.get_client_info("d1")
    assert held is not None

    # Naming a websocket that does not hold the id replaces nothing: still a duplicate.
    with pytest.raises(DuplicateClientError):
        registry.add_client("d1", "linux", stranger, ClientType.DEVICE, replacing=second)
    assert registry.get_client("d1") is first

    registry.add_client("d1", "mac", second, ClientType.DEVICE, replacing=first)
    assert registry.get_client("d1") is second
    assert registry.get_online_count() == 1
    # The first is gone: a second claim naming it is a duplicate of the second.
    with pytest.raises(DuplicateClientError):
        registry.add_client("d1", "linux", stranger, ClientType.DEVICE, replacing=first)
    assert registry.get_client("d1") is second

    assert await _closings(registry, "d1") == {held.connection_id: (CODE_REPLACED, "replaced")}
    page = await registry.history.audit(kind=AuditKind.CLIENT_REPLACED, client_id="d1")
    assert [(e.details["connection_id"], e.details["code"]) for e in page.items] == [
        (held.connection_id, CODE_REPLACED)
    ]
    # Naming a websocket for an id nobody holds just registers it.
    registry.add_client("d2", "linux", stranger, ClientType.DEVICE, replacing=first)
    assert registry.get_client("d2") is stranger


async def test_the_replace_policy_records_the_same_code(database_url: str) -> None:
    async with Registry(database_url, on_duplicate="replace") as reg:
        first = object()
        reg.add_client("d1", "linux", first, ClientType.DEVICE)
        held = reg.get_client_info("d1")
        assert held is not None
        await reg.add_client_durable("d1", "linux", object(), ClientType.DEVICE)
        assert await _closings(reg, "d1") == {held.connection_id: (CODE_REPLACED, "replaced")}
