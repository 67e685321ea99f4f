"""How ``registry serve`` listens: its socket and its uvicorn configuration, in one place, and
how it runs (:func:`run`: a start-up failure as an exception, a clean exit on SIGINT or
SIGTERM). An application that serves ``create_app`` with uvicorn itself should listen on
:func:`bind` too.

The socket is made here rather than by uvicorn so that every accepted connection inherits
``TCP_USER_TIMEOUT`` (Linux): the kernel drops a connection whose sent data has gone
unacknowledged for twice ``send_timeout``, which is what a peer that never reads does (its
receive window stays shut). Nothing above the kernel can end such a connection: asyncio closes
a transport only once its write buffer has drained, and a close frame waits behind the data.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from registry.errors import RegistryError
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


class _StartFailure:
    """ASGI wrapper that keeps the :class:`RegistryError` which stopped the app's start-up (the
    database unreachable, its schema behind, ...) for :func:`run` to raise, instead of the
    traceback Starlette hands uvicorn to log: such a failure is the operator's to fix, and is
    said in one line. Anything else still reaches uvicorn, traceback and all."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.error: RegistryError | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_start_failure(message: Message) -> None:
            # Starlette sends the failure (its message: the traceback) before it re-raises
            # the cause: hold it until the cause says whether to pass it on.
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_start_failure)
        except RegistryError as exc:
            if not held:
                raise
            self.error = exc
            await send({"type": "lifespan.startup.failed", "message": ""})
        except BaseException:
            for message in held:
                await send(message)
            raise


class _Server(uvicorn.Server):
    """uvicorn's server, calling ``on_start`` once it listens (uvicorn says nothing itself when
    given a socket)."""

    def __init__(self, config: uvicorn.Config, on_start: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_start = on_start

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            self._on_start()


@contextlib.contextmanager
def _stop_signals(server: uvicorn.Server) -> Iterator[None]:
    """SIGINT and SIGTERM ask ``server`` to shut down gracefully, and nothing more.

    While it serves, uvicorn's own handlers do that; once it has shut down it restores the
    handlers it found and raises each signal it caught again (uvicorn 0.29 and later), so that
    the process would die of it: -15 for SIGTERM, a KeyboardInterrupt for SIGINT. Those it
    finds are these, so the signal that asked for a clean shutdown ends in one, with exit code
    0. (A signal before uvicorn takes over asks the same.)"""

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(
    app: ASGIApp,
    settings: Settings,
    log_level: str,
    sock: socket.socket,
    on_start: Callable[[], None] = lambda: None,
) -> None:
    """Serve ``app`` on ``sock`` (from :func:`bind`) until SIGINT or SIGTERM, shut down
    gracefully and return; then close ``sock``. ``on_start`` is called once it listens.

    Raises the :class:`RegistryError` that stopped the app from starting."""
    guarded = _StartFailure(app)
    server = _Server(uvicorn_config(guarded, settings, log_level=log_level), on_start)
    try:
        with _stop_signals(server):
            server.run(sockets=[sock])
    except SystemExit:  # uvicorn's exit when the app did not start
        if guarded.error is not None:
            raise guarded.error from None
        raise
    finally:
        sock.close()
