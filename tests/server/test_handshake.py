"""docs/protocol.md, "Handshake": register first, the ack, target and duplicate checks."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from registry import ClientType
from tests.support import (
    Clients,
    Server,
    assert_error,
    assert_server_frame,
    running_server,
    sql,
    until,
)


@pytest.fixture
def db_url(database_url: str) -> str:
    """On SQLite and on PostgreSQL: these flows touch the store."""
    return database_url


async def _nothing_registered(server: Server) -> None:
    """No client is live and the store holds no client or connection row."""
    assert server.registry.get_online_count() == 0
    await server.registry.flush()
    assert await sql(server.database_url, "SELECT client_id FROM clients") == []
    assert await sql(server.database_url, "SELECT connection_id FROM connections") == []


async def test_registration_ack_is_one_complete_heartbeat_frame(
    server: Server, clients: Clients
) -> None:
    client = await clients.open()
    await client.send(
        type="register",
        status="ok",
        client_type="device",
        client_id="dev-1",
        metadata={"platform": "linux", "extra": [1, 2]},
        unknown_key="ignored",
    )
    ack = await client.recv()
    assert_server_frame(ack)
    assert ack["type"] == "heartbeat"
    assert ack["status"] == "ok"
    uuid.UUID(ack["response_id"])
    stamp = datetime.fromisoformat(ack["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    unset = set(ack) - {"type", "status", "timestamp", "response_id"}
    assert {name: ack[name] for name in unset} == dict.fromkeys(unset)
    # Exactly one frame after register: nothing else follows unasked.
    await client.nothing()

    info = server.registry.get_client_info("dev-1")
    assert info is not None
    assert info.client_type is ClientType.DEVICE
    assert info.platform == "linux"
    assert info.metadata == {"platform": "linux", "extra": [1, 2]}
    # The registration is durable before the ack: the row is there without a flush.
    rows = await sql(
        server.database_url,
        "SELECT client_type, platform, disconnected_at FROM connections WHERE client_id = 'dev-1'",
    )
    assert [tuple(row) for row in rows] == [("device", "linux", None)]


async def test_platform_defaults_to_windows_and_role_to_device(
    server: Server, clients: Clients
) -> None:
    client = await clients.open()
    await client.send(type="register", status="ok", client_id="plain")
    ack = await client.recv()
    assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
    info = server.registry.get_client_info("plain")
    assert info is not None
    assert (info.platform, info.client_type) == ("windows", ClientType.DEVICE)


async def test_device_system_info_is_stored_as_device_info(
    server: Server, clients: Clients
) -> None:
    system_info = {"os": "linux", "cpu": 8, "tags": ["gpu"]}
    await clients.device("dev-info", system_info)
    assert server.registry.get_device_info("dev-info") == system_info
    rows = await sql(
        server.database_url,
        "SELECT device_id FROM device_info_snapshots WHERE device_id = 'dev-info'",
    )
    assert len(rows) == 1


@pytest.mark.parametrize(
    ("first", "text"),
    [
        (
            {"type": "heartbeat", "status": "ok", "client_id": "sneaky"},
            "First message must be a register message",
        ),
        (
            {
                "type": "task",
                "status": "continue",
                "client_id": "sneaky",
                "request": "run",
                "session_id": "s",
            },
            "First message must be a register message",
        ),
        (
            {"type": "register", "status": "ok"},
            "Client ID is required for WebSocket registration",
        ),
        (
            {"type": "register", "status": "ok", "client_id": ""},
            "Client ID is required for WebSocket registration",
        ),
    ],
)
async def test_bad_first_frame_gets_error_then_close_and_registers_nothing(
    server: Server, clients: Clients, first: dict[str, Any], text: str
) -> None:
    client = await clients.open()
    await client.send(**first)
    assert_error(await client.recv(), text)
    code, _ = await client.closed()
    assert code == 4400
    assert client.frames[1:] == []
    await _nothing_registered(server)


@pytest.mark.parametrize(
    "first",
    [
        '{"type": "register", "status": "ok", "client_id": "x"',  # truncated JSON
        "not json at all",
        '["register"]',
        '{"type": "register", "status": "bogus", "client_id": "x"}',
        '{"type": "register", "status": "ok", "client_id": "x", "client_type": "robot"}',
        '{"type": "register", "client_id": "x"}',  # status missing
        '{"type": "nonsense", "status": "ok", "client_id": "x"}',
    ],
)
async def test_invalid_first_frame_closes_and_registers_nothing(
    server: Server, clients: Clients, first: str
) -> None:
    client = await clients.open()
    await client.send_raw(first)
    code, _ = await client.closed()
    assert code == 4400
    # At most the one error frame the protocol allows before the close.
    assert len(client.frames) <= 1
    for frame in client.frames:
        assert frame["type"] == "error"
        assert frame["error"]
    await _nothing_registered(server)


async def test_binary_first_frame_closes_without_registering(
    server: Server, clients: Clients
) -> None:
    client = await clients.open()
    await client.send_raw(b'{"type": "register", "status": "ok", "client_id": "bin"}')
    code, _ = await client.closed()
    assert code == 4400
    assert client.frames == []
    await _nothing_registered(server)


@pytest.mark.parametrize(
    "client_id",
    ["nul\x00id", "surrogate\ud800", "x" * 256, "   "],
    ids=["nul", "surrogate", "too-long", "blank"],
)
async def test_unstorable_client_id_is_refused_at_registration(
    server: Server, clients: Clients, client_id: str
) -> None:
    client = await clients.open()
    # json.dumps escapes the lone surrogate, as a client's encoder would.
    await client.send_raw(json.dumps({"type": "register", "status": "ok", "client_id": client_id}))
    frame = await client.recv()
    assert frame["type"] == "error"
    assert frame["error"].startswith("Invalid registration: client_id: ")
    code, _ = await client.closed()
    assert code == 4400
    await _nothing_registered(server)


async def test_unstorable_system_info_is_refused_and_unregistered(
    server: Server, clients: Clients
) -> None:
    client = await clients.open()
    await client.send(
        type="register",
        status="ok",
        client_id="dev-bad-info",
        metadata={"platform": "linux", "system_info": {"os": "nul\x00"}},
    )
    frame = await client.recv()
    assert frame["type"] == "error"
    assert frame["error"].startswith("Invalid registration: ")
    code, _ = await client.closed()
    assert code == 4400
    assert not server.registry.is_online("dev-bad-info")
    assert server.registry.get_device_info("dev-bad-info") is None
    # The id is free again at once.
    again = await clients.device("dev-bad-info", {"os": "linux"})
    assert (await again.heartbeat())["status"] == "ok"


@pytest.mark.parametrize("target_kind", ["absent", "constellation"])
async def test_constellation_target_must_be_a_connected_device(
    server: Server, clients: Clients, target_kind: str
) -> None:
    if target_kind == "constellation":
        await clients.constellation("other-const")
        target = "other-const"
    else:
        target = "ghost-device"
    client = await clients.open()
    await client.send(
        type="register",
        status="ok",
        client_type="constellation",
        client_id="const-1",
        target_id=target,
    )
    assert_error(await client.recv(), f"Target device '{target}' is not connected")
    code, _ = await client.closed()
    assert code == 4404
    assert client.frames[1:] == []
    assert not server.registry.is_online("const-1")
    await server.registry.flush()
    assert await sql(server.database_url, "SELECT 1 FROM clients WHERE client_id = 'const-1'") == []


async def test_constellation_with_connected_target_is_accepted(
    server: Server, clients: Clients
) -> None:
    await clients.device("dev-t")
    const = await clients.constellation("const-t", target_id="dev-t")
    info = server.registry.get_client_info("const-t")
    assert info is not None
    assert info.client_type is ClientType.CONSTELLATION
    assert (await const.heartbeat())["type"] == "heartbeat"


async def test_duplicate_client_id_is_refused_and_first_connection_keeps_working(
    server: Server, clients: Clients
) -> None:
    first = await clients.device("dup", {"os": "first"})
    first_connection = server.registry.get_client_info("dup")
    assert first_connection is not None

    second = await clients.open()
    await second.send(
        type="register",
        status="ok",
        client_id="dup",
        metadata={"platform": "mac", "system_info": {"os": "second"}},
    )
    assert_error(
        await second.recv(),
        "client_id 'dup' is already registered; duplicate registrations are not allowed",
    )
    code, _ = await second.closed()
    assert code == 4409

    # The first connection is untouched, in memory and in the store, and still answers.
    info = server.registry.get_client_info("dup")
    assert info is not None
    assert info.connection_id == first_connection.connection_id
    assert info.platform == "linux"
    assert server.registry.get_device_info("dup") == {"os": "first"}
    ack = await first.heartbeat()
    assert_server_frame(ack)
    assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
    await server.registry.flush()
    rows = await sql(
        server.database_url,
        "SELECT disconnected_at FROM connections WHERE client_id = 'dup'",
    )
    assert [row[0] for row in rows] == [None]


async def test_handshake_timeout_closes_a_silent_connection(db_url: str) -> None:
    async with running_server(db_url, handshake_timeout=0.3) as server:
        clients = Clients(server)
        try:
            client = await clients.open()
            code, reason = await client.closed()
            assert code == 4408
            assert reason == "idle_timeout"
            assert server.registry.get_online_count() == 0
        finally:
            await clients.aclose()


async def test_nothing_is_sent_to_a_client_before_its_registration_ack(
    server: Server, clients: Clients
) -> None:
    """A dispatch racing the registration must not reach the client before the ack."""
    stop = asyncio.Event()

    async def dispatch_until_accepted() -> int:
        attempts = 0
        async with server.http() as http:
            while not stop.is_set():
                attempts += 1
                answer = await http.post(
                    "/api/dispatch", json={"client_id": "racer", "request": "go"}
                )
                if answer.status_code == 200:
                    return attempts
        return attempts

    for _ in range(5):
        stop.clear()
        client = await clients.open()
        hammer = asyncio.create_task(dispatch_until_accepted())
        await asyncio.sleep(0.01)
        await client.send(type="register", status="ok", client_id="racer")
        first = await client.recv()
        stop.set()
        await hammer
        assert (first["type"], first["status"]) == ("heartbeat", "ok"), first
        # The dispatch is a session of "racer": the previous round's, failed by that round's
        # close, may be announced (task_end) to this connection before this round's task.
        await client.recv_type("task")
        await client.close()
        await until(lambda: not server.registry.is_online("racer"))
