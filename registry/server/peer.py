"""One connected WebSocket as the server sees it: serialised, time-bounded sends, and a ping.

The registry stores the :class:`Peer` as the client's ``websocket``, so ``get_client`` returns
an object with the usual ``send_text``/``close`` that is safe to use from several tasks.

ASGI has no message for a WebSocket ping, so the server runs uvicorn with
:class:`PingingWebSocketProtocol` (:mod:`registry.server.listen`), which offers one to the
application in the connection's scope; :meth:`Peer.alive` uses it. Nothing else in the server
knows about it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.http11 import Request

from registry.server import closecodes
from registry.server.protocol import ServerMessage

logger = logging.getLogger(__name__)

#: The scope extension under which :class:`PingingWebSocketProtocol` offers its ping.
PING_EXTENSION = "registry.websocket.ping"


class PingingWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (the ``websockets`` sans-I/O one, uvicorn's default), plus
    a ping the application can await: ``scope["extensions"][PING_EXTENSION]["ping"]``, a
    coroutine function that sends a ping and returns True once its pong comes back, or False
    at once if the connection is closing or closed.

    uvicorn's own keepalive pings carry 4-byte payloads and ignore other pongs; these carry 8
    bytes, so neither takes the other's pong."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pongs: dict[bytes, asyncio.Future[None]] = {}

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:  # upgraded: the app's task has not run yet
            self.scope["extensions"][PING_EXTENSION] = {"ping": self.ping}

    async def ping(self) -> bool:
        if self.close_sent or self.disconnected or self.transport.is_closing():
            return False
        payload = os.urandom(8)
        pong = self.loop.create_future()
        self._pongs[payload] = pong
        try:
            self.conn.send_ping(payload)
            self.transport.write(b"".join(self.conn.data_to_send()))
            await pong
        finally:
            del self._pongs[payload]
        return True

    def handle_pong(self, event: Frame) -> None:
        pong = self._pongs.get(bytes(event.data))
        if pong is not None and not pong.done():
            pong.set_result(None)
        super().handle_pong(event)


class Peer:
    """Sends to one WebSocket, one frame at a time.

    A send that waits longer than ``send_timeout`` (a peer that does not read) gives the peer
    up as :data:`~registry.server.closecodes.SLOW_CONSUMER` instead of blocking the sender or
    buffering without bound: no close frame (it would wait behind the unread data), but the
    connection's handler is cancelled, so the client is removed and its record closed at once;
    the kernel then drops the TCP connection (:mod:`registry.server.listen`).

    The peer is *gated* until its handshake is over: the registry can hand it out as soon as
    the client is registered, but the clients read exactly one frame (the acknowledgement) after
    ``register``, so other senders wait (up to ``send_timeout``) until :meth:`send_first` has
    sent it or :meth:`open_gate` is called. The handshake itself uses :meth:`send_first`.
    """

    def __init__(self, websocket: WebSocket, send_timeout: float) -> None:
        self.websocket = websocket
        self._send_timeout = send_timeout
        self._lock = asyncio.Lock()
        self._gate = asyncio.Event()
        self.closed_by_server: tuple[int, str] | None = None
        #: Set when the peer was given up as a slow consumer (its handler was cancelled).
        self.abandoned = False
        #: The task serving this connection (the one that made the peer), until it finishes.
        self._handler: asyncio.Task[Any] | None = asyncio.current_task()
        #: Event-loop time of the last frame received (for the idle sweeper and flood control).
        self.last_heard = asyncio.get_running_loop().time()
        #: Frames the peer may still send back to back (flood control's token bucket; the
        #: receive loop fills it up to ``frame_burst`` and spends one token per frame).
        self.frame_allowance = 0.0

    async def alive(self, within: float) -> bool:
        """Whether the peer answers a WebSocket ping within ``within`` seconds: a client
        frozen, or cut off without a FIN, does not (its TCP connection looks open for as long
        as nothing is sent). True when the server cannot ping (not served with
        :class:`PingingWebSocketProtocol`): a peer that cannot be checked is not given up."""
        extension = self.websocket.scope.get("extensions", {}).get(PING_EXTENSION)
        if extension is None:
            return True
        if self.abandoned:
            return False
        ping: Callable[[], Awaitable[bool]] = extension["ping"]
        try:
            async with asyncio.timeout(within):
                return await ping()
        except TimeoutError:
            return False

    def finished(self) -> None:
        """The handler is done serving (it is cleaning up): it must not be cancelled now."""
        self._handler = None

    def open_gate(self) -> None:
        """Let every sender through (once the handshake is over, whatever its outcome)."""
        self._gate.set()

    async def send_first(self, message: ServerMessage, *, open_gate: bool = False) -> bool:
        """Send ``message`` ahead of the gated senders; then open the gate if asked."""
        try:
            return await self._send_text(message.frame())
        finally:
            if open_gate:
                self.open_gate()

    async def send_text(self, data: str) -> bool:
        """Send one text frame; False if the peer is gone, was closed for being slow, or did
        not finish its handshake within ``send_timeout``."""
        if not self._gate.is_set():
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self._gate.wait()
            except TimeoutError:
                return False
        return await self._send_text(data)

    async def _send_text(self, data: str) -> bool:
        try:
            async with self._lock:
                if (
                    self.abandoned
                    or self.websocket.application_state is not WebSocketState.CONNECTED
                ):
                    return False
                async with asyncio.timeout(self._send_timeout):
                    await self.websocket.send_text(data)
            return True
        except TimeoutError:
            self._abandon()
        except (RuntimeError, OSError, WebSocketDisconnect) as exc:  # disconnected underneath us
            # Starlette turns the server's "client disconnected" into WebSocketDisconnect.
            logger.debug("send to a closed peer dropped: %r", exc)
        return False

    async def send(self, message: ServerMessage) -> bool:
        return await self.send_text(message.frame())

    def _abandon(self) -> None:
        """Give up a peer that has not read for ``send_timeout``: record why and end its
        handler (cancelled, or, if it is the caller, at its next read)."""
        if self.abandoned:
            return
        logger.warning("giving up a peer that has not read for %gs", self._send_timeout)
        self.abandoned = True
        if self.closed_by_server is None:
            self.closed_by_server = (closecodes.SLOW_CONSUMER, "slow_consumer")
        handler = self._handler
        if handler is not None and handler is not asyncio.current_task():
            handler.cancel()  # the handler itself finds ``abandoned`` before it next reads

    async def close(self, code: int, reason: str, *, within: float | None = None) -> None:
        """Close the connection (once) and remember why, for the disconnect record. A close
        frame the peer does not take ``within`` seconds (default ``send_timeout``) gives the
        peer up (as a send does), keeping this reason."""
        if self.closed_by_server is None:
            self.closed_by_server = (code, reason)
        if self.abandoned:
            return  # a close frame would wait behind what the peer does not read
        if self.websocket.application_state is WebSocketState.CONNECTED:
            try:
                async with asyncio.timeout(within or self._send_timeout):
                    await self.websocket.close(code=code, reason=reason)
            except TimeoutError:
                self._abandon()  # the close frame is stuck behind unread data
            except (RuntimeError, OSError, WebSocketDisconnect) as exc:
                logger.debug("close of a closed peer ignored: %r", exc)
