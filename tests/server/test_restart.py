"""End to end: ``registry serve`` as a real process, SIGKILLed mid-session and started again on
the same database. Runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from registry import SessionState
from tests.support import (
    API_KEY,
    HOST,
    WAIT,
    Client,
    Serve,
    assert_error,
    eventually,
    free_port,
    sql,
    store,
)

SYSTEM_INFO = {"os": "linux", "cores": 16, "labels": ["lab-3"]}


@asynccontextmanager
async def serving(database_url: str, port: int, log: Path) -> AsyncIterator[Serve]:
    process = Serve(database_url, port, log)
    try:
        await process.ready()
        yield process
    finally:
        await process.stop(signal.SIGKILL)


@asynccontextmanager
async def client(port: int, client_id: str, **fields: object) -> AsyncIterator[Client]:
    """A registered client (the registration ack checked)."""
    ws = await connect(f"ws://{HOST}:{port}/ws?token={API_KEY}", open_timeout=WAIT)
    try:
        connected = Client(ws, client_id)
        await connected.send(type="register", status="ok", client_id=client_id, **fields)
        ack = await connected.recv()
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok"), ack
        yield connected
    finally:
        await ws.close()


def _device(port: int, client_id: str = "dev-r") -> AbstractAsyncContextManager[Client]:
    return client(
        port,
        client_id,
        client_type="device",
        metadata={"platform": "linux", "system_info": SYSTEM_INFO},
    )


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "serve.log"


@pytest.fixture(autouse=True)
def _show_server_log(request: pytest.FixtureRequest, log_path: Path) -> Iterator[None]:
    yield
    if log_path.exists():
        report = log_path.read_text(errors="replace")
        if report.strip():
            request.node.add_report_section("call", "registry serve output", report)


async def _connections(database_url: str, client_id: str) -> list[tuple[str | None, bool]]:
    async with store(database_url) as history:
        page = await history.connections(client_id)
    return [(row.close_reason, row.disconnected_at is not None) for row in page.items]


async def test_sigkill_and_restart_recovers_connections_and_sessions(
    database_url: str, log_path: Path
) -> None:
    port = free_port()

    # -- first run: a device, a constellation, a session the device never answers --------------
    first = Serve(database_url, port, log_path)
    try:
        await first.ready()
        async with (
            _device(port) as device,
            client(port, "const-r", client_type="constellation", target_id="dev-r") as const,
        ):
            await const.send(
                type="task",
                status="continue",
                client_type="constellation",
                client_id="const-r",
                target_id="dev-r",
                session_id="job@1",
                task_name="job",
                request="never answered",
            )
            ack = await const.recv()
            assert (ack["type"], ack["session_id"]) == ("heartbeat", "job@1")
            command = await device.recv()
            assert command["type"] == "command"
            assert command["session_id"] == "job@1"
            # Committed before the acks: connections, device info, the session.
            assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
            for gone in (device, const):
                await gone.closed()
    finally:
        await first.stop(signal.SIGKILL)

    # Nothing of the first run was closed by it: it was killed.
    rows = await sql(database_url, "SELECT client_id, disconnected_at FROM connections")
    assert sorted(row[0] for row in rows) == ["const-r", "dev-r"]
    assert all(row[1] is None for row in rows)

    # -- second run on the same database ------------------------------------------------------
    async with serving(database_url, port, log_path) as second:
        # Recovery closed the old connections and interrupted the session before serving.
        for client_id in ("dev-r", "const-r"):
            assert await _connections(database_url, client_id) == [("server_restart", True)]
        state = await sql(
            database_url,
            "SELECT state, owner_id, executor_id, task_name FROM sessions "
            "WHERE session_id = 'job@1'",
        )
        assert [tuple(row) for row in state] == [("interrupted", "const-r", "dev-r", "job")]

        # The device info came back from the store: a constellation may ask before the
        # device has reconnected.
        async with client(second.port, "auditor", client_type="constellation") as auditor:
            await auditor.send(
                type="device_info_request",
                status="ok",
                client_type="constellation",
                target_id="dev-r",
                request_id="after-restart",
            )
            answer = await auditor.recv()
            assert answer["type"] == "device_info_response"
            assert answer["response_id"] == "after-restart"
            assert answer["result"] == SYSTEM_INFO

        # The clients come back with the same ids.
        async with _device(second.port) as device:
            # Another client still cannot claim the interrupted session.
            async with client(second.port, "thief", client_type="device") as thief:
                await thief.send(
                    type="task", status="continue", session_id="job@1", request="mine now"
                )
                assert_error(await thief.recv(), "session_id 'job@1' is owned by another client")

            async with client(
                second.port, "const-r", client_type="constellation", target_id="dev-r"
            ) as const:
                # Right after its registration ack: the interrupted session ends.
                end = await const.recv()
                assert end["type"] == "task_end"
                assert end["status"] == "failed"
                assert end["error"] == "server restarted"
                assert end["session_id"] == "job@1"
                # The executing device is told as well (a constellation task).
                device_end = await device.recv_type("task_end")
                assert (device_end["session_id"], device_end["error"]) == (
                    "job@1",
                    "server restarted",
                )
                assert (await const.heartbeat())["type"] == "heartbeat"

                async def session_state() -> list[tuple[object, ...]]:
                    rows = await sql(
                        database_url,
                        "SELECT state, end_reason FROM sessions WHERE session_id = 'job@1'",
                    )
                    return [tuple(row) for row in rows]

                assert await eventually(
                    session_state, lambda rows: rows == [("failed", "server restarted")]
                )

            # The audit trail records the recovery.
            async with store(database_url) as history:
                recovered = (await history.audit(kind="node_recovered")).items
                assert len(recovered) == 1
                assert recovered[0].details["closed_connections"] == 2
                assert recovered[0].details["interrupted_sessions"] == 1
                restored = (await history.audit(kind="connection_recovered")).items
                assert sorted(event.client_id or "" for event in restored) == ["const-r", "dev-r"]

            # -- a clean stop while the device is connected: server_shutdown ------------------
            # A graceful shutdown on SIGTERM is a clean exit.
            assert await second.stop(signal.SIGTERM) == 0
            code, _ = await device.closed()
            assert code == 1012

    async with store(database_url) as history:
        assert (await history.open_connections()).items == []
        device_rows = (await history.connections("dev-r")).items
        assert [row.close_reason for row in device_rows] == ["server_shutdown", "server_restart"]
        (session,) = (await history.sessions("const-r")).items
        assert session.state is SessionState.FAILED
        snapshots = (await history.device_info("dev-r")).items
        assert [snapshot.info for snapshot in snapshots] == [SYSTEM_INFO]
    nodes = await sql(database_url, "SELECT stop_reason FROM nodes ORDER BY started_at")
    assert [row[0] for row in nodes] == ["server_restart", "shutdown"]
    clients = await sql(database_url, "SELECT client_id FROM clients ORDER BY client_id")
    assert [row[0] for row in clients] == ["auditor", "const-r", "dev-r", "thief"]
