"""``/api/dispatch`` against a device that behaves as UFO's device client does (see
``tests.server.ufo_device``), on SQLite and PostgreSQL.

A dispatched task is a session owned and run by the device it is dispatched to, recorded
before the dispatch is answered; the device takes it up with a ``task`` request of its own,
the runner runs it, and ``/api/task_result`` reports its end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from registry.server.sessions import DEVICE_DISCONNECTED
from tests.server.ufo_device import UfoDevice
from tests.support import WAIT, Clients, Server, eventually, running_server, sql


@pytest.fixture
def db_url(database_url: str) -> str:
    """On SQLite and on PostgreSQL: these flows record sessions."""
    return database_url


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with server.http() as client:
        yield client


async def _dispatch(http: httpx.AsyncClient, client_id: str, task_name: str) -> str:
    answer = await http.post(
        "/api/dispatch",
        json={"client_id": client_id, "request": "open notepad", "task_name": task_name},
    )
    assert answer.status_code == 200, answer.text
    session_id: str = answer.json()["session_id"]
    return session_id


async def _session(http: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    answer = await http.get(f"/api/sessions/{session_id}")
    assert answer.status_code == 200, answer.text
    detail: dict[str, Any] = answer.json()
    return detail


async def _ended(http: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    """The session's record once it has ended (``/api/task_result`` reports an end as soon
    as the server knows it; the store has it once it is committed)."""
    detail = await eventually(
        lambda: _session(http, session_id), lambda d: d["session"]["ended_at"] is not None
    )
    session: dict[str, Any] = detail["session"]
    return session


async def _result(http: httpx.AsyncClient, task_name: str) -> dict[str, Any]:
    answer: dict[str, Any] = (await http.get(f"/api/task_result/{task_name}")).json()
    return answer


async def _sessions_of(http: httpx.AsyncClient, client_id: str) -> list[str]:
    page = (await http.get("/api/sessions", params={"client": client_id})).json()
    return [item["session_id"] for item in page["items"]]


async def test_a_dispatched_task_is_a_session_from_dispatch_to_its_end(
    server: Server, clients: Clients, http: httpx.AsyncClient
) -> None:
    ufo = UfoDevice(await clients.device("ufo-1"))
    session_id = await _dispatch(http, "ufo-1", "notepad")

    # Recorded before the answer: the session is there, active, owned and run by the device.
    detail = await _session(http, session_id)
    session = detail["session"]
    assert (session["state"], session["task_name"]) == ("active", "notepad")
    assert (session["owner_id"], session["executor_id"]) == ("ufo-1", "ufo-1")
    assert await _result(http, "notepad") == {"status": "pending"}

    ufo.start()
    try:
        end = await ufo.task_end(WAIT)
    finally:
        await ufo.stop()
    assert (end["session_id"], end["status"], end["task_name"]) == (
        session_id,
        "completed",
        "notepad",
    )
    result = await eventually(lambda: _result(http, "notepad"), lambda r: r["status"] == "done")
    assert result["result"]["session_id"] == session_id
    assert result["result"]["status"] == "completed"
    assert result["result"]["result"] == []  # UFO's device ran no tool for the relay

    session = await _ended(http, session_id)
    assert session["state"] == "completed"
    # The device's own task request took up the dispatched session: no second session.
    assert await _sessions_of(http, "ufo-1") == [session_id]
    assert ufo.log == []


async def test_the_default_runner_is_answered_by_a_ufo_device(
    server: Server, clients: Clients, http: httpx.AsyncClient
) -> None:
    """A UFO device's own task (``--request``) ends promptly with the device's answer (the
    server's command_timeout is 600 s: waiting for it would fail this test)."""
    ufo = UfoDevice(await clients.device("ufo-own"))
    ufo.start()
    try:
        await ufo.request("open notepad", "own-task")
        end = await ufo.task_end(WAIT)
    finally:
        await ufo.stop()
    assert (end["status"], end["task_name"], end["result"]) == ("completed", "own-task", [])
    assert ufo.log == []
    (session_id,) = await _sessions_of(http, "ufo-own")
    assert end["session_id"] == session_id
    assert (await _ended(http, session_id))["state"] == "completed"


async def test_a_ufo_runner_addresses_the_device_tool_set(db_url: str) -> None:
    """What a UFO deployment plugs in: a runner that names the agent whose tools it calls."""
    async with running_server(db_url, runner="tests.server.runners:UfoToolsRunner") as server:
        clients = Clients(server)
        try:
            ufo = UfoDevice(await clients.device("ufo-tools"))
            ufo.start()
            async with server.http() as http:
                await _dispatch(http, "ufo-tools", "tools")
                end = await ufo.task_end(WAIT)
            await ufo.stop()
        finally:
            await clients.aclose()
    assert end["status"] == "completed", end
    assert end["result"][0]["result"] == ["select_application_window", "run_shell"]


async def test_a_dispatched_task_the_device_never_takes_up_fails(db_url: str) -> None:
    async with running_server(db_url, command_timeout=0.5) as server:
        clients = Clients(server)
        try:
            device = await clients.device("dev-deaf")  # reads the task frame, does nothing
            async with server.http() as http:
                session_id = await _dispatch(http, "dev-deaf", "deaf")
                assert (await device.recv())["type"] == "task"
                result = await eventually(
                    lambda: _result(http, "deaf"), lambda r: r["status"] == "done"
                )
                session = await _ended(http, session_id)
            end = await device.recv_type("task_end")
        finally:
            await clients.aclose()
    assert result["result"]["status"] == "failed"
    assert "did not take up" in result["result"]["error"]
    assert (session["state"], session["end_reason"]) == ("failed", result["result"]["error"])
    assert (end["session_id"], end["status"]) == (session_id, "failed")


async def test_a_dispatched_task_fails_when_its_device_leaves_before_taking_it(
    server: Server, clients: Clients, http: httpx.AsyncClient
) -> None:
    device = await clients.device("dev-gone")
    session_id = await _dispatch(http, "dev-gone", "gone")
    await device.close()
    result = await eventually(lambda: _result(http, "gone"), lambda r: r["status"] == "done")
    assert (result["result"]["status"], result["result"]["error"]) == (
        "failed",
        DEVICE_DISCONNECTED,
    )
    session = await _ended(http, session_id)
    assert (session["state"], session["end_reason"]) == ("failed", DEVICE_DISCONNECTED)
    assert server.sessions.active_count("dev-gone") == 0


async def test_dispatch_goes_to_devices_only(
    server: Server, clients: Clients, http: httpx.AsyncClient
) -> None:
    const = await clients.constellation("const-d")
    answer = await http.post("/api/dispatch", json={"client_id": "const-d", "request": "x"})
    assert answer.status_code == 400
    assert "device" in answer.json()["detail"]
    await const.nothing()
    await server.registry.flush()
    assert await sql(server.database_url, "SELECT session_id FROM sessions") == []


async def test_dispatch_respects_the_session_limit(db_url: str) -> None:
    async with running_server(db_url, max_sessions_per_client=1) as server:
        clients = Clients(server)
        try:
            await clients.device("dev-busy")
            async with server.http() as http:
                first = await _dispatch(http, "dev-busy", "first")
                answer = await http.post(
                    "/api/dispatch", json={"client_id": "dev-busy", "request": "x"}
                )
                assert answer.status_code == 429
                assert answer.json() == {"detail": "Too many active sessions (limit 1)"}
                assert await _sessions_of(http, "dev-busy") == [first]
        finally:
            await clients.aclose()
