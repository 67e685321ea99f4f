"""One connected WebSocket as the server sees it: serialised, time-bounded sends.

The registry stores the :class:`Peer` as the client's ``websocket``, so ``get_client`` returns
an object with the usual ``send_text``/``close`` that is safe to use from several tasks.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from registry.server import closecodes
from registry.server.protocol import ServerMessage

logger = logging.getLogger(__name__)


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

    async def close(self, code: int, reason: str) -> None:
        """Close the connection (once) and remember why, for the disconnect record. A close
        frame the peer does not take within ``send_timeout`` gives the peer up (as a send
        does), keeping this reason."""
        if self.closed_by_server is None:
            self.closed_by_server = (code, reason)
        if self.abandoned:
            return  # a close frame would wait behind what the peer does not read
        if self.websocket.application_state is WebSocketState.CONNECTED:
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self.websocket.close(code=code, reason=reason)
            except TimeoutError:
                self._abandon()  # the close frame is stuck behind unread data
            except (RuntimeError, OSError, WebSocketDisconnect) as exc:
                logger.debug("close of a closed peer ignored: %r", exc)
