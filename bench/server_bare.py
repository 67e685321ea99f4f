"""The baseline of the server benchmark: a bare FastAPI WebSocket endpoint.

``/ws`` accepts, then answers every text frame (the first one being the ``register``) with one
ack-shaped frame: the full server envelope, ``type: heartbeat``, ``status: ok``, a fresh
``response_id`` and ``timestamp``. No validation, no registry, no database, no middleware.

It is served exactly as ``registry serve`` serves (:mod:`registry.server.listen`: the same
socket options and uvicorn configuration, from the same :class:`~registry.settings.Settings`),
so both servers get the same WebSocket implementation, event loop, frame size limit, ping
interval/timeout and log level.

Run: ``python -m bench.server_bare --port 8765 --log-level warning``.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from registry.server import listen
from registry.server.protocol import ServerMessage
from registry.settings import Settings

#: The server envelope's fields in wire order (the registry's own model), all null unless set.
ENVELOPE_FIELDS = tuple(ServerMessage.model_fields)


def ack_frame() -> str:
    """One ``heartbeat``/``ok`` frame shaped like the registry's ack."""
    envelope: dict[str, Any] = dict.fromkeys(ENVELOPE_FIELDS)
    envelope.update(
        type="heartbeat",
        status="ok",
        timestamp=datetime.now(UTC).isoformat(),
        response_id=str(uuid.uuid4()),
    )
    return json.dumps(envelope, separators=(",", ":"))


def create_bare_app() -> FastAPI:
    """The baseline app: ``/ws`` acks every text frame until the peer goes away."""
    app = FastAPI(title="bare-baseline")

    @app.websocket("/ws")
    async def websocket_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.receive_text()
                await websocket.send_text(ack_frame())
        except WebSocketDisconnect:
            return

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Serve the baseline app on 127.0.0.1 until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    settings = Settings(host="127.0.0.1", port=args.port)
    sock = listen.bind(settings.host, settings.port, settings.send_timeout)
    listen.run(create_bare_app(), settings, args.log_level, sock)


if __name__ == "__main__":
    main()
