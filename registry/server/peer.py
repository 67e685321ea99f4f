"""One connected WebSocket as the server sees it (the transport, below the AIP rules):
serialised, time-bounded sends, received frames charged to a flood-control bucket, uvicorn's
disconnect events mapped to close codes and reasons, and a ping.

The registry stores the :class:`Peer` as the client's ``websocket``, so ``get_client`` returns
an object with the usual ``send_text``/``close`` that is safe to use from several tasks.

ASGI has no message for a WebSocket ping, so the server runs uvicorn with
:class:`PingingWebSocketProtocol` (:mod:`registry.server.listen`), which offers one to the
application in the connection's scope; :meth:`Peer.alive` uses it. Nothing else in the server
knows about it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame
from websockets.http11 import Request

from registry import closes
from registry.closes import Close
from registry.server.protocol import ServerMessage
from registry.server.tokenbucket import TokenBucket

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


class Closed(Exception):
    """The server closes (or has closed) the connection on purpose, as ``close`` says (the
    close frame's code and reason, and its disconnect record's)."""

    def __init__(self, close: Close) -> None:
        super().__init__(close.reason)
        self.close = close


class ServerShutdown(WebSocketDisconnect):
    """The server (uvicorn) is shutting down and closed the connection itself."""

    def __init__(self) -> None:
        super().__init__(closes.SERVER_SHUTDOWN.code, closes.SERVER_SHUTDOWN.reason)


class PeerState(enum.Enum):
    """Where a connection is, as far as what the server sends goes (see :data:`TRANSITIONS`)."""

    #: Accepted, registration not yet acknowledged: only the handshake's frames go out.
    HANDSHAKE = enum.auto()
    #: The handshake is over: frames go out while the socket is connected.
    OPEN = enum.auto()
    #: The server closed it, or decided to (:attr:`Peer.closed_by_server` says why).
    CLOSED = enum.auto()
    #: Given up as a slow consumer: nothing more goes out, not even a close frame.
    ABANDONED = enum.auto()


#: The transitions a peer may make; any other is a bug (:meth:`Peer._become` refuses it).
TRANSITIONS: dict[PeerState, frozenset[PeerState]] = {
    PeerState.HANDSHAKE: frozenset({PeerState.OPEN, PeerState.CLOSED, PeerState.ABANDONED}),
    PeerState.OPEN: frozenset({PeerState.CLOSED, PeerState.ABANDONED}),
    PeerState.CLOSED: frozenset({PeerState.ABANDONED}),  # its close frame got stuck
    PeerState.ABANDONED: frozenset(),
}


class Peer:
    """Sends to and receives from one WebSocket, one frame at a time.

    A send that waits longer than ``send_timeout`` (a peer that does not read) gives the peer
    up as :data:`~registry.closes.SLOW_CONSUMER` instead of blocking the sender or
    buffering without bound: no close frame (it would wait behind the unread data), but the
    connection's handler is cancelled, so the client is removed and its record closed at once;
    the kernel then drops the TCP connection (:mod:`registry.server.listen`).

    Until its handshake is over (:attr:`PeerState.HANDSHAKE`) the registry can hand the peer
    out as soon as the client is registered, but the clients read exactly one frame (the
    acknowledgement) after ``register``, so other senders wait (up to ``send_timeout``) until
    :meth:`send_first` has sent it or :meth:`open_gate` is called. The handshake itself uses
    :meth:`send_first`.
    """

    __slots__ = (
        "_bucket",
        "_handler",
        "_lock",
        "_past_handshake",
        "_send_timeout",
        "closed_by_server",
        "last_heard",
        "state",
        "websocket",
    )

    def __init__(
        self, websocket: WebSocket, send_timeout: float, frame_rate: float, frame_burst: float
    ) -> None:
        self.websocket = websocket
        self._send_timeout = send_timeout
        self._lock = asyncio.Lock()
        self.state = PeerState.HANDSHAKE
        #: Set once the state leaves HANDSHAKE: what gated senders wait for.
        self._past_handshake = asyncio.Event()
        #: Why the server closed it (set with the first move to CLOSED or ABANDONED).
        self.closed_by_server: Close | None = None
        #: The task serving this connection (the one that made the peer), until it finishes:
        #: the one to cancel when the peer is abandoned.
        self._handler: asyncio.Task[Any] | None = asyncio.current_task()
        now = asyncio.get_running_loop().time()
        #: Event-loop time of the last frame received (for the idle sweeper).
        self.last_heard = now
        self._bucket = TokenBucket(frame_rate, frame_burst, now)

    def _become(self, state: PeerState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"a peer cannot go from {self.state.name} to {state.name}")
        self.state = state
        self._past_handshake.set()

    async def receive(self) -> str | None:
        """The next text frame (None for a binary one).

        Raises :class:`Closed` when the server gave the peer up or closed it meanwhile, or when
        the frame finds the flood-control bucket empty (refilled at ``frame_rate`` up to
        ``frame_burst``, one token per frame: 4429 ``rate_limited``); raises
        ``WebSocketDisconnect`` when the client is gone: 1006 ``connection_lost`` for a
        connection lost without a close frame, :class:`ServerShutdown` when uvicorn closed it
        on shutdown, otherwise the client's own code and reason. Idle peers are closed by the
        endpoint's sweeper, which makes this raise too."""
        if self.state is PeerState.ABANDONED:  # given up by a send of this very task
            raise Closed(closes.SLOW_CONSUMER)
        message = await self.websocket.receive()
        now = asyncio.get_running_loop().time()
        within_rate = self._bucket.take(now)
        self.last_heard = now
        if message["type"] == "websocket.disconnect":
            raise _disconnect(message)
        if self.closed_by_server is not None:
            # Closed by the server meanwhile (replaced, idle): what the peer still sent is moot.
            raise Closed(self.closed_by_server)
        if not within_rate:
            raise Closed(closes.RATE_LIMITED)
        text: str | None = message.get("text")
        return text

    async def alive(self, within: float) -> bool:
        """Whether the peer answers a WebSocket ping within ``within`` seconds: a client
        frozen, or cut off without a FIN, does not (its TCP connection looks open for as long
        as nothing is sent). True when the server cannot ping (not served with
        :class:`PingingWebSocketProtocol`): a peer that cannot be checked is not given up."""
        extension = self.websocket.scope.get("extensions", {}).get(PING_EXTENSION)
        if extension is None:
            return True
        if self.state is PeerState.ABANDONED:
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
        if self.state is PeerState.HANDSHAKE:
            self._become(PeerState.OPEN)

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
        if not self._past_handshake.is_set():
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self._past_handshake.wait()
            except TimeoutError:
                return False
        return await self._send_text(data)

    async def _send_text(self, data: str) -> bool:
        try:
            async with self._lock:
                if (
                    self.state is PeerState.ABANDONED
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
        if self.state is PeerState.ABANDONED:
            return
        logger.warning("giving up a peer that has not read for %gs", self._send_timeout)
        self._become(PeerState.ABANDONED)
        if self.closed_by_server is None:
            self.closed_by_server = closes.SLOW_CONSUMER
        handler = self._handler
        if handler is not None and handler is not asyncio.current_task():
            handler.cancel()  # the handler itself finds ABANDONED before it next reads

    async def close(self, close: Close, *, within: float | None = None) -> None:
        """Close the connection (once) and remember why, for the disconnect record. A close
        frame the peer does not take ``within`` seconds (default ``send_timeout``) gives the
        peer up (as a send does), keeping this reason."""
        if self.closed_by_server is None:
            self.closed_by_server = close
        if self.state is PeerState.ABANDONED:
            return  # a close frame would wait behind what the peer does not read
        if self.state is not PeerState.CLOSED:
            self._become(PeerState.CLOSED)
        if self.websocket.application_state is WebSocketState.CONNECTED:
            try:
                async with asyncio.timeout(within or self._send_timeout):
                    await self.websocket.close(code=close.code, reason=close.reason)
            except TimeoutError:
                self._abandon()  # the close frame is stuck behind unread data
            except (RuntimeError, OSError, WebSocketDisconnect) as exc:
                logger.debug("close of a closed peer ignored: %r", exc)


def _disconnect(message: MutableMapping[str, Any]) -> WebSocketDisconnect:
    """The exception for uvicorn's ``websocket.disconnect`` event ``message``.

    uvicorn's own disconnect events carry no "reason" key; a client's close frame always does
    (possibly ""). Without one, 1005 is a connection lost without a close frame (recorded as
    1006), and 1012 is uvicorn closing it on shutdown."""
    code: int = message.get("code", closes.CLIENT_CLOSED.code)
    if "reason" not in message:
        if code == 1005:
            return WebSocketDisconnect(closes.CONNECTION_LOST.code, closes.CONNECTION_LOST.reason)
        if code == closes.SERVER_SHUTDOWN.code:
            return ServerShutdown()
    reason: str | None = message.get("reason")
    # The reason is the client's text: keep it storable (PostgreSQL refuses NUL).
    return WebSocketDisconnect(code, reason.replace("\x00", "\ufffd") if reason else None)
