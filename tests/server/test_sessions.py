"""Sessions across disconnects, and the connection record of every way a connection ends.

Everything here depends on the store, so it runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from registry import ConnectionRecord, SessionState
from tests.support import (
    Client,
    Clients,
    Server,
    assert_server_frame,
    eventually,
    running_server,
    sql,
    store,
    until,
)

DEVICE_LEFT = "Task was cancelled because target device disconnected"


@pytest.fixture
def db_url(database_url: str) -> str:
    return database_url


async def _session_row(server: Server, session_id: str) -> tuple[Any, ...]:
    """(state, owner_id, executor_id, end_reason) of a stored session; () if there is none."""
    rows = await sql(
        server.database_url,
        "SELECT state, owner_id, executor_id, end_reason FROM sessions WHERE session_id = :sid",
        sid=session_id,
    )
    return tuple(rows[0]) if rows else ()


async def _closed_connections(database_url: str, client_id: str) -> list[ConnectionRecord]:
    """The client's connection rows, newest first, once every one of them is closed."""

    async def rows() -> list[ConnectionRecord]:
        async with store(database_url) as history:
            return (await history.connections(client_id)).items

    return await eventually(
        rows, lambda items: bool(items) and all(r.disconnected_at for r in items)
    )


async def _start_constellation_task(
    constellation: Client, device: Client, session_id: str, task_name: str = "job"
) -> dict[str, Any]:
    """Send a constellation task to ``device``; return the command frame it receives."""
    await constellation.send(
        type="task",
        status="continue",
        client_type="constellation",
        client_id=constellation.client_id,
        target_id=device.client_id,
        session_id=session_id,
        task_name=task_name,
        request="do it",
    )
    ack = await constellation.recv()
    assert (ack["type"], ack["status"], ack["session_id"]) == ("heartbeat", "ok", session_id)
    command = await device.recv()
    assert command["type"] == "command"
    assert command["session_id"] == session_id
    return command


async def test_device_disconnect_fails_its_sessions_and_tells_the_requester(
    server: Server, clients: Clients
) -> None:
    device = await clients.device("dev-a")
    const = await clients.constellation("const-a")
    await _start_constellation_task(const, device, "job@1")

    await device.close()
    end = await const.recv_type("task_end")
    assert_server_frame(end)
    assert end["status"] == "failed"
    assert end["error"] == DEVICE_LEFT
    assert end["session_id"] == "job@1"
    assert end["task_name"] == "job"

    row = await eventually(lambda: _session_row(server, "job@1"), lambda r: r[:1] == ("failed",))
    assert row == ("failed", "const-a", "dev-a", DEVICE_LEFT)
    assert server.registry.get_device_sessions("dev-a") == set()
    assert server.registry.get_constellation_sessions("const-a") == set()
    # The constellation is unaffected and still served.
    assert (await const.heartbeat())["status"] == "ok"


async def test_device_own_session_fails_when_it_disconnects(
    server: Server, clients: Clients
) -> None:
    device = await clients.device("dev-own")
    await device.send(type="task", status="continue", session_id="own-1", request="x")
    assert (await device.recv())["session_id"] == "own-1"
    assert (await device.recv())["type"] == "command"
    await device.close()
    row = await eventually(lambda: _session_row(server, "own-1"), lambda r: r[:1] == ("failed",))
    assert row[3] == DEVICE_LEFT
    assert server.registry.get_session("own-1") is None


async def test_constellation_disconnect_cancels_its_sessions(
    server: Server, clients: Clients
) -> None:
    device = await clients.device("dev-b")
    const = await clients.constellation("const-b", target_id="dev-b")
    command = await _start_constellation_task(const, device, "job@2")

    await const.close()
    row = await eventually(lambda: _session_row(server, "job@2"), lambda r: r[:1] == ("cancelled",))
    assert row[:3] == ("cancelled", "const-b", "dev-b")
    # The executing device is told the session is over.
    end = await device.recv_type("task_end")
    assert (end["status"], end["session_id"]) == ("failed", "job@2")
    # A late answer to the command changes nothing.
    await device.send(
        type="command_results",
        status="completed",
        client_id="dev-b",
        session_id="job@2",
        prev_response_id=command["response_id"],
        action_results=[{"status": "success", "result": "late"}],
    )
    assert (await device.heartbeat())["type"] == "heartbeat"
    assert (await _session_row(server, "job@2"))[0] == "cancelled"
    assert server.sessions.results["job"]["status"] == "failed"


