"""Child process of ``test_twins.py``: one device client, in a process of its own so that the
test can freeze it (SIGSTOP) as a hung machine or a dropped network would.

Usage: ``python twin_client.py WS_URL CLIENT_ID``

It registers ``CLIENT_ID`` as a device and writes one JSON document a line to stdout:
``{"registered": true}`` once the acknowledgement came, ``{"frame": {...}}`` for each frame
after it, and ``{"closed": [code, reason]}`` when the connection ends. The ``websockets``
library answers the server's pings by itself, as UFO's client does, while the process runs.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


def emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


async def main(url: str, client_id: str) -> None:
    async with connect(url, ping_interval=None) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "register",
                    "status": "ok",
                    "client_type": "device",
                    "client_id": client_id,
                    "metadata": {"platform": "linux"},
                }
            )
        )
        ack = json.loads(await ws.recv())
        if (ack["type"], ack["status"]) != ("heartbeat", "ok"):
            raise SystemExit(f"registration refused: {ack}")
        emit({"registered": True})
        try:
            async for data in ws:
                emit({"frame": json.loads(data)})
        except ConnectionClosed:
            pass
        emit({"closed": [ws.close_code, ws.close_reason]})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
