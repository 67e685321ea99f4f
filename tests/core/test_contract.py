"""The registry keeps the reference ``WSManager`` contract, and makes it durable.

Every test runs on a real SQLite file and on the real PostgreSQL (``database_url`` fixture).
Reads of the database are made with a separate engine, never through the registry under test.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import event, text

import registry
from registry import (
    ClientInfo,
    ClientType,
    DuplicateClientError,
    Registry,
    SessionOwnershipError,
    SessionState,
    WSManager,
)
from registry.audit import AuditKind
from registry.store.dialect import create_engine
from registry.types import AuditEvent, LinkRole
from tests.databases import POSTGRES_ADMIN_URL, admin

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The reference WSManager's methods and their positional arguments (as in bench/baseline.py).
REFERENCE_METHODS: dict[str, list[str]] = {
    "add_client": ["client_id", "platform", "websocket", "client_type", "metadata"],
    "get_client": ["client_id"],
    "get_client_info": ["client_id"],
    "get_all_clients": [],
    "remove_client": ["client_id"],
    "is_device_connected": ["device_id"],
    "is_online": ["client_id"],
    "add_constellation_session": ["constellation_id", "session_id"],
    "get_constellation_sessions": ["constellation_id"],
    "remove_constellation_sessions": ["constellation_id"],
    "add_device_session": ["device_id", "session_id"],
    "get_device_sessions": ["device_id"],
    "remove_device_sessions": ["device_id"],
    "remove_session": ["session_id"],
    "set_device_info": ["device_id", "device_info"],
    "get_device_info": ["device_id"],
    "get_online_count": [],
    "get_clients_by_type": ["client_type"],
    "get_clients_by_platform": ["platform"],
}

DEVICE_INFO: dict[str, Any] = {
    "os": "Windows",
    "os_version": "10.0.22631",
    "processor": "Intel64 Family 6 Model 140 Stepping 1",
    "memory_total": 17014632448,
    "memory_available": 8459743232,
    "screen_resolution": "1920x1080",
    "applications": ["notepad", {"name": "excel", "version": "16.0"}],
    "window_info": [],
}


# -- helpers -----------------------------------------------------------------------------------


def read_now(url: str, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """Run ``sql`` on a separate engine in another thread and block until it answers.

    Blocking the test's event loop means the registry's writer cannot commit anything while we
    look: what we find was durable when the registry call returned.
    """

    async def query() -> list[tuple[Any, ...]]:
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:
                result = await connection.execute(text(sql), params)
                return [tuple(row) for row in result.all()]
        finally:
            await engine.dispose()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, query()).result()


async def my_audit(reg: Registry) -> list[AuditEvent]:
    """This run's audit events, in event order."""
    events: list[AuditEvent] = []
    cursor = None
    while True:
        page = await reg.history.audit(limit=1000, cursor=cursor)
        events.extend(event for event in page.items if event.node_id == reg.node_id)
        cursor = page.next_cursor
        if cursor is None:
            return events


def kinds(events: list[AuditEvent]) -> list[str]:
    return [event.kind for event in events]


# -- the API's shape ---------------------------------------------------------------------------


def test_public_imports_and_alias() -> None:
    assert WSManager is Registry
    assert registry.WSManager is registry.Registry
    assert registry.ClientInfo is ClientInfo
    assert issubclass(registry.DuplicateClientError, registry.RegistryError)
    # Members are the strings themselves (a StrEnum), which mypy's literal types do not see.
    assert cast(str, ClientType.DEVICE) == "device"
    assert cast(str, ClientType.CONSTELLATION) == "constellation"
    assert ClientType("device") is ClientType.DEVICE
    assert {field for field in ClientInfo.__dataclass_fields__} >= {
        "client_id",
        "platform",
        "websocket",
        "client_type",
        "metadata",
        "connect_time",
    }


