"""One connected WebSocket as the server sees it: serialised, time-bounded sends.

The registry stores the :class:`Peer` as the client's ``websocket``, so ``get_client`` returns
an object with the usual ``send_text``/``close`` that is safe to use from several tasks.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.websockets import WebSocket, WebSocketState

from registry.server import closecodes
from registry.server.protocol import ServerMessage

logger = logging.getLogger(__name__)


class Peer:
    """Sends to one WebSocket, one frame at a time.

    A send that waits longer than ``send_timeout`` (a peer that does not read) closes the
    connection with :data:`~registry.server.closecodes.SLOW_CONSUMER` instead of blocking the
    sender or buffering without bound.
    """

    def __init__(self, websocket: WebSocket, send_timeout: float) -> None:
        self.websocket = websocket
        self._send_timeout = send_timeout
        self._lock = asyncio.Lock()
        self.closed_by_server: tuple[int, str] | None = None

    async def send_text(self, data: str) -> bool:
        """Send one text frame; False if the peer is gone or was closed for being slow."""
        try:
            async with self._lock:
                if self.websocket.application_state is not WebSocketState.CONNECTED:
                    return False
                async with asyncio.timeout(self._send_timeout):
                    await self.websocket.send_text(data)
            return True
        except TimeoutError:
            logger.warning("closing a peer that has not read for %.0fs", self._send_timeout)
            await self.close(closecodes.SLOW_CONSUMER, "slow_consumer")
        except (RuntimeError, OSError) as exc:  # disconnected underneath us
            logger.debug("send to a closed peer dropped: %s", exc)
        return False

    async def send(self, message: ServerMessage) -> bool:
        return await self.send_text(message.frame())

    async def close(self, code: int, reason: str) -> None:
        """Close the connection (once) and remember why, for the disconnect record."""
        if self.closed_by_server is None:
            self.closed_by_server = (code, reason)
        if self.websocket.application_state is WebSocketState.CONNECTED:
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self.websocket.close(code=code, reason=reason)
            except (TimeoutError, RuntimeError, OSError) as exc:
                logger.debug("close of a closed peer ignored: %s", exc)
