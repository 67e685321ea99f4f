"""How ``registry serve`` listens: its socket and its uvicorn configuration, in one place. An
application that serves ``create_app`` with uvicorn itself should listen on :func:`bind` too.

The socket is made here rather than by uvicorn so that every accepted connection inherits
``TCP_USER_TIMEOUT`` (Linux): the kernel drops a connection whose sent data has gone
unacknowledged for twice ``send_timeout``, which is what a peer that never reads does (its
receive window stays shut). Nothing above the kernel can end such a connection: asyncio closes
a transport only once its write buffer has drained, and a close frame waits behind the data.
"""

from __future__ import annotations

import socket
from typing import Any

import uvicorn

from registry.server.peer import PingingWebSocketProtocol
from registry.settings import Settings

#: Unacknowledged data is given this many ``send_timeout`` periods before the kernel drops the
#: connection, so that the server's own slow-consumer verdict (4410, after one) normally comes
#: first; a peer that stops reading while the server has little to send it may be dropped by
#: the kernel first, and is then recorded as ``connection_lost``.
UNACKNOWLEDGED_SEND_TIMEOUTS = 2


def bind(host: str, port: int, send_timeout: float) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free one) for uvicorn to listen on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux only
            milliseconds = int(send_timeout * UNACKNOWLEDGED_SEND_TIMEOUTS * 1000)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, milliseconds)
        sock.bind((host.strip("[]"), port))
    except BaseException:
        sock.close()
        raise
    return sock


def uvicorn_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration ``registry serve`` runs ``app`` with; ``options`` add to it
    or override it. Its WebSocket protocol lets the server ping a client at will (the twin
    check of :mod:`registry.server.ws`)."""
    serve: dict[str, Any] = {
        "ws": PingingWebSocketProtocol,
        "host": settings.host,
        "port": settings.port,
        "ws_max_size": settings.max_frame_bytes,
        "ws_ping_interval": settings.ping_interval,
        "ws_ping_timeout": settings.ping_timeout,
        "proxy_headers": False,
    }
    return uvicorn.Config(app, **(serve | options))


def run(app: Any, settings: Settings, log_level: str, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` (from :func:`bind`) until interrupted; then close it."""
    try:
        uvicorn.Server(uvicorn_config(app, settings, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()
