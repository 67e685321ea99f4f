"""Malformed input after registration: a clear error frame (or close code) and nothing else
changed, for the sender's registry state and for every other connection."""

from __future__ import annotations

import json
from typing import Any

import pytest

from registry import ClientType
from tests.support import (
    Client,
    Clients,
    Server,
    assert_error,
    assert_server_frame,
    eventually,
    running_server,
    sql,
    store,
)

MAX_FRAME = 4096


@pytest.fixture
def db_url(database_url: str) -> str:
    """On SQLite and on PostgreSQL: these flows touch the store."""
    return database_url


async def _state(server: Server) -> tuple[Any, ...]:
    """Everything the tests check stays unchanged: live clients, sessions and stored rows."""
    await server.registry.flush()
    registry = server.registry
    return (
        sorted((c.client_id, c.client_type, c.connection_id) for c in registry.get_all_clients()),
        registry.get_device_info("dev-m"),
        [tuple(r) for r in await sql(server.database_url, "SELECT * FROM sessions")],
        [
            tuple(r)
            for r in await sql(
                server.database_url,
                "SELECT connection_id, disconnected_at FROM connections ORDER BY connection_id",
            )
        ],
    )


async def _still_served(*connections: Client) -> None:
    for client in connections:
        ack = await client.heartbeat()
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok")


@pytest.fixture
async def pair(server: Server, clients: Clients) -> tuple[Client, Client]:
    device = await clients.device("dev-m", {"os": "linux"})
    const = await clients.constellation("const-m", target_id="dev-m")
    return device, const


@pytest.mark.parametrize(
    ("raw", "starts"),
    [
        ("{not json", "Invalid message: not valid JSON"),
        ("", "Invalid message: not valid JSON"),
        ('{"type": "heartbeat", "status": "ok"', "Invalid message: not valid JSON"),
        ("NaNx", "Invalid message: not valid JSON"),
        ("[1, 2, 3]", "Invalid message: expected a JSON object"),
        ('"heartbeat"', "Invalid message: expected a JSON object"),
        ("null", "Invalid message: expected a JSON object"),
        ("1" * 5000, "Invalid message: "),  # over Python's integer-digits limit
        ('{"type": "heartbeat"}', "Invalid message: status"),
        ('{"status": "ok"}', "Invalid message: type"),
        ('{"type": 5, "status": "ok"}', "Invalid message: type"),
        ('{"type": "heartbeat", "status": "sleeping"}', "Invalid message: status"),
        ('{"type": "heartbeat", "status": "ok", "client_type": "robot"}', "Invalid message: "),
        ('{"type": "heartbeat", "status": "ok", "metadata": [1]}', "Invalid message: metadata"),
        ('{"type": "task", "status": "continue", "session_id": 7}', "Invalid message: "),
        (
            '{"type": "command_results", "status": "ok", "action_results": [{"status": "meh"}]}',
            "Invalid message: action_results",
        ),
        (
            '{"type": "command_results", "status": "ok", "action_results": {"status": "ok"}}',
            "Invalid message: action_results",
        ),
        ("[" * 3000 + "]" * 3000, "Invalid message: "),  # nested too deeply for json
        (
            '{"type": "heartbeat", "status": "ok", "metadata": '
            + '{"a": ' * 3000
            + "1"
            + "}" * 3001,
            "Invalid message: ",
        ),
    ],
)
async def test_bad_text_frame_gets_an_error_and_changes_nothing(
    server: Server, pair: tuple[Client, Client], raw: str, starts: str
) -> None:
    device, const = pair
    before = await _state(server)
    await device.send_raw(raw)
    frame = await device.recv()
    assert_server_frame(frame)
    assert (frame["type"], frame["status"]) == ("error", "error"), frame
    assert frame["error"].startswith(starts), frame["error"]
    await _still_served(device, const)
    await const.nothing()
    assert await _state(server) == before


async def test_binary_frame_gets_an_error_and_changes_nothing(
    server: Server, pair: tuple[Client, Client]
) -> None:
    device, const = pair
    before = await _state(server)
    await device.send_raw(json.dumps({"type": "heartbeat", "status": "ok"}).encode())
    assert_error(await device.recv(), "Binary frames are not supported; send JSON text frames")
    await device.send_raw(b"\x00\xff\xfe")
    assert (await device.recv())["type"] == "error"
    await _still_served(device, const)
    assert await _state(server) == before


@pytest.mark.parametrize(
    ("fields", "starts"),
    [
        ({"session_id": "nul\x00sid"}, "Invalid task: session_id"),
        ({"session_id": "s" * 256}, "Invalid task: session_id"),
        ({"session_id": "lone\ud800"}, "Invalid task: session_id"),
        ({"session_id": "   "}, "Invalid task: session_id"),
    ],
)
async def test_unstorable_task_fields_get_an_error_and_run_nothing(
    server: Server, pair: tuple[Client, Client], fields: dict[str, Any], starts: str
) -> None:
    device, const = pair
    before = await _state(server)
    frame = {
        "type": "task",
        "status": "continue",
        "client_type": "constellation",
        "target_id": "dev-m",
        "request": "x",
        **fields,
    }
    await const.send_raw(json.dumps(frame))
    answer = await const.recv()
    assert answer["type"] == "error"
    assert answer["error"].startswith(starts), answer["error"]
    await device.nothing()
    await _still_served(device, const)
    assert await _state(server) == before


