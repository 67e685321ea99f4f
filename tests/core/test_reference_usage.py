"""Every usage pattern of the reference ``WSManager`` document, run as written there.

The code inside each test follows the reference document line for line; only the
surroundings (the fake ``session_manager`` and ``device_client`` that are the caller's code,
websockets as sentinels) are supplied here. Each runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from registry import ClientType, Registry, SessionState, WSManager

logger = logging.getLogger("ws_manager_usage")

DEVICE_INFO: dict[str, Any] = {
    "os": "Windows",
    "os_version": "10.0.22631",
    "processor": "Intel64 Family 6 Model 140 Stepping 1",
    "memory_total": 17014632448,
    "memory_available": 8459743232,
    "screen_resolution": "1920x1080",
    "applications": [],
    "window_info": [],
}


class FakeSessionManager:
    """The caller's session manager: records cancellations, and (like a real one would)
    may drop the session from the registry while the caller is still iterating."""

    def __init__(self, ws_manager: Registry, *, remove_on_cancel: bool = False) -> None:
        self.ws_manager = ws_manager
        self.remove_on_cancel = remove_on_cancel
        self.cancelled: list[tuple[str, str | None]] = []
        self.device_sessions_seen: list[set[str]] = []

    async def cancel_task(self, session_id: str, reason: str | None = None) -> None:
        self.cancelled.append((session_id, reason))
        self.device_sessions_seen.append(self.ws_manager.get_device_sessions("device_1"))
        if self.remove_on_cancel:
            self.ws_manager.remove_session(session_id, state=SessionState.CANCELLED)


class FakeDeviceClient:
    def __init__(self) -> None:
        self.requests = 0

    async def get_device_info(self) -> dict[str, Any]:
        self.requests += 1
        return dict(DEVICE_INFO)


def connect_fleet(ws_manager: Registry) -> dict[str, object]:
    sockets = {name: object() for name in ("device_1", "device_2", "constellation_abc")}
    ws_manager.add_client("device_1", "windows", sockets["device_1"], ClientType.DEVICE, {})
    ws_manager.add_client("device_2", "Linux", sockets["device_2"], ClientType.DEVICE, {})
    ws_manager.add_client(
        "constellation_abc",
        "linux",
        sockets["constellation_abc"],
        ClientType.CONSTELLATION,
        {"role": "orchestrator"},
    )
    return sockets


# -- Registration Validation --------------------------------------------------------------------


def _validate_registration(ws_manager: Registry, constellation_request: Any) -> None:
    # Before allowing constellation registration
    target_device_id = constellation_request.target_id

    if not ws_manager.is_device_connected(target_device_id):
        raise ValueError(f"Target device {target_device_id} not connected")


async def test_registration_validation(registry: Registry) -> None:
    ws_manager = registry
    connect_fleet(ws_manager)
    _validate_registration(ws_manager, SimpleNamespace(target_id="device_1"))
    for target in ("device_9", "constellation_abc"):
        with pytest.raises(ValueError, match=f"Target device {target} not connected"):
            _validate_registration(ws_manager, SimpleNamespace(target_id=target))
    ws_manager.remove_client("device_1")
    with pytest.raises(ValueError, match="Target device device_1 not connected"):
        _validate_registration(ws_manager, SimpleNamespace(target_id="device_1"))


# -- Task Routing -------------------------------------------------------------------------------


def _route(ws_manager: Registry, target_device_id: str) -> object:
    # Get target WebSocket for task execution
    target_ws = ws_manager.get_client(target_device_id)

    if not target_ws:
        raise ValueError(f"Device {target_device_id} not found")
    return target_ws


async def test_task_routing(registry: Registry) -> None:
    ws_manager = registry
    sockets = connect_fleet(ws_manager)
    assert _route(ws_manager, "device_1") is sockets["device_1"]
    assert _route(ws_manager, "device_2") is sockets["device_2"]
    with pytest.raises(ValueError, match="Device device_9 not found"):
        _route(ws_manager, "device_9")
    ws_manager.remove_client("device_2")
    with pytest.raises(ValueError, match="Device device_2 not found"):
        _route(ws_manager, "device_2")


# -- Session Cleanup ----------------------------------------------------------------------------


@pytest.mark.parametrize("remove_on_cancel", [False, True])
async def test_session_cleanup(registry: Registry, remove_on_cancel: bool) -> None:
    ws_manager = registry
    connect_fleet(ws_manager)
    for sid in ("s1", "s2", "s3"):
        ws_manager.add_constellation_session("constellation_abc", sid)
        ws_manager.add_device_session("device_1", sid)
    ws_manager.add_device_session("device_2", "s-other")
    session_manager = FakeSessionManager(ws_manager, remove_on_cancel=remove_on_cancel)

    # When constellation disconnects
    constellation_id = "constellation_abc"
    session_ids = ws_manager.get_constellation_sessions(constellation_id)

    for session_id in session_ids:
        # Cancel each session
        await session_manager.cancel_task(session_id, "constellation_disconnected")

    # Clean up mappings
    ws_manager.remove_constellation_sessions(constellation_id)

    assert sorted(session_manager.cancelled) == [
        (sid, "constellation_disconnected") for sid in ("s1", "s2", "s3")
    ]
    assert ws_manager.get_constellation_sessions(constellation_id) == set()
    # As in the reference, the device map is a separate map: untouched unless the sessions
    # were removed.
    expected_device = set() if remove_on_cancel else {"s1", "s2", "s3"}
    assert ws_manager.get_device_sessions("device_1") == expected_device
    assert ws_manager.get_device_sessions("device_2") == {"s-other"}
    assert ws_manager.is_online(constellation_id)  # mappings only; the client stays
    await ws_manager.flush()
    page = await ws_manager.history.sessions(client_id=constellation_id)
    states = {record.session_id: record.state for record in page.items}
    expected_state = SessionState.CANCELLED if remove_on_cancel else SessionState.ACTIVE
    assert states == {sid: expected_state for sid in ("s1", "s2", "s3")}


# -- Device Info Caching ------------------------------------------------------------------------


async def _device_info_caching(
    ws_manager: Registry, device_client: FakeDeviceClient, device_id: str
) -> dict[str, Any] | None:
    # Cache device info on first request
    device_info = await device_client.get_device_info()
    ws_manager.set_device_info(device_id, device_info)

    # Later retrieval from cache
    cached_info = ws_manager.get_device_info(device_id)
    if cached_info:
        return cached_info
    else:
        # Re-request if not cached
        return None


async def _cache_effectively(
    ws_manager: Registry, device_id: str, request_device_info: Any
) -> dict[str, Any]:
    # Check cache first
    info = ws_manager.get_device_info(device_id)
    if not info:
        # Request and cache
        info = await request_device_info(device_id)
        ws_manager.set_device_info(device_id, info)
    return info


async def test_device_info_caching(registry: Registry) -> None:
    ws_manager = registry
    connect_fleet(ws_manager)
    device_client = FakeDeviceClient()
    assert await _device_info_caching(ws_manager, device_client, "device_1") == DEVICE_INFO
    assert device_client.requests == 1

    other_client = FakeDeviceClient()

    async def request_device_info(device_id: str) -> dict[str, Any]:
        return await other_client.get_device_info()

    assert await _cache_effectively(ws_manager, "device_1", request_device_info) == DEVICE_INFO
    assert other_client.requests == 0  # served from the cache
    assert await _cache_effectively(ws_manager, "device_2", request_device_info) == DEVICE_INFO
    assert other_client.requests == 1
    assert await _cache_effectively(ws_manager, "device_2", request_device_info) == DEVICE_INFO
    assert other_client.requests == 1
    await ws_manager.flush()
    assert len((await ws_manager.history.device_info("device_1")).items) == 1


# -- Clean Up Comprehensively (full_cleanup mutates the returned set) ----------------------------


async def test_full_cleanup(registry: Registry) -> None:
    ws_manager = registry
    connect_fleet(ws_manager)
    ws_manager.add_device_session("device_1", "s1")
    ws_manager.add_device_session("device_1", "s2")
    ws_manager.add_constellation_session("device_1", "s3")  # the same id in the other map
    ws_manager.add_device_session("device_2", "s3")
    session_manager = FakeSessionManager(ws_manager, remove_on_cancel=True)

    async def full_cleanup(client_id: str) -> None:
        # Cancel all sessions
        sessions = ws_manager.get_device_sessions(client_id)
        sessions.update(ws_manager.get_constellation_sessions(client_id))

        for sid in sessions:
            await session_manager.cancel_task(sid)

        # Remove session mappings
        ws_manager.remove_device_sessions(client_id)
        ws_manager.remove_constellation_sessions(client_id)

        # Remove client
        ws_manager.remove_client(client_id)

    await full_cleanup("device_1")

    assert sorted(sid for sid, _ in session_manager.cancelled) == ["s1", "s2", "s3"]
    # The caller's update() of the returned set never leaked into the registry's device map.
    assert session_manager.device_sessions_seen[0] == {"s1", "s2"}
    assert ws_manager.get_device_sessions("device_1") == set()
    assert ws_manager.get_constellation_sessions("device_1") == set()
    assert not ws_manager.is_online("device_1")
    assert ws_manager.get_client("device_1") is None
    assert ws_manager.get_device_sessions("device_2") == set()  # s3 was removed entirely
    assert ws_manager.is_online("device_2")
    assert ws_manager.get_online_count() == 2


async def test_full_cleanup_without_removing_sessions_keeps_other_maps(registry: Registry) -> None:
    ws_manager = registry
    connect_fleet(ws_manager)
    ws_manager.add_device_session("device_1", "s1")
    ws_manager.add_constellation_session("device_1", "s3")
    ws_manager.add_device_session("device_2", "s3")
    session_manager = FakeSessionManager(ws_manager)

    async def full_cleanup(client_id: str) -> None:
        sessions = ws_manager.get_device_sessions(client_id)
        sessions.update(ws_manager.get_constellation_sessions(client_id))
        for sid in sessions:
            await session_manager.cancel_task(sid)
        ws_manager.remove_device_sessions(client_id)
        ws_manager.remove_constellation_sessions(client_id)
        ws_manager.remove_client(client_id)

    await full_cleanup("device_1")
    assert session_manager.device_sessions_seen[0] == {"s1"}
    assert ws_manager.get_device_sessions("device_2") == {"s3"}
    assert ws_manager.get_device_sessions("device_1") == set()
    await ws_manager.flush()
    page = await ws_manager.history.sessions(client_id="device_1")
    states = {record.session_id: record.state for record in page.items}
    # s1 lost its only link: ended as cancelled; s3 still runs on device_2.
    assert states == {"s1": SessionState.CANCELLED, "s3": SessionState.ACTIVE}


# -- Validate Before Dispatch -------------------------------------------------------------------


def _dispatch(ws_manager: Registry, target_id: str) -> dict[str, str]:
    if not ws_manager.is_device_connected(target_id):
        return {"error": "Target device not available"}
    return {"status": "dispatched"}


async def test_validate_before_dispatch(registry: Registry) -> None:
    ws_manager = registry
    connect_fleet(ws_manager)
    assert _dispatch(ws_manager, "device_1") == {"status": "dispatched"}
    assert _dispatch(ws_manager, "constellation_abc") == {"error": "Target device not available"}
    assert _dispatch(ws_manager, "nobody") == {"error": "Target device not available"}


# -- Monitor Connection Health ------------------------------------------------------------------


async def test_monitor_connection_health(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    ws_manager = registry
    connect_fleet(ws_manager)
    caplog.set_level(logging.INFO, logger="ws_manager_usage")

    total = ws_manager.get_online_count()
    devices = len(ws_manager.get_clients_by_type(ClientType.DEVICE))
    constellations = len(ws_manager.get_clients_by_type(ClientType.CONSTELLATION))

    logger.info(f"Online: {total} ({devices} devices, {constellations} constellations)")

    assert "Online: 3 (2 devices, 1 constellations)" in caplog.messages
    ws_manager.remove_client("device_2")
    assert ws_manager.get_online_count() == 2
    assert len(ws_manager.get_clients_by_type(ClientType.DEVICE)) == 1


# -- Integration Points -------------------------------------------------------------------------


async def test_integration_points(registry: Registry) -> None:
    ws_manager = registry
    session_manager = FakeSessionManager(ws_manager)

    # WebSocket Handler
    client_id, platform, websocket = "device_1", "windows", object()
    client_type, metadata = ClientType.DEVICE, {"version": "3.0"}
    target_device_id = device_id = "device_1"
    before = time.time()
    # Registration
    ws_manager.add_client(client_id, platform, websocket, client_type, metadata)
    # Task routing
    target_ws = ws_manager.get_client(target_device_id)
    assert target_ws is websocket

    # Session Manager
    ws_manager.add_device_session(device_id, "s1")
    # Get affected sessions
    sessions = ws_manager.get_device_sessions(device_id)
    # Cancel each session
    for sid in sessions:
        await session_manager.cancel_task(sid)
    assert session_manager.cancelled == [("s1", None)]

    # API Router
    ws_manager.add_client("constellation_abc", "linux", object(), ClientType.CONSTELLATION, {})

    async def get_clients() -> list[dict[str, Any]]:
        clients = ws_manager.get_all_clients()
        return [
            {
                "id": c.client_id,
                "type": c.client_type.value,
                "platform": c.platform,
                "connected_at": c.connect_time,
            }
            for c in clients
        ]

    listed = sorted(await get_clients(), key=lambda row: row["id"])
    assert [(row["id"], row["type"], row["platform"]) for row in listed] == [
        ("constellation_abc", "constellation", "linux"),
        ("device_1", "device", "windows"),
    ]
    for row in listed:
        assert isinstance(row["connected_at"], float)
        assert before <= row["connected_at"] <= time.time()

    # Disconnection
    ws_manager.remove_client(client_id)
    assert ws_manager.get_client(target_device_id) is None
    assert [row["id"] for row in await get_clients()] == ["constellation_abc"]


# -- API Reference ------------------------------------------------------------------------------


def test_initialize_does_no_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``WSManager()`` with no arguments builds a registry without touching any database."""
    monkeypatch.chdir(tmp_path)
    # Initialize
    ws_manager = WSManager()
    assert isinstance(ws_manager, Registry)
    assert ws_manager.get_online_count() == 0
    assert ws_manager.get_all_clients() == []
    assert list(tmp_path.iterdir()) == []  # the default ./registry.db is not created yet


