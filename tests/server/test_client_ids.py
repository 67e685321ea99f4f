"""Every client id that registration accepts is addressable over REST: ids that no URL path
could carry (``/``, control characters, ``.`` and ``..``) are refused at registration with
4400 and an error frame saying why; any other id, however odd, is reachable at
``/api/clients/{id}`` once percent-encoded."""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest

from registry.server import closecodes
from tests.support import Clients, Server, assert_error, sql

UNADDRESSABLE = {
    "a/b": "must not contain '/'",
    "/": "must not contain '/'",
    ".": "must not be '.' or '..'",
    "..": "must not be '.' or '..'",
    "a\x01b": "must not contain control characters",
    "line\nbreak": "must not contain control characters",
    "tab\tid": "must not contain control characters",
    "\x7f": "must not contain control characters",
    "a\x85b": "must not contain control characters",
}
ODD_BUT_VALID = [
    "with space",
    " leading and trailing ",
    "ünïcødé",
    "设备-1",
    "😀",
    "a?b",
    "a#b",
    "100%",
    "%2F",
    "a%2e%2e",
    "...",
    ".hidden",
    "a\\b",
    "a+b&c=d;e",
    "\u202eright-to-left",
    "x" * 255,
]


@pytest.fixture
def db_url(database_url: str) -> str:
    return database_url


@pytest.mark.parametrize("client_id", list(UNADDRESSABLE))
async def test_an_unaddressable_id_is_refused_at_registration(
    server: Server, clients: Clients, client_id: str
) -> None:
    client = await clients.open()
    await client.send(type="register", status="ok", client_id=client_id)
    frame = await client.recv()
    assert_error(frame, frame["error"])
    assert frame["error"].startswith("Invalid registration: client_id: "), frame
    assert UNADDRESSABLE[client_id] in frame["error"], frame
    assert (await client.closed())[0] == closecodes.INVALID_REGISTRATION
    assert server.registry.get_online_count() == 0
    await server.registry.flush()
    assert await sql(server.database_url, "SELECT client_id FROM clients") == []


async def test_every_other_odd_id_is_reachable_over_rest(server: Server, clients: Clients) -> None:
    for client_id in ODD_BUT_VALID:
        await clients.device(client_id)
    await server.registry.flush()
    async with server.http() as http:
        for client_id in ODD_BUT_VALID:
            path = f"/api/clients/{urllib.parse.quote(client_id, safe='')}"
            answer = await http.get(path)
            assert answer.status_code == 200, (client_id, answer.status_code, answer.text)
            body: dict[str, Any] = answer.json()
            assert body["client_id"] == client_id, body
            assert body["online"] is True, body
            connections = await http.get(f"{path}/connections")
            assert connections.status_code == 200, (client_id, connections.text)
            assert [row["client_id"] for row in connections.json()["items"]] == [client_id]