async def test_unknown_keys_are_ignored(server: Server, pair: tuple[Client, Client]) -> None:
    device, _ = pair
    ack = await device.heartbeat(surprise={"nested": [1, 2]}, another=None)
    assert (ack["type"], ack["status"]) == ("heartbeat", "ok")


async def test_many_bad_frames_in_a_row_do_not_wear_the_connection_down(
    server: Server, pair: tuple[Client, Client]
) -> None:
    device, const = pair
    before = await _state(server)
    for number in range(100):
        await device.send_raw("{" if number % 2 else b"\x00")
    for _ in range(100):
        assert (await device.recv())["type"] == "error"
    await _still_served(device, const)
    assert await _state(server) == before


async def test_frame_over_the_limit_closes_with_1009_and_spares_others(db_url: str) -> None:
    async with running_server(db_url, max_frame_bytes=MAX_FRAME) as server:
        opened = Clients(server)
        try:
            device = await opened.device("dev-big", {"os": "linux"})
            const = await opened.constellation("const-big", target_id="dev-big")
            bystander = await opened.device("dev-calm")
            # Just under the limit is fine.
            padding = "x" * (MAX_FRAME - 200)
            ack = await device.heartbeat(padding=padding)
            assert (ack["type"], ack["status"]) == ("heartbeat", "ok")

            await device.send(type="heartbeat", status="ok", padding="x" * (MAX_FRAME * 4))
            code, _ = await device.closed()
            assert code == 1009

            async def record() -> Any:
                async with store(db_url) as history:
                    return (await history.connections("dev-big")).items[0]

            closed = await eventually(record, lambda r: r.disconnected_at is not None)
            assert closed.close_code == 1009
            assert closed.close_reason in (
                "message_too_big",
                f"frame exceeds limit of {MAX_FRAME} bytes",
            )
            assert not server.registry.is_online("dev-big")
            # Others are unaffected; the device info stays known.
            await _still_served(const, bystander)
            info = server.registry.get_client_info("const-big")
            assert info is not None
            assert info.client_type is ClientType.CONSTELLATION
            assert server.registry.get_device_info("dev-big") == {"os": "linux"}
            # And the id is free again.
            again = await opened.device("dev-big")
            await _still_served(again)
        finally:
            await opened.aclose()


async def test_register_frame_over_the_limit_registers_nothing(db_url: str) -> None:
    async with running_server(db_url, max_frame_bytes=MAX_FRAME) as server:
        opened = Clients(server)
        try:
            client = await opened.open()
            await client.send(
                type="register",
                status="ok",
                client_id="huge",
                metadata={"system_info": {"blob": "x" * (MAX_FRAME * 2)}},
            )
            code, _ = await client.closed()
            assert code == 1009
            assert server.registry.get_online_count() == 0
            await server.registry.flush()
            assert await sql(db_url, "SELECT client_id FROM clients") == []
        finally:
            await opened.aclose()


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ({"type": "error", "status": "error", "error": "bad \ud800"}, "bad \ud800"),
        ({"type": "tele\udfffport", "status": "ok"}, "Unknown message type: tele\udfffport"),
        (
            {
                "type": "task",
                "status": "continue",
                "client_type": "constellation",
                "target_id": "gh\ud800st",
            },
            "Device 'gh\ud800st' is not connected",
        ),
    ],
    ids=["error-echo", "unknown-type", "task-target"],
)
async def test_echoed_client_text_with_lone_surrogates_is_escaped_not_fatal(
    server: Server, pair: tuple[Client, Client], frame: dict[str, Any], expected: str
) -> None:
    device, const = pair
    before = await _state(server)
    await const.send_raw(json.dumps(frame))  # the surrogate travels as a \\u escape
    raw = await const.ws.recv()
    assert isinstance(raw, str)
    answer = json.loads(raw)
    assert_error(answer, expected)
    await _still_served(device, const)
    assert await _state(server) == before


async def test_device_info_request_id_with_a_lone_surrogate(
    server: Server, pair: tuple[Client, Client]
) -> None:
    _, const = pair
    await const.send_raw(
        json.dumps(
            {
                "type": "device_info_request",
                "status": "ok",
                "client_type": "constellation",
                "target_id": "dev-m",
                "request_id": "r\ud800",
            }
        )
    )
    answer = json.loads(await const.ws.recv())
    assert answer["type"] == "device_info_response"
    assert answer["response_id"] == "r\ud800"
    assert answer["result"] == {"os": "linux"}


async def test_dispatch_of_a_request_with_a_lone_surrogate(
    server: Server, pair: tuple[Client, Client]
) -> None:
    device, _ = pair
    async with server.http() as http:
        answer = await http.post(
            "/api/dispatch",
            content=json.dumps({"client_id": "dev-m", "request": "go \ud800"}),
            headers={"Content-Type": "application/json"},
        )
    assert answer.status_code == 200
    frame = json.loads(await device.ws.recv())
    assert frame["user_request"] == "go \ud800"
