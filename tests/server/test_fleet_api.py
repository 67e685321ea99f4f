"""``/api/store``, ``/api/nodes`` and ``/api/disconnects``: the fleet at a glance, on SQLite
and PostgreSQL, against a real server and real clients."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import Clients, Server, eventually


@pytest.fixture
def db_url(database_url: str) -> str:
    return database_url


async def _get(server: Server, path: str, **params: Any) -> Any:
    async with server.http() as http:
        answer = await http.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()


async def test_store_status_says_healthy_with_the_journal_depth(server: Server) -> None:
    await server.registry.flush()
    body = await _get(server, "/api/store")
    assert body["healthy"] is True
    assert body["error"] is None
    assert 0 <= body["journal_depth"] < 10  # the node heartbeat may be queued
    assert body["journal_limit"] == server.registry.journal.limit
    assert body["refused"] == {}


async def test_nodes_count_the_connections_open_on_each(server: Server, clients: Clients) -> None:
    await clients.device("dev-1")
    leaving = await clients.device("dev-2")
    await server.registry.flush()
    (node,) = await _get(server, "/api/nodes")
    assert node["node_id"] == server.registry.node_id
    assert node["online"] == 2
    assert node["stopped_at"] is None
    await leaving.close()

    async def online() -> int:
        await server.registry.flush()
        return int((await _get(server, "/api/nodes", running=True))[0]["online"])

    await eventually(online, lambda count: count == 1)


async def test_disconnects_newest_first_and_only_abnormal_ones(
    server: Server, clients: Clients
) -> None:
    polite = await clients.device("polite")
    lost = await clients.device("lost")
    await polite.close()
    await eventually(lambda: _get(server, "/api/disconnects"), lambda body: len(body["items"]) == 1)
    lost.ws.transport.abort()  # no close frame: the connection is lost

    async def closed() -> Any:
        await server.registry.flush()
        return await _get(server, "/api/disconnects")

    every = await eventually(closed, lambda body: len(body["items"]) == 2)
    assert [row["client_id"] for row in every["items"]] == ["lost", "polite"]
    assert [row["close_reason"] for row in every["items"]] == ["connection_lost", "client_closed"]
    abnormal = await _get(server, "/api/disconnects", abnormal="true")
    assert [row["client_id"] for row in abnormal["items"]] == ["lost"]
    first = await _get(server, "/api/disconnects", limit=1)
    assert [row["client_id"] for row in first["items"]] == ["lost"]
    rest = await _get(server, "/api/disconnects", limit=1, cursor=first["next_cursor"])
    assert [row["client_id"] for row in rest["items"]] == ["polite"]
    assert rest["next_cursor"] is None


async def test_fleet_routes_need_the_key(server: Server) -> None:
    async with server.http(api_key="wrong") as http:
        for path in ("/api/store", "/api/nodes", "/api/online", "/api/disconnects"):
            assert (await http.get(path)).status_code == 401, path


async def test_online_lists_open_connections_newest_first_with_filters(
    server: Server, clients: Clients
) -> None:
    await clients.register("Dev-A", platform="windows")
    await clients.register("dev-b", platform="Linux")
    await clients.register("const-c", "constellation", platform="linux")
    gone = await clients.register("dev-gone", platform="linux")
    await gone.close()

    async def ids(**params: Any) -> list[str]:
        await server.registry.flush()
        body = await _get(server, "/api/online", **params)
        return [row["client_id"] for row in body["items"]]

    assert await eventually(ids, lambda found: "dev-gone" not in found) == [
        "const-c",
        "dev-b",
        "Dev-A",
    ]
    assert await ids(type="device") == ["dev-b", "Dev-A"]
    assert await ids(platform="LINUX") == ["const-c", "dev-b"]
    assert await ids(q="DEV-") == ["dev-b", "Dev-A"]  # a part of the id, in any case
    assert await ids(q="%") == []  # a LIKE wildcard is a plain character
    assert await ids(node=server.registry.node_id, type="constellation") == ["const-c"]
    assert await ids(node="elsewhere") == []
    first = await _get(server, "/api/online", limit=2)
    rest = await _get(server, "/api/online", limit=2, cursor=first["next_cursor"])
    assert [row["client_id"] for row in first["items"] + rest["items"]] == [
        "const-c",
        "dev-b",
        "Dev-A",
    ]
    assert rest["next_cursor"] is None
    async with server.http() as http:
        assert (await http.get("/api/online", params={"type": "toaster"})).status_code == 422
