"""Tokens at the WebSocket handshake, the API key on /api, and the Host-header allow-list."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support import API_KEY, HOST, WAIT, Clients, Server, running_server, sql


@pytest.mark.parametrize("token", [None, "", "wrong", API_KEY + "x", "K"])
async def test_missing_or_wrong_token_is_refused_at_the_handshake(
    server: Server, clients: Clients, token: str | None
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await clients.open(token=token)
    assert refused.value.response.status_code == 403
    assert server.registry.get_online_count() == 0
    await server.registry.flush()
    assert await sql(server.database_url, "SELECT connection_id FROM connections") == []


async def test_right_token_is_accepted(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-ok")
    assert (await device.heartbeat())["status"] == "ok"


async def test_without_a_configured_key_no_token_is_needed(db_url: str) -> None:
    async with running_server(db_url, api_key=None) as server:
        opened = Clients(server)
        try:
            client = await opened.open(token=None)
            await client.send(type="register", status="ok", client_id="open-dev")
            assert (await client.recv())["type"] == "heartbeat"
            async with server.http(api_key=None) as http:
                answer = await http.get("/api/clients")
            assert answer.status_code == 200
            assert answer.json() == {"online_clients": ["open-dev"]}
        finally:
            await opened.aclose()


@pytest.mark.parametrize("route", ["/api/clients", "/api/health", "/api/task_result/x"])
async def test_wrong_api_key_is_401(server: Server, route: str) -> None:
    async with server.http(api_key="wrong") as http:
        answer = await http.get(route)
    assert answer.status_code == 401
    assert answer.json() == {"detail": "Invalid API key"}


@pytest.mark.parametrize("route", ["/api/clients", "/api/health", "/api/task_result/x"])
async def test_missing_api_key_is_refused(server: Server, route: str) -> None:
    async with server.http(api_key=None) as http:
        answer = await http.get(route)
    assert answer.status_code == 401
    assert answer.json() == {"detail": "Missing API key (X-API-Key header)"}


async def test_wrong_api_key_cannot_dispatch(server: Server, clients: Clients) -> None:
    device = await clients.device("dev-guarded")
    async with server.http(api_key="wrong") as http:
        answer = await http.post(
            "/api/dispatch", json={"client_id": "dev-guarded", "request": "rm -rf /"}
        )
    assert answer.status_code == 401
    assert answer.json() == {"detail": "Invalid API key"}
    await device.nothing()


async def test_foreign_host_header_is_refused_on_http(server: Server) -> None:
    async with server.http() as http:
        answer = await http.get("/api/health", headers={"Host": "evil.example"})
        assert answer.status_code == 400
        # The loopback names are accepted.
        for host in ("localhost", "127.0.0.1", f"127.0.0.1:{server.port}"):
            good = await http.get("/api/health", headers={"Host": host})
            assert good.status_code == 200, host


async def test_foreign_host_header_is_refused_on_the_websocket_handshake(
    server: Server,
) -> None:
    uri = f"ws://evil.example:{server.port}/ws?token={API_KEY}"
    with pytest.raises(InvalidStatus) as refused:
        # Connect to the loopback server while presenting a foreign Host header.
        await connect(uri, host=HOST, port=server.port, open_timeout=WAIT)
    assert refused.value.response.status_code in (400, 403)
    assert server.registry.get_online_count() == 0


async def test_allowed_hosts_setting_is_honoured(db_url: str) -> None:
    async with (
        running_server(db_url, allowed_hosts=["registry.internal"]) as server,
        server.http() as http,
    ):
        assert (await http.get("/api/health")).status_code == 400
        answer = await http.get("/api/health", headers={"Host": "registry.internal"})
        assert answer.status_code == 200