async def test_api_reference_block(registry: Registry) -> None:
    ws_manager = registry
    websocket = object()
    client_id, platform, client_type, metadata = "client_x", "linux", ClientType.DEVICE, {"a": 1}
    device_id, constellation_id, session_id = "device_1", "constellation_abc", "session_1"
    device_info = DEVICE_INFO
    ws_manager.add_client(device_id, "windows", object(), ClientType.DEVICE, {})
    ws_manager.add_client(constellation_id, "linux", object(), ClientType.CONSTELLATION, {})

    # Client management
    ws_manager.add_client(client_id, platform, websocket, client_type, metadata)
    client_info = ws_manager.get_client_info(client_id)
    ws = ws_manager.get_client(client_id)
    assert client_info is not None
    assert (client_info.client_id, client_info.platform, client_info.metadata) == (
        client_id,
        platform,
        metadata,
    )
    assert client_info.client_type is ClientType.DEVICE
    assert client_info.websocket is websocket
    assert ws is websocket
    ws_manager.remove_client(client_id)
    assert ws_manager.get_client_info(client_id) is None

    # Connection checking
    is_connected = ws_manager.is_device_connected(device_id)
    is_online = ws_manager.is_online(client_id)
    assert is_connected is True
    assert is_online is False

    # Session mapping
    ws_manager.add_constellation_session(constellation_id, session_id)
    ws_manager.add_device_session(device_id, session_id)
    sessions = ws_manager.get_constellation_sessions(constellation_id)
    assert sessions == {session_id}
    sessions = ws_manager.get_device_sessions(device_id)
    assert sessions == {session_id}
    ws_manager.remove_session(session_id)
    assert ws_manager.get_constellation_sessions(constellation_id) == set()
    assert ws_manager.get_device_sessions(device_id) == set()

    # Device info
    ws_manager.set_device_info(device_id, device_info)
    info = ws_manager.get_device_info(device_id)
    assert info == DEVICE_INFO

    # Statistics
    count = ws_manager.get_online_count()
    clients = ws_manager.get_all_clients()
    devices = ws_manager.get_clients_by_type(ClientType.DEVICE)
    assert count == 2
    assert sorted(c.client_id for c in clients) == [constellation_id, device_id]
    assert [d.client_id for d in devices] == [device_id]

    # Also by platform, case-insensitively, as the reference's lower() comparison does.
    assert [c.client_id for c in ws_manager.get_clients_by_platform("WINDOWS")] == [device_id]
    assert ws_manager.get_clients_by_platform("macos") == []
