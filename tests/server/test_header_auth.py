"""The API key at the WebSocket handshake: the ``X-API-Key`` header, else an ``Authorization:
Bearer`` header, else the ``token`` query parameter (UFO's clients)."""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support import API_KEY, WAIT, Server


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": API_KEY},
        {"Authorization": f"Bearer {API_KEY}"},
        {"Authorization": f"bearer  {API_KEY}"},
    ],
)
async def test_the_key_in_a_header_opens_the_socket(
    server: Server, headers: dict[str, str]
) -> None:
    async with connect(server.ws_url(None), additional_headers=headers, open_timeout=WAIT) as ws:
        await ws.send(json.dumps({"type": "register", "status": "ok", "client_id": "by-header"}))
        ack = json.loads(await ws.recv())
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
        assert server.registry.is_online("by-header")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": "wrong"},
        {"X-API-Key": ""},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer"},
    ],
)
async def test_a_wrong_key_in_a_header_is_refused_even_with_a_right_token(
    server: Server, headers: dict[str, str]
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.ws_url(), additional_headers=headers, open_timeout=WAIT)
    assert refused.value.response.status_code == 403


async def test_another_authorization_scheme_is_not_a_key(server: Server) -> None:
    headers = {"Authorization": f"Basic {API_KEY}"}
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.ws_url(None), additional_headers=headers, open_timeout=WAIT)
    assert refused.value.response.status_code == 403
