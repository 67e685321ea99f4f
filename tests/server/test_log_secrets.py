"""No credential in any log line: a real ``registry serve`` logging at ``trace`` (every uvicorn
line, the ASGI scopes included) is handed the API key every way a client can present it, and a
wrong key too; its whole output is then searched for both."""

from __future__ import annotations

import json
import secrets
import signal
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support import HOST, WAIT, Serve, free_port


async def _register(url: str, client_id: str, headers: dict[str, str] | None = None) -> None:
    async with connect(url, additional_headers=headers, open_timeout=WAIT) as ws:
        await ws.send(json.dumps({"type": "register", "status": "ok", "client_id": client_id}))
        assert json.loads(await ws.recv())["type"] == "heartbeat"


async def test_the_log_never_holds_the_api_key_nor_a_wrong_one(tmp_path: Path) -> None:
    key = f"key-{secrets.token_urlsafe(16)}"
    wrong = f"wrong-{secrets.token_urlsafe(16)}"
    log = tmp_path / "serve.log"
    port = free_port()
    served = Serve(
        f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}", port, log, api_key=key, log_level="trace"
    )
    try:
        await served.ready()
        ws_url = f"ws://{HOST}:{port}/ws"
        await _register(f"{ws_url}?token={key}", "by-query")  # UFO's clients
        await _register(f"{ws_url}?a=1&token={key}&b=2", "by-query-among-others")
        await _register(ws_url, "by-header", {"X-API-Key": key})
        await _register(ws_url, "by-bearer", {"Authorization": f"Bearer {key}"})
        with pytest.raises(InvalidStatus):
            await connect(f"{ws_url}?token={wrong}", open_timeout=WAIT)
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=WAIT) as http:
            # The key where it does not belong: in the query of HTTP routes.
            assert (await http.get(f"/api/health?token={key}")).status_code == 401
            assert (await http.get(f"/ws?token={key}")).status_code == 404
            answer = await http.get("/api/clients", headers={"X-API-Key": key})
            assert answer.status_code == 200
    finally:
        assert await served.stop(signal.SIGINT) in (0, 1)
    text = log.read_text(errors="replace")
    # The lines that used to hold the key are there, without it.
    assert '"WebSocket /ws?token=' in text, text
    assert "GET /api/health?token=" in text, text
    assert key not in text, [line for line in text.splitlines() if key in line]
    assert wrong not in text, [line for line in text.splitlines() if wrong in line]
