"""Bounded waits for the store: how long the server holds a client for a commit.

The server acknowledges what a client starts (a registration, a task) only once it is durable,
and refuses it otherwise (see :mod:`registry.server.ws`). What *ends* (a disconnect, a session's
end) has happened whatever the store does: the server waits up to ``store_timeout`` for it to be
durable and then goes on, leaving it in the journal, which writes it when the store is back.
"""

from __future__ import annotations

import asyncio
import logging

from registry.registry import Registry

logger = logging.getLogger(__name__)


async def settle(registry: Registry, seconds: float, what: str) -> None:
    """Wait at most ``seconds`` for everything ``registry`` has journalled to be durable.

    On timeout it logs that ``what`` stays journalled and returns; other errors pass.
    """
    try:
        async with asyncio.timeout(seconds):
            await registry.flush()
    except TimeoutError:
        logger.warning(
            "%s not durable after %gs: the store is not keeping up; it stays journalled",
            what,
            seconds,
        )