async def test_clean_close_records_code_1000(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-clean")
    await device.close(1000)
    (record,) = await _closed_connections(server.database_url, "dev-clean")
    assert record.close_code == 1000
    assert record.close_reason == "client_closed"
    assert not server.registry.is_online("dev-clean")


async def test_close_with_a_reason_records_that_reason(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-bye")
    await device.close(1001, "going home")
    (record,) = await _closed_connections(server.database_url, "dev-bye")
    assert (record.close_code, record.close_reason) == (1001, "going home")


async def test_abrupt_drop_records_connection_lost(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-drop")
    device.ws.transport.abort()
    (record,) = await _closed_connections(server.database_url, "dev-drop")
    assert record.close_code == 1006
    assert record.close_reason == "connection_lost"
    await until(lambda: not server.registry.is_online("dev-drop"))


async def test_idle_timeout_closes_and_records_it(db_url: str) -> None:
    async with running_server(db_url, idle_timeout=0.4) as server:
        opened = Clients(server)
        try:
            device = await opened.device("dev-idle")
            chatty = await opened.device("dev-chatty")
            for _ in range(4):  # every frame counts as liveness
                await asyncio.sleep(0.15)
                assert (await chatty.heartbeat())["status"] == "ok"
            code, reason = await device.closed()
            assert (code, reason) == (4408, "idle_timeout")
            (record,) = await _closed_connections(db_url, "dev-idle")
            assert (record.close_code, record.close_reason) == (4408, "idle_timeout")
            assert not server.registry.is_online("dev-idle")
        finally:
            await opened.aclose()


async def test_server_shutdown_closes_every_connection_record(db_url: str) -> None:
    """A clean stop records server_shutdown for every connection and leaves the running
    session interrupted; after the restart its owner hears of it when it reconnects."""
    async with running_server(db_url) as server:
        opened = Clients(server)
        device = await opened.device("dev-shut")
        const = await opened.constellation("const-shut", target_id="dev-shut")
        await _start_constellation_task(const, device, "job@shut")
        stopping = [asyncio.create_task(client.closed()) for client in (device, const)]
        # Leaving the block stops the server while both clients are connected.
    for closing in stopping:
        code, _ = await closing
        assert code == 1012  # uvicorn's "service restart"
    await opened.aclose()
    for client_id in ("dev-shut", "const-shut"):
        (record,) = await _closed_connections(db_url, client_id)
        assert (record.close_code, record.close_reason) == (1012, "server_shutdown"), record
    async with store(db_url) as history:
        assert (await history.open_connections()).items == []
        (session,) = (await history.sessions("const-shut")).items
    assert session.state is SessionState.INTERRUPTED

    async with running_server(db_url) as server:
        opened = Clients(server)
        try:
            device = await opened.device("dev-shut")
            const = await opened.constellation("const-shut", target_id="dev-shut")
            end = await const.recv()
            assert (end["type"], end["status"]) == ("task_end", "failed")
            assert (end["session_id"], end["error"]) == ("job@shut", "server restarted")
            device_end = await device.recv()
            assert (device_end["type"], device_end["session_id"]) == ("task_end", "job@shut")
            row = await eventually(
                lambda: _session_row(server, "job@shut"), lambda r: r[:1] == ("failed",)
            )
            assert row[3] == "server restarted"
        finally:
            await opened.aclose()


async def test_quick_reconnect_after_a_drop_is_accepted(server: Server, clients: Clients) -> None:
    for round_number in range(5):
        device = await clients.device("dev-bounce")
        const = await clients.constellation(f"const-bounce-{round_number}")
        await _start_constellation_task(const, device, f"job@bounce{round_number}")
        device.ws.transport.abort()
        # Register again at once, as the device client does.
        again = await clients.device("dev-bounce")
        assert (await again.heartbeat())["status"] == "ok"
        end = await const.recv_type("task_end")
        assert end["error"] == DEVICE_LEFT
        await again.close()
        await until(lambda: not server.registry.is_online("dev-bounce"))
    records = await _closed_connections(server.database_url, "dev-bounce")
    assert len(records) == 10


async def test_quick_reconnect_of_a_constellation_keeps_its_new_sessions(
    server: Server, clients: Clients
) -> None:
    """The old connection's cleanup cancels the old sessions only, not ones the reconnected
    client has started meanwhile."""
    device = await clients.device("dev-c")
    const = await clients.constellation("const-c")
    await _start_constellation_task(const, device, "old@1")
    const.ws.transport.abort()
    again = await clients.constellation("const-c")
    await again.send(
        type="task",
        status="continue",
        client_type="constellation",
        target_id="dev-c",
        session_id="new@1",
        task_name="new",
        request="again",
    )
    ack = await again.recv_type("heartbeat")
    assert ack["session_id"] == "new@1"
    command = await device.recv_type("command")
    assert command["session_id"] == "new@1"
    await eventually(lambda: _session_row(server, "old@1"), lambda r: r[:1] == ("cancelled",))
    await device.send(
        type="command_results",
        status="completed",
        session_id="new@1",
        prev_response_id=command["response_id"],
        action_results=[{"status": "success", "result": "fine"}],
    )
    end = await again.recv_type("task_end")
    assert (end["session_id"], end["status"]) == ("new@1", "completed")
    assert (await _session_row(server, "new@1"))[0] == "completed"


async def test_disconnect_before_the_ack_frees_the_id(server: Server, clients: Clients) -> None:
    """A client gone while its registration is being recorded does not keep the id."""
    for _ in range(5):
        client = await clients.open()
        await client.send(type="register", status="ok", client_id="dev-hasty")
        client.ws.transport.abort()

    async def settled() -> bool:
        async with store(server.database_url) as history:
            still_open = (await history.open_connections()).items
        return not still_open and not server.registry.is_online("dev-hasty")

    await eventually(settled)
    await asyncio.sleep(0.3)
    assert await settled()
    again = await clients.device("dev-hasty")
    assert (await again.heartbeat())["status"] == "ok"


async def test_close_reason_with_nul_is_recorded_and_frees_the_id(
    server: Server, clients: Clients
) -> None:
    device = await clients.device("dev-nul-reason")
    await device.close(4000, "bad\x00reason")
    (record,) = await _closed_connections(server.database_url, "dev-nul-reason")
    assert record.close_code == 4000
    assert record.close_reason is not None
    assert record.close_reason.startswith("bad")
    assert "\x00" not in record.close_reason
    again = await clients.device("dev-nul-reason")
    assert (await again.heartbeat())["status"] == "ok"


async def test_unanswered_command_times_out_and_fails_the_session(db_url: str) -> None:
    async with running_server(db_url, command_timeout=0.3) as server:
        opened = Clients(server)
        try:
            device = await opened.device("dev-slow")
            const = await opened.constellation("const-slow")
            command = await _start_constellation_task(const, device, "slow@1")
            end = await const.recv_type("task_end")
            assert (end["status"], end["session_id"]) == ("failed", "slow@1")
            assert end["error"].startswith("no command_results from 'dev-slow'")
            row = await eventually(
                lambda: _session_row(server, "slow@1"), lambda r: r[:1] == ("failed",)
            )
            assert row[3] == end["error"]
            # An answer after the end is dropped; the device is still served.
            await device.send(
                type="command_results",
                status="completed",
                session_id="slow@1",
                prev_response_id=command["response_id"],
                action_results=[{"status": "success"}],
            )
            assert (await device.recv_type("task_end"))["session_id"] == "slow@1"
            assert (await device.heartbeat())["type"] == "heartbeat"
            await const.nothing()
        finally:
            await opened.aclose()


async def test_sessions_per_client_are_limited(db_url: str) -> None:
    async with running_server(db_url, max_sessions_per_client=2) as server:
        opened = Clients(server)
        try:
            device = await opened.device("dev-many")
            const = await opened.constellation("const-many")
            for number in range(2):
                await _start_constellation_task(const, device, f"many@{number}")
            await const.send(
                type="task",
                status="continue",
                client_type="constellation",
                target_id="dev-many",
                session_id="many@2",
                request="one too many",
            )
            refused = await const.recv()
            assert (refused["type"], refused["error"]) == (
                "error",
                "Too many active sessions (limit 2)",
            )
            await device.nothing()
            assert (await _session_row(server, "many@2")) == ()
        finally:
            await opened.aclose()


async def test_a_runner_may_resume_a_session_on_the_owner_connection(db_url: str) -> None:
    """Resumed sessions run beside the connection: a runner can drive the reconnected device
    (the owner and executor of its own task) through its own connection."""
    runner = "tests.server.runners:AskAgainRunner"
    async with running_server(db_url, runner=runner) as server:
        opened = Clients(server)
        device = await opened.device("dev-resume")
        await device.send(type="task", status="continue", session_id="own@r", request="x")
        assert (await device.recv())["session_id"] == "own@r"
        assert (await device.recv())["type"] == "command"  # never answered
        stopping = asyncio.create_task(device.closed())
    await stopping
    await opened.aclose()

    async with running_server(db_url, runner=runner) as server:
        opened = Clients(server)
        try:
            device = await opened.device("dev-resume")
            command = await device.recv()
            assert (command["type"], command["session_id"]) == ("command", "own@r")
            assert command["actions"][0]["tool_name"] == "resume"
            await device.send(
                type="command_results",
                status="completed",
                session_id="own@r",
                prev_response_id=command["response_id"],
                action_results=[{"status": "success", "result": "resumed"}],
            )
            end = await device.recv()
            assert (end["type"], end["status"]) == ("task_end", "completed")
            assert end["result"][0]["result"] == "resumed"
            row = await eventually(
                lambda: _session_row(server, "own@r"), lambda r: r[:1] == ("completed",)
            )
            assert row[1:3] == ("dev-resume", "dev-resume")
        finally:
            await opened.aclose()