@pytest.mark.parametrize("name", sorted(REFERENCE_METHODS))
def test_reference_method_has_same_name_and_positional_arguments(name: str) -> None:
    method = getattr(Registry, name, None)
    assert method is not None, f"Registry lacks the reference method {name}"
    assert not inspect.iscoroutinefunction(method), f"{name} must stay synchronous"
    parameters = list(inspect.signature(method).parameters.values())
    assert parameters[0].name == "self"
    positional = [
        p.name for p in parameters[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert positional == REFERENCE_METHODS[name]
    extra = [p for p in parameters[1:] if p.name not in REFERENCE_METHODS[name]]
    for parameter in extra:
        assert parameter.kind is parameter.KEYWORD_ONLY, (name, parameter.name)
        assert parameter.default is not parameter.empty, (name, parameter.name)


# -- copies ------------------------------------------------------------------------------------


async def test_getters_return_copies(registry: Registry, database_url: str) -> None:
    ws_d, ws_c = object(), object()
    registry.add_client("d1", "Windows", ws_d, ClientType.DEVICE, {"nested": {"a": [1]}})
    registry.add_client("c1", "linux", ws_c, ClientType.CONSTELLATION, {"k": "v"})
    registry.add_device_session("d1", "s1")
    registry.add_constellation_session("c1", "s1")
    registry.set_device_info("d1", DEVICE_INFO)

    device_sessions = registry.get_device_sessions("d1")
    device_sessions.add("intruder")
    device_sessions.discard("s1")
    constellation_sessions = registry.get_constellation_sessions("c1")
    constellation_sessions.clear()
    unknown = registry.get_device_sessions("nobody")
    unknown.add("s-ghost")
    registry.get_constellation_sessions("nobody").add("s-ghost")
    assert registry.get_device_sessions("d1") == {"s1"}
    assert registry.get_constellation_sessions("c1") == {"s1"}
    assert registry.get_device_sessions("nobody") == set()
    assert registry.get_constellation_sessions("nobody") == set()

    info: ClientInfo | None  # each copy below, then the client's info again
    for clients in (
        registry.get_all_clients(),
        registry.get_clients_by_type(ClientType.DEVICE),
        registry.get_clients_by_platform("windows"),
    ):
        for info in clients:
            info.metadata.clear()
            info.platform = "hacked"
            info.client_type = ClientType.CONSTELLATION
        clients.clear()
    info = registry.get_client_info("d1")
    assert info is not None
    info.metadata["nested"]["a"].append(2)
    info.metadata["new"] = True
    info.client_id = "renamed"

    assert registry.get_online_count() == 2
    again = registry.get_client_info("d1")
    assert again is not None
    assert again.client_id == "d1"
    assert again.platform == "Windows"
    assert again.client_type is ClientType.DEVICE
    assert again.metadata == {"nested": {"a": [1]}}
    assert again.websocket is ws_d
    assert [c.client_id for c in registry.get_clients_by_type(ClientType.DEVICE)] == ["d1"]
    assert [c.client_id for c in registry.get_clients_by_platform("WINDOWS")] == ["d1"]
    assert registry.is_device_connected("d1")

    document = registry.get_device_info("d1")
    assert document == DEVICE_INFO
    assert document is not None
    document["applications"].append("malware")
    document["os"] = "TempleOS"
    assert registry.get_device_info("d1") == DEVICE_INFO

    await registry.flush()
    rows = read_now(database_url, "SELECT metadata FROM connections WHERE client_id = 'd1'")
    stored = rows[0][0] if isinstance(rows[0][0], dict) else json.loads(rows[0][0])
    assert stored == {"nested": {"a": [1]}}


async def test_add_client_keeps_a_private_copy_of_the_callers_metadata(
    registry: Registry,
) -> None:
    """Mutating the dict passed to add_client (or set_device_info) afterwards changes nothing."""
    metadata: dict[str, Any] = {"tags": ["a"]}
    document: dict[str, Any] = {"apps": ["a"]}
    registry.add_client("d1", "linux", object(), ClientType.DEVICE, metadata)
    registry.set_device_info("d1", document)
    metadata["tags"].append("b")
    metadata["extra"] = 1
    document["apps"].append("b")
    info = registry.get_client_info("d1")
    assert info is not None
    assert info.metadata == {"tags": ["a"]}
    assert registry.get_device_info("d1") == {"apps": ["a"]}


# -- duplicates and removal ----------------------------------------------------------------------


async def test_duplicate_add_is_refused_and_first_connection_intact(
    registry: Registry, database_url: str
) -> None:
    first, second = object(), object()
    registry.add_client("d1", "windows", first, ClientType.DEVICE, {"n": 1})
    with pytest.raises(DuplicateClientError) as caught:
        registry.add_client("d1", "linux", second, ClientType.CONSTELLATION, {"n": 2})
    assert caught.value.client_id == "d1"
    with pytest.raises(DuplicateClientError):
        await registry.add_client_durable("d1", "linux", second, ClientType.DEVICE, {})
    assert registry.get_client("d1") is first
    info = registry.get_client_info("d1")
    assert info is not None
    assert (info.platform, info.client_type, info.metadata) == (
        "windows",
        ClientType.DEVICE,
        {"n": 1},
    )
    assert registry.get_online_count() == 1
    await registry.flush()
    rows = read_now(
        database_url,
        "SELECT platform, disconnected_at FROM connections WHERE client_id = 'd1'",
    )
    assert rows == [("windows", None)]
    events = await my_audit(registry)
    assert kinds(events).count(AuditKind.CLIENT_DUPLICATE_REFUSED) == 2
    assert kinds(events).count(AuditKind.CLIENT_REGISTERED) == 1


async def test_duplicate_with_replace_policy_closes_the_old_row(database_url: str) -> None:
    first, second = object(), object()
    async with Registry(database_url, on_duplicate="replace") as reg:
        reg.add_client("d1", "windows", first, ClientType.DEVICE)
        old = reg.get_client_info("d1")
        reg.add_client("d1", "linux", second, ClientType.DEVICE, {"v": 2})
        new = reg.get_client_info("d1")
        assert old is not None
        assert new is not None
        assert reg.get_client("d1") is second
        assert reg.get_online_count() == 1
        assert new.connection_id != old.connection_id
        await reg.flush()
        rows = dict(
            (row[0], row[1:])
            for row in read_now(
                database_url,
                "SELECT connection_id, platform, disconnected_at, close_reason "
                "FROM connections WHERE client_id = 'd1'",
            )
        )
        assert set(rows) == {old.connection_id, new.connection_id}
        platform, disconnected_at, reason = rows[old.connection_id]
        assert (platform, reason) == ("windows", "replaced")
        assert disconnected_at is not None
        assert rows[new.connection_id] == ("linux", None, None)
        assert AuditKind.CLIENT_REPLACED in kinds(await my_audit(reg))


async def test_remove_client_frees_the_id_at_once(registry: Registry, database_url: str) -> None:
    first, second = object(), object()
    registry.add_client("d1", "windows", first, ClientType.DEVICE)
    old = registry.get_client_info("d1")
    registry.remove_client("d1", code=4001, reason="bye")
    assert not registry.is_online("d1")
    assert registry.get_client("d1") is None
    assert registry.get_online_count() == 0
    registry.add_client("d1", "windows", second, ClientType.DEVICE)  # no DuplicateClientError
    assert registry.get_client("d1") is second
    registry.remove_client("nobody")  # the reference's no-op
    await registry.flush()
    assert old is not None
    rows = {
        row[0]: row[1:]
        for row in read_now(
            database_url,
            "SELECT connection_id, close_code, close_reason, disconnected_at IS NULL "
            "FROM connections WHERE client_id = 'd1'",
        )
    }
    assert len(rows) == 2
    assert rows.pop(old.connection_id) == (4001, "bye", False)
    assert list(rows.values()) == [(None, None, True)]
    registry.remove_client("d1")
    await registry.flush()
    second_rows = read_now(
        database_url,
        "SELECT close_code, close_reason FROM connections WHERE client_id = 'd1' "
        "AND connection_id <> :old",
        old=old.connection_id,
    )
    assert second_rows == [(None, "removed")]


class _NoScanDict(dict[str, set[str]]):
    """A dict that refuses to be scanned: lookups and deletes only."""

    def _scan(self, *args: Any) -> Iterator[Any]:
        raise AssertionError("the session map was scanned")

    __iter__ = _scan
    keys = values = items = _scan  # type: ignore[assignment]


async def test_remove_session_touches_only_its_links(registry: Registry) -> None:
    for i in range(50):
        registry.add_device_session(f"d{i}", f"s{i}")
        registry.add_constellation_session("c", f"s{i}")
    maps = registry._live.session_maps  # white-box: prove no scan of the maps
    originals = dict(maps)
    try:
        for role in LinkRole:
            maps[role] = _NoScanDict(dict.items(originals[role]))
        registry.remove_session("s7")
        registry.remove_session("s-unknown")
        assert registry.get_device_sessions("d7") == set()
        assert "s7" not in registry.get_constellation_sessions("c")
    finally:
        for role in LinkRole:
            maps[role] = dict(dict.items(maps[role]))
    assert registry.get_device_sessions("d8") == {"s8"}
    assert registry.get_constellation_sessions("c") == {f"s{i}" for i in range(50) if i != 7}
    assert registry.get_session("s7") is None
    await registry.flush()
    page = await registry.history.sessions(state=SessionState.COMPLETED)
    assert [record.session_id for record in page.items] == ["s7"]


# -- durability and order ------------------------------------------------------------------------


async def test_flush_makes_every_mutation_durable_in_order(
    registry: Registry, database_url: str
) -> None:
    expected: list[tuple[str, str | None, str | None]] = []
    for i in range(12):
        cid = f"x{i}"
        registry.add_client(cid, "linux", object(), ClientType.DEVICE)
        expected.append((AuditKind.CLIENT_REGISTERED, cid, None))
        registry.add_device_session(cid, f"s{i}")
        expected.append((AuditKind.SESSION_BOUND, cid, f"s{i}"))
        if i % 3 == 0:
            await asyncio.sleep(0)  # let the writer commit part of it: several batches
        registry.remove_session(f"s{i}", state="failed", reason="boom")
        expected.append((AuditKind.SESSION_UNBOUND, cid, f"s{i}"))
        expected.append((AuditKind.SESSION_ENDED, cid, f"s{i}"))
        registry.set_device_info(cid, {"i": i})
        expected.append((AuditKind.DEVICE_INFO_CHANGED, cid, None))
        registry.remove_client(cid, code=1000)
        expected.append((AuditKind.CLIENT_REMOVED, cid, None))
    await registry.flush()
    events = [e for e in await my_audit(registry) if e.kind != AuditKind.NODE_STARTED]
    assert [(e.kind, e.client_id, e.session_id) for e in events] == expected
    assert [e.event_id for e in events] == sorted(e.event_id for e in events)
    assert [e.at for e in events] == sorted(e.at for e in events)
    rows = {
        row[0]: row[1:]
        for row in read_now(
            database_url,
            "SELECT client_id, connected_at, close_code, disconnected_at >= connected_at "
            "FROM connections",
        )
    }
    assert sorted(rows) == sorted(f"x{i}" for i in range(12))
    assert all(row[1:] == (1000, True) for row in rows.values())
    opened = [rows[f"x{i}"][0] for i in range(12)]
    assert opened == sorted(opened)
    states = read_now(database_url, "SELECT state, end_reason FROM sessions")
    assert states == [("failed", "boom")] * 12
    assert read_now(database_url, "SELECT count(*) FROM session_links WHERE unbound_at IS NULL")[
        0
    ] == (0,)
    assert read_now(database_url, "SELECT count(*) FROM device_info_snapshots")[0] == (12,)


async def test_close_and_reopen_restores_sessions_and_device_info(database_url: str) -> None:
    async with Registry(database_url) as reg:
        reg.add_client("d1", "windows", object(), ClientType.DEVICE)
        reg.add_client("c1", "linux", object(), ClientType.CONSTELLATION)
        reg.add_constellation_session("c1", "s1")
        reg.add_device_session("d1", "s1")
        reg.add_device_session("d1", "s2")
        reg.add_device_session("d2", "s-done")
        reg.remove_session("s-done")
        reg.set_device_info("d1", DEVICE_INFO)
        first_node = reg.node_id
    async with Registry(database_url) as reg:
        assert reg.node_id != first_node
        assert reg.get_online_count() == 0
        assert not reg.is_online("d1")
        assert reg.get_device_sessions("d1") == {"s1", "s2"}
        assert reg.get_constellation_sessions("c1") == {"s1"}
        assert reg.get_device_sessions("d2") == set()
        assert reg.get_device_info("d1") == DEVICE_INFO
        interrupted = {s.session_id: s for s in reg.get_interrupted_sessions("c1")}
        assert set(interrupted) == {"s1"}
        assert interrupted["s1"].owner_id == "c1"
        assert interrupted["s1"].executor_id == "d1"
        assert interrupted["s1"].state is SessionState.INTERRUPTED
        assert [s.session_id for s in reg.get_interrupted_sessions("d1")] == ["s2"]
        connections = read_now(
            database_url, "SELECT client_id, close_reason, disconnected_at IS NULL FROM connections"
        )
        assert sorted(connections) == [
            ("c1", "server_shutdown", False),
            ("d1", "server_shutdown", False),
        ]
        states = dict(read_now(database_url, "SELECT session_id, state FROM sessions"))
        assert states == {"s1": "interrupted", "s2": "interrupted", "s-done": "completed"}
        stopped = read_now(
            database_url, "SELECT stop_reason FROM nodes WHERE node_id = :n", n=first_node
        )
        assert stopped == [("shutdown",)]
        # The restored session ends normally and leaves the maps.
        reg.remove_session("s1", state=SessionState.FAILED, reason="server restarted")
        assert reg.get_constellation_sessions("c1") == set()
        assert reg.get_device_sessions("d1") == {"s2"}
        reg.set_device_info("d1", dict(reversed(list(DEVICE_INFO.items()))))  # same content
        await reg.flush()
        assert read_now(database_url, "SELECT count(*) FROM device_info_snapshots")[0] == (1,)
        assert read_now(database_url, "SELECT state FROM sessions WHERE session_id = 's1'") == [
            ("failed",)
        ]


async def test_start_after_close_is_a_new_node_run(database_url: str) -> None:
    reg = Registry(database_url)
    await reg.start()
    reg.add_client("d1", "linux", object(), ClientType.DEVICE)
    first = reg.node_id
    await reg.close()
    await reg.start()
    try:
        assert reg.node_id != first
        assert reg.get_online_count() == 0
        reg.add_client("d1", "linux", object(), ClientType.DEVICE)
        await reg.flush()
    finally:
        await reg.close()
    nodes = read_now(database_url, "SELECT stop_reason FROM nodes")
    assert nodes == [("shutdown",), ("shutdown",)]


CRASHING_RUN = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from registry import ClientType, Registry

    async def main() -> None:
        reg = Registry(sys.argv[1], auto_migrate=True, node_name="node-a")
        await reg.start()
        reg.add_client("d1", "linux", object(), ClientType.DEVICE)
        reg.add_client("c1", "linux", object(), ClientType.CONSTELLATION)
        await reg.open_session("s1", owner_id="c1", executor_id="d1", task_name="t")
        await reg.flush()
        print(reg.node_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_restart_after_a_crash_recovers(database_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_RUN,
        database_url,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    crashed_node = stdout.decode().strip()
    assert read_now(database_url, "SELECT count(*) FROM connections WHERE disconnected_at IS NULL")[
        0
    ] == (2,)
    # The same node name: the new run knows the crashed one was itself (on PostgreSQL too).
    async with Registry(database_url, node_name="node-a") as reg:
        assert read_now(
            database_url, "SELECT count(*) FROM connections WHERE disconnected_at IS NULL"
        )[0] == (0,)
        reasons = read_now(database_url, "SELECT DISTINCT close_reason FROM connections")
        assert reasons == [("server_restart",)]
        # Closed at the crashed run's last heartbeat, but never before they were opened.
        for record in [
            *(await reg.history.connections("d1")).items,
            *(await reg.history.connections("c1")).items,
        ]:
            assert record.duration_seconds is not None
            assert record.duration_seconds >= 0, record
        assert reg.get_device_sessions("d1") == {"s1"}
        assert reg.get_constellation_sessions("c1") == {"s1"}
        assert [s.session_id for s in reg.get_interrupted_sessions("c1")] == ["s1"]
        with pytest.raises(SessionOwnershipError):
            await reg.open_session("s1", owner_id="intruder", executor_id="d1")
        recovered = kinds(await my_audit(reg))
        assert recovered.count(AuditKind.CONNECTION_RECOVERED) == 2
        assert recovered.count(AuditKind.SESSION_INTERRUPTED) == 1
        assert AuditKind.NODE_RECOVERED in recovered
        node = read_now(
            database_url, "SELECT stop_reason FROM nodes WHERE node_id = :n", n=crashed_node
        )
        assert node == [("server_restart",)]


# -- the durable variants ------------------------------------------------------------------------


async def test_durable_variants_return_once_durable(registry: Registry, database_url: str) -> None:
    info = await registry.add_client_durable(
        "d1", "windows", object(), ClientType.DEVICE, {"k": 1}, remote_address="10.0.0.1:5"
    )
    rows = read_now(
        database_url,
        "SELECT client_id, remote_address, disconnected_at FROM connections "
        "WHERE connection_id = :c",
        c=info.connection_id,
    )
    assert rows == [("d1", "10.0.0.1:5", None)]
    assert read_now(database_url, "SELECT client_type FROM clients WHERE client_id = 'd1'") == [
        ("device",)
    ]

    await registry.set_device_info_durable("d1", DEVICE_INFO)
    assert read_now(database_url, "SELECT count(*) FROM device_info_snapshots")[0] == (1,)

    await registry.add_client_durable("c1", "linux", object(), ClientType.CONSTELLATION)
    session = await registry.open_session("s1", owner_id="c1", executor_id="d1", task_name="t")
    assert (session.owner_id, session.executor_id, session.state) == (
        "c1",
        "d1",
        SessionState.ACTIVE,
    )
    assert read_now(
        database_url, "SELECT owner_id, executor_id, task_name, state FROM sessions"
    ) == [("c1", "d1", "t", "active")]
    links = read_now(
        database_url,
        "SELECT role, client_id FROM session_links WHERE session_id = 's1' AND unbound_at IS NULL",
    )
    assert sorted(links) == [("constellation", "c1"), ("device", "d1")]
    assert registry.get_device_sessions("d1") == {"s1"}
    assert registry.get_constellation_sessions("c1") == {"s1"}

    await registry.end_session("s1", SessionState.CANCELLED, "user asked")
    assert read_now(database_url, "SELECT state, end_reason FROM sessions") == [
        ("cancelled", "user asked")
    ]
    assert read_now(
        database_url, "SELECT count(*) FROM session_links WHERE unbound_at IS NULL"
    ) == [(0,)]

    await registry.remove_client_durable("d1", code=1001, reason="going_away")
    assert read_now(
        database_url,
        "SELECT close_code, close_reason FROM connections WHERE connection_id = :c",
        c=info.connection_id,
    ) == [(1001, "going_away")]


async def test_durable_variants_wait_even_when_an_earlier_call_did_the_work(
    registry: Registry, database_url: str
) -> None:
    registry.set_device_info("d1", {"v": 1})
    await registry.set_device_info_durable("d1", {"v": 1})  # same content: nothing new to write
    assert read_now(database_url, "SELECT count(*) FROM device_info_snapshots")[0] == (1,)

    registry.add_client("d1", "linux", object(), ClientType.DEVICE)
    registry.remove_client("d1", reason="gone")
    await registry.remove_client_durable("d1")  # already removed
    assert read_now(database_url, "SELECT close_reason FROM connections") == [("gone",)]

    registry.add_device_session("d2", "s1")
    registry.remove_session("s1", state="failed")
    await registry.end_session("s1", "completed")  # already ended
    assert read_now(database_url, "SELECT state FROM sessions") == [("failed",)]


# -- session ownership ----------------------------------------------------------------------------


async def test_open_session_ownership(registry: Registry, database_url: str) -> None:
    await registry.open_session("s1", owner_id="c1", executor_id="d1")
    with pytest.raises(SessionOwnershipError) as caught:
        await registry.open_session("s1", owner_id="c2", executor_id="d2")
    assert caught.value.owner_id == "c1"
    session = registry.get_session("s1")
    assert session is not None
    assert (session.owner_id, session.executor_id) == ("c1", "d1")
    assert registry.get_constellation_sessions("c2") == set()
    assert registry.get_device_sessions("d2") == set()
    # The owner may reopen it; ending it does not free the id for others.
    await registry.open_session("s1", owner_id="c1", executor_id="d1", task_name="again")
    await registry.end_session("s1", "completed")
    with pytest.raises(SessionOwnershipError):
        await registry.open_session("s1", owner_id="c2", executor_id="d2")
    assert registry.get_session("s1") is None
    # A device running its own task owns the session, mapped as device only.
    own = await registry.open_session("s2", owner_id="d3", executor_id="d3")
    assert own.owner_id == "d3"
    assert registry.get_device_sessions("d3") == {"s2"}
    assert registry.get_constellation_sessions("d3") == set()


async def test_ownership_holds_for_sessions_not_yet_committed(registry: Registry) -> None:
    """A session created and ended moments ago (still in the journal) keeps its owner."""
    registry.add_constellation_session("c1", "s-race")
    registry.remove_session("s-race")
    with pytest.raises(SessionOwnershipError):
        await registry.open_session("s-race", owner_id="c2", executor_id="d1")
    await registry.flush()
    page = await registry.history.sessions("c2")
    assert page.items == []


async def test_ownership_survives_a_restart(database_url: str) -> None:
    async with Registry(database_url) as reg:
        await reg.open_session("s-active", owner_id="c1", executor_id="d1")
        await reg.open_session("s-ended", owner_id="c1", executor_id="d1")
        await reg.end_session("s-ended", "completed")
    async with Registry(database_url) as reg:
        for session_id in ("s-active", "s-ended"):
            with pytest.raises(SessionOwnershipError):
                await reg.open_session(session_id, owner_id="c2", executor_id="d1")
        resumed = await reg.open_session("s-active", owner_id="c1", executor_id="d1")
        assert resumed.state is SessionState.ACTIVE
        assert reg.get_interrupted_sessions("c1") == []


# -- device info -----------------------------------------------------------------------------


async def test_device_info_snapshots_only_on_change(registry: Registry) -> None:
    registry.set_device_info("d1", {"os": "Windows", "memory": 1})
    registry.set_device_info("d1", {"memory": 1, "os": "Windows"})  # same content
    await registry.set_device_info_durable("d1", {"os": "Windows", "memory": 1})
    page = await registry.history.device_info("d1")
    assert [s.info for s in page.items] == [{"os": "Windows", "memory": 1}]
    registry.set_device_info("d1", {"os": "Windows", "memory": 2})
    registry.set_device_info("d2", {"os": "Linux"})
    await registry.flush()
    page = await registry.history.device_info("d1")
    assert [s.info for s in page.items] == [
        {"os": "Windows", "memory": 2},
        {"os": "Windows", "memory": 1},
    ]
    assert page.items[0].captured_at >= page.items[1].captured_at
    assert registry.get_device_info("d1") == {"os": "Windows", "memory": 2}
    assert registry.get_device_info("d3") is None
    changes = [e for e in await my_audit(registry) if e.kind == AuditKind.DEVICE_INFO_CHANGED]
    assert [e.client_id for e in changes] == ["d1", "d1", "d2"]


# -- audit -----------------------------------------------------------------------------------


async def test_every_mutation_writes_an_audit_event(database_url: str) -> None:
    seen: set[str] = set()

    async def expect(reg: Registry, action: Any, *expected: str) -> None:
        before = len(await my_audit(reg))
        result = action()
        if inspect.isawaitable(result):
            await result
        await reg.flush()
        new = kinds((await my_audit(reg))[before:])
        for kind in expected:
            assert kind in new, (kind, new)
        seen.update(new)

    ws = object()
    reg = Registry(database_url, on_duplicate="replace")
    await reg.start()
    assert kinds(await my_audit(reg)) == [AuditKind.NODE_STARTED]
    seen.add(AuditKind.NODE_STARTED)
    await expect(
        reg,
        lambda: reg.add_client("d1", "linux", ws, ClientType.DEVICE),
        AuditKind.CLIENT_REGISTERED,
    )
    await expect(
        reg,
        lambda: reg.add_client("d1", "linux", ws, ClientType.DEVICE),
        AuditKind.CLIENT_REPLACED,
        AuditKind.CLIENT_REGISTERED,
    )
    await expect(reg, lambda: reg.add_device_session("d1", "s1"), AuditKind.SESSION_BOUND)
    await expect(reg, lambda: reg.add_constellation_session("c1", "s1"), AuditKind.SESSION_BOUND)
    await expect(reg, lambda: reg.remove_constellation_sessions("c1"), AuditKind.SESSION_UNBOUND)
    await expect(
        reg,
        lambda: reg.remove_device_sessions("d1"),
        AuditKind.SESSION_UNBOUND,
        AuditKind.SESSION_ENDED,  # left without links: cancelled
    )
    await expect(reg, lambda: reg.add_device_session("d1", "s2"), AuditKind.SESSION_BOUND)
    await expect(
        reg, lambda: reg.remove_session("s2"), AuditKind.SESSION_UNBOUND, AuditKind.SESSION_ENDED
    )
    await expect(
        reg,
        lambda: reg.open_session("s3", owner_id="c1", executor_id="d1"),
        AuditKind.SESSION_OPENED,
        AuditKind.SESSION_BOUND,
    )
    await expect(reg, lambda: reg.end_session("s3", "failed"), AuditKind.SESSION_ENDED)
    await expect(reg, lambda: reg.set_device_info("d1", {"a": 1}), AuditKind.DEVICE_INFO_CHANGED)
    await expect(reg, lambda: reg.remove_client("d1"), AuditKind.CLIENT_REMOVED)
    await reg.open_session("s4", owner_id="c1", executor_id="d1")
    await reg.close()
    async with Registry(database_url) as reg2:
        events = await reg2.history.audit(limit=1000)
        closing = [e.kind for e in events.items if e.node_id == reg.node_id][-2:]
        assert closing == [AuditKind.SESSION_INTERRUPTED, AuditKind.NODE_STOPPED]
        seen.update(closing)
    # Refusing a duplicate is audited too.
    async with Registry(database_url) as reg3:
        reg3.add_client("x", "linux", ws, ClientType.DEVICE)
        with pytest.raises(DuplicateClientError):
            reg3.add_client("x", "linux", ws, ClientType.DEVICE)
        await reg3.flush()
        seen.update(kinds(await my_audit(reg3)))
    # Every kind a registry mutation (or start/close) writes; recovery and pruning have theirs.
    written_by_mutations = {
        AuditKind.NODE_STARTED,
        AuditKind.NODE_STOPPED,
        AuditKind.CLIENT_REGISTERED,
        AuditKind.CLIENT_DUPLICATE_REFUSED,
        AuditKind.CLIENT_REPLACED,
        AuditKind.CLIENT_REMOVED,
        AuditKind.SESSION_OPENED,
        AuditKind.SESSION_BOUND,
        AuditKind.SESSION_UNBOUND,
        AuditKind.SESSION_ENDED,
        AuditKind.SESSION_INTERRUPTED,
        AuditKind.DEVICE_INFO_CHANGED,
    }
    assert written_by_mutations <= seen


# -- reads do no I/O ---------------------------------------------------------------------------


def _read_everything(reg: Registry) -> dict[str, Any]:
    """Every read of the reference API, called synchronously (no await is possible here)."""
    info = reg.get_client_info("d1")
    return {
        "client": reg.get_client("d1"),
        "info": info.client_id if info else None,
        "all": sorted(c.client_id for c in reg.get_all_clients()),
        "device": reg.is_device_connected("d1"),
        "not_device": reg.is_device_connected("c1"),
        "online": reg.is_online("c1"),
        "count": reg.get_online_count(),
        "by_type": [c.client_id for c in reg.get_clients_by_type(ClientType.CONSTELLATION)],
        "by_platform": [c.client_id for c in reg.get_clients_by_platform("LINUX")],
        "device_sessions": reg.get_device_sessions("d1"),
        "constellation_sessions": reg.get_constellation_sessions("c1"),
        "device_info": reg.get_device_info("d1"),
        "session": reg.get_session("s1"),
        "interrupted": reg.get_interrupted_sessions("c1"),
    }


async def test_reads_do_no_io(registry: Registry) -> None:
    ws = object()
    registry.add_client("d1", "windows", ws, ClientType.DEVICE)
    registry.add_client("c1", "linux", object(), ClientType.CONSTELLATION)
    registry.add_constellation_session("c1", "s1")
    registry.add_device_session("d1", "s1")
    registry.set_device_info("d1", DEVICE_INFO)
    await registry.flush()

    statements: list[str] = []
    checkouts: list[object] = []
    engine = registry.engine.sync_engine

    def on_execute(*args: Any) -> None:
        statements.append(str(args[2]))

    def on_checkout(*args: Any) -> None:
        checkouts.append(args[0])

    event.listen(engine, "before_cursor_execute", on_execute)
    event.listen(engine.pool, "checkout", on_checkout)
    try:
        tasks_before = asyncio.all_tasks()
        sequence_before = registry.journal.last_sequence
        for _ in range(200):
            answers = _read_everything(registry)
        assert registry.journal.last_sequence == sequence_before  # nothing queued for later
        assert asyncio.all_tasks() == tasks_before  # nothing scheduled for later
        assert statements == []
        assert checkouts == []
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)
        event.remove(engine.pool, "checkout", on_checkout)
    assert answers["client"] is ws
    assert answers["info"] == "d1"
    assert answers["all"] == ["c1", "d1"]
    assert answers["device"] is True
    assert answers["not_device"] is False
    assert answers["online"] is True
    assert answers["count"] == 2
    assert answers["by_type"] == ["c1"]
    assert answers["by_platform"] == ["c1"]
    assert answers["device_sessions"] == {"s1"}
    assert answers["constellation_sessions"] == {"s1"}
    assert answers["device_info"] == DEVICE_INFO
    assert answers["session"].owner_id == "c1"
    assert answers["interrupted"] == []


async def test_reads_answer_while_the_database_is_unreachable(database_url: str) -> None:
    """Kill the registry's database connections and forbid new ones: reads still answer."""
    reg = Registry(database_url, close_timeout=10)
    await reg.start()
    reg.add_client("d1", "windows", object(), ClientType.DEVICE)
    reg.add_device_session("d1", "s1")
    reg.set_device_info("d1", {"os": "Windows"})
    await reg.flush()
    await reg.engine.dispose()  # drop every pooled connection
    blocked = _block_new_connections(database_url)
    try:
        answers = _read_everything(reg)
    finally:
        _unblock(database_url, blocked)
    assert answers["info"] == "d1"
    assert answers["device_sessions"] == {"s1"}
    assert answers["device_info"] == {"os": "Windows"}
    assert answers["count"] == 1
    await reg.close()


def _block_new_connections(url: str) -> str:
    """Make the database refuse connections; returns what :func:`_unblock` needs."""
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1])
        hidden = path.with_name(path.name + ".away")
        os.rename(path, hidden)  # a new connection would find no tables at all
        path.mkdir()  # ... and not even be able to create a database there
        return str(hidden)
    read_now(url, "SELECT 1")  # the URL works
    name = url.rsplit("/", 1)[1]
    _pg_admin(url, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    return name


def _unblock(url: str, blocked: str) -> None:
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[1])
        path.rmdir()
        os.rename(blocked, path)
        return
    _pg_admin(url, f'ALTER DATABASE "{blocked}" WITH ALLOW_CONNECTIONS true')


def _pg_admin(url: str, statement: str) -> None:
    """Run ``statement`` on the server's admin database (the one conftest creates from)."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, admin(POSTGRES_ADMIN_URL, statement)).result()


async def test_mutations_on_a_registry_not_started_raise(database_url: str) -> None:
    reg = Registry(database_url)
    calls: list[Any] = [
        lambda: reg.add_client("d1", "linux", object(), ClientType.DEVICE),
        lambda: reg.remove_client("d1"),
        lambda: reg.add_device_session("d1", "s1"),
        lambda: reg.add_constellation_session("c1", "s1"),
        lambda: reg.remove_device_sessions("d1"),
        lambda: reg.remove_constellation_sessions("c1"),
        lambda: reg.remove_session("s1"),
        lambda: reg.set_device_info("d1", {}),
    ]
    for call in calls:
        with pytest.raises(registry.RegistryClosedError):
            call()
    for coroutine in (
        lambda: reg.add_client_durable("d1", "linux", object(), ClientType.DEVICE),
        lambda: reg.remove_client_durable("d1"),
        lambda: reg.set_device_info_durable("d1", {}),
        lambda: reg.open_session("s1", owner_id="c1", executor_id="d1"),
        lambda: reg.end_session("s1", "completed"),
        reg.flush,
    ):
        with pytest.raises(registry.RegistryClosedError):
            await coroutine()
    with pytest.raises(registry.RegistryClosedError):
        _ = reg.history
    # Reads of an idle registry answer (nothing is live).
    assert reg.get_online_count() == 0
    assert reg.get_device_sessions("d1") == set()
    # After a clean close, adds raise; removals find nothing live and do nothing.
    await reg.start()
    reg.add_client("d1", "linux", object(), ClientType.DEVICE)
    await reg.close()
    with pytest.raises(registry.RegistryClosedError):
        reg.add_client("d1", "linux", object(), ClientType.DEVICE)
    reg.remove_client("d1")
    assert not reg.is_online("d1")


async def test_another_live_node_on_the_same_host_is_left_alone(database_url: str) -> None:
    """Default node names are unique per process, so starting a second registry on the same
    host must not take the first one's live connections for a crashed run's leftovers (a
    SQLite file has one registry: a second is refused, see test_one_registry.py)."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite has one registry: a second is refused (test_one_registry.py)")
    async with Registry(database_url) as first:
        first.add_client("d1", "linux", object(), ClientType.DEVICE)
        await first.flush()
        async with Registry(database_url) as second:
            assert second.node_id != first.node_id
            still_open = read_now(
                database_url, "SELECT count(*) FROM connections WHERE disconnected_at IS NULL"
            )
            assert still_open == [(1,)]
