"""The HTTP API existing tools expect (docs/protocol.md), with exact shapes."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from tests.support import Clients, Server, assert_server_frame


async def test_clients_and_health_list_the_online_clients(server: Server, clients: Clients) -> None:
    async with server.http() as http:
        assert (await http.get("/api/clients")).json() == {"online_clients": []}
        assert (await http.get("/api/health")).json() == {
            "status": "healthy",
            "online_clients": [],
        }
        await clients.device("dev-1")
        await clients.device("dev-2")
        const = await clients.constellation("const-1")

        answer = await http.get("/api/clients")
        assert answer.status_code == 200
        body = answer.json()
        assert list(body) == ["online_clients"]
        assert sorted(body["online_clients"]) == ["const-1", "dev-1", "dev-2"]

        answer = await http.get("/api/health")
        assert answer.status_code == 200
        body = answer.json()
        assert list(body) == ["status", "online_clients"]
        assert body["status"] == "healthy"
        assert sorted(body["online_clients"]) == ["const-1", "dev-1", "dev-2"]

        await const.close()
        for _ in range(200):
            body = (await http.get("/api/clients")).json()
            if "const-1" not in body["online_clients"]:
                break
            await asyncio.sleep(0.02)
        assert sorted(body["online_clients"]) == ["dev-1", "dev-2"]


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"client_id": "dev-d", "request": ""}, 400, "Empty task content"),
        ({"client_id": "dev-d"}, 400, "Empty task content"),
        ({"client_id": "", "request": "x"}, 400, "Empty client ID"),
        ({"request": "x"}, 400, "Empty client ID"),
        ({"client_id": "", "request": ""}, 400, "Empty task content"),
        ({"client_id": "nobody", "request": "x"}, 404, "Client not online"),
    ],
)
async def test_dispatch_validation(
    server: Server, clients: Clients, body: dict[str, Any], status: int, detail: str
) -> None:
    device = await clients.device("dev-d")
    async with server.http() as http:
        answer = await http.post("/api/dispatch", json=body)
    assert answer.status_code == status
    assert answer.json() == {"detail": detail}
    await device.nothing()


@pytest.mark.parametrize("task_name", ["../etc/passwd", "a b", ".hidden", "x/y", "tâche"])
async def test_dispatch_refuses_an_unsafe_task_name(
    server: Server, clients: Clients, task_name: str
) -> None:
    device = await clients.device("dev-unsafe")
    async with server.http() as http:
        answer = await http.post(
            "/api/dispatch",
            json={"client_id": "dev-unsafe", "request": "x", "task_name": task_name},
        )
    assert answer.status_code == 400
    assert isinstance(answer.json()["detail"], str)
    await device.nothing()


async def test_dispatch_sends_a_task_frame_to_the_client(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-go")
    bystander = await clients.device("dev-bystander")
    async with server.http() as http:
        answer = await http.post(
            "/api/dispatch",
            json={"client_id": "dev-go", "request": "open the pod bay doors", "task_name": "t-1"},
        )
    assert answer.status_code == 200
    body = answer.json()
    assert list(body) == ["status", "task_name", "client_id", "session_id"]
    assert body["status"] == "dispatched"
    assert body["task_name"] == "t-1"
    assert body["client_id"] == "dev-go"
    uuid.UUID(body["session_id"])

    frame = await device.recv()
    assert_server_frame(frame)
    assert frame["type"] == "task"
    assert frame["user_request"] == "open the pod bay doors"
    assert frame["task_name"] == "t-1"
    assert frame["session_id"] == body["session_id"]
    await device.nothing()
    await bystander.nothing()


async def test_dispatch_without_task_name_gets_a_uuid(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-anon")
    async with server.http() as http:
        answer = await http.post("/api/dispatch", json={"client_id": "dev-anon", "request": "x"})
    assert answer.status_code == 200
    task_name = answer.json()["task_name"]
    uuid.UUID(task_name)
    assert (await device.recv())["task_name"] == task_name


async def test_task_result_is_pending_then_done(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-res")
    async with server.http() as http:
        assert (await http.get("/api/task_result/job-r")).json() == {"status": "pending"}
        await device.send(
            type="task", status="continue", session_id="res@1", task_name="job-r", request="x"
        )
        assert (await device.recv())["session_id"] == "res@1"
        command = await device.recv()
        assert (await http.get("/api/task_result/job-r")).json() == {"status": "pending"}
        results = [{"status": "success", "error": None, "result": "42", "namespace": None}]
        await device.send(
            type="command_results",
            status="completed",
            session_id="res@1",
            prev_response_id=command["response_id"],
            action_results=results,
        )
        assert (await device.recv())["type"] == "task_end"
        answer = await http.get("/api/task_result/job-r")
    assert answer.status_code == 200
    body = answer.json()
    assert list(body) == ["status", "result"]
    assert body["status"] == "done"
    assert body["result"]["status"] == "completed"
    assert body["result"]["session_id"] == "res@1"
    assert body["result"]["result"][0]["result"] == "42"


async def test_task_result_never_blocks_while_a_session_is_stuck(
    server: Server, clients: Clients
) -> None:
    device = await clients.device("dev-stuck")
    const = await clients.constellation("const-stuck")
    await const.send(
        type="task",
        status="continue",
        client_type="constellation",
        target_id="dev-stuck",
        session_id="stuck@1",
        task_name="stuck",
        request="x",
    )
    assert (await const.recv())["session_id"] == "stuck@1"
    assert (await device.recv())["type"] == "command"  # never answered
    async with server.http() as http:
        for route in ("/api/task_result/stuck", "/api/health", "/api/clients"):
            started = time.monotonic()
            answer = await http.get(route)
            assert time.monotonic() - started < 1.0, route
            assert answer.status_code == 200
        assert (await http.get("/api/task_result/stuck")).json() == {"status": "pending"}
    # The stuck session still holds (and the server still serves its clients).
    assert server.registry.get_session("stuck@1") is not None
    assert (await const.heartbeat())["type"] == "heartbeat"
