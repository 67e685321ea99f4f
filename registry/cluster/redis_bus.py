"""The bus over Redis pub/sub, with redis-py's asyncio client (for ``redis://``, ``rediss://``
and ``unix://`` bus URLs; this module is imported only when one is used).

Channels: node ``X`` subscribes to ``<prefix>node:X`` (what is sent to it, and the answers to
its requests) and to ``<prefix>broadcast``. One connection from redis-py's pool holds the
subscription; publishing takes the others.

How it fails, beyond the contract in :mod:`registry.cluster.bus`:

- Redis commands and connection attempts time out after ``timeout`` seconds (default 2 s),
  and redis-py's own retries are off: a command that fails raises at once, as
  :class:`~registry.errors.BusUnavailableError`. The bus never repeats a publish.
- A subscription silent for ``ping_interval`` seconds (default 5 s) gets a PING; without any
  answer within another ``ping_interval`` the connection counts as lost (a frozen server or a
  network that drops packets without a reset does not keep the bus waiting on TCP timeouts).
- On a lost connection, requests waiting for an answer fail at once (an answer published while
  the subscription is down is lost), :attr:`RedisBus.healthy` turns False, and the listener
  subscribes again after 0.1 s, 0.2 s, 0.4 s, ... at most 5 s apart, until it succeeds. The loss
  is an ERROR log line and the recovery a WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any, Literal, Self
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from registry.cluster.bus import DEFAULT_REQUEST_TIMEOUT, Handler, RemoteError
from registry.cluster.message import Message, RecentIds, decode, encode, new_id
from registry.errors import (
    BusTimeoutError,
    BusUnavailableError,
    InvalidArgumentError,
    RegistryError,
    describe,
)
from registry.validation import require_id

logger = logging.getLogger(__name__)

RECONNECT_INITIAL_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 5.0
DEFAULT_TIMEOUT = 2.0
DEFAULT_PING_INTERVAL = 5.0
#: How many message ids a receiver remembers to drop duplicates (about 1.5 MB).
SEEN_IDS = 10_000
#: Characters of a dropped non-message quoted in the log.
_QUOTED = 200

State = Literal["new", "connected", "reconnecting", "closed"]


def redacted(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***`` (for logs and faults)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


async def _close(pubsub: PubSub) -> None:
    """Close a subscription and give its connection back to the pool, whatever its state."""
    with contextlib.suppress(RedisError, OSError):
        await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped


class RedisBus:
    """A :class:`~registry.cluster.bus.Bus` over Redis pub/sub (see the module docstring).

    ``channel_prefix`` starts every channel name: nodes share a bus only if they share it and
    the Redis database (the URL's ``/N``; pub/sub itself ignores the database number, so the
    database is part of the default prefix).
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        channel_prefix: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        ping_interval: float = DEFAULT_PING_INTERVAL,
    ) -> None:
        self._node_id = require_id("node_id", node_id)
        for name, value in (("timeout", timeout), ("ping_interval", ping_interval)):
            if not value > 0:
                raise InvalidArgumentError(name, "must be positive")
        self._url = url
        try:
            self._redis = Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise InvalidArgumentError("bus_url", f"{redacted(url)}: {exc}") from exc
        if channel_prefix is None:
            db = self._redis.connection_pool.connection_kwargs.get("db", 0)
            channel_prefix = f"registry:{db}:"
        self._prefix = channel_prefix
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._handlers: dict[str, Handler] = {}
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._seen = RecentIds(SEEN_IDS)
        self._events: asyncio.Queue[Message] = asyncio.Queue()
        self._answering: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._state: State = "new"
        self._error = ""
        self._down_since = 0.0

    # -- the Bus interface ----------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def healthy(self) -> bool:
        return self._state == "connected"

    def fault(self) -> str | None:
        if self._state == "connected":
            return None
        if self._state == "new":
            return "the bus is not connected"
        if self._state == "closed":
            return "the bus is closed"
        down = time.monotonic() - self._down_since
        return (
            f"the bus at {redacted(self._url)} is unreachable ({self._error}) "
            f"for {down:.1f}s; reconnecting"
        )

    def on(self, kind: str, handler: Handler) -> None:
        require_id("kind", kind)
        if kind in self._handlers:
            raise InvalidArgumentError("kind", f"'{kind}' has a handler already")
        self._handlers[kind] = handler

    async def connect(self) -> None:
        if self._state == "closed":
            raise BusUnavailableError("the bus is closed")
        if self._state != "new":
            return
        try:
            pubsub = await self._subscribe()
        except (RedisError, OSError) as exc:
            raise BusUnavailableError(
                f"the bus at {redacted(self._url)} is unreachable: {describe(exc)}"
            ) from exc
        self._state = "connected"
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(pubsub), name=f"bus {self._node_id}: listener"),
            loop.create_task(self._deliver(), name=f"bus {self._node_id}: events"),
        ]

    async def close(self) -> None:
        if self._state == "closed":
            return
        self._state = "closed"
        tasks = [*self._tasks, *self._answering]
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait does not raise the tasks' CancelledError, only a cancellation of
            # close() itself.
            await asyncio.wait(tasks)
        self._fail_pending("the bus was closed")
        await self._redis.aclose()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def send(self, node_id: str, kind: str, payload: Any = None) -> None:
        channel = self._node_channel(require_id("node_id", node_id))
        data = encode(Message(new_id(), self._node_id, "event", require_id("kind", kind), payload))
        if not await self._publish(channel, data):
            raise BusUnavailableError(f"node '{node_id}' is not listening on the bus")

    async def broadcast(self, kind: str, payload: Any = None) -> None:
        data = encode(Message(new_id(), self._node_id, "event", require_id("kind", kind), payload))
        await self._publish(self._broadcast_channel, data)

    async def request(
        self,
        node_id: str,
        kind: str,
        payload: Any = None,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,  # noqa: ASYNC109 (sent along: see Bus.request)
    ) -> Any:
        channel = self._node_channel(require_id("node_id", node_id))
        if not 0 < timeout < math.inf:
            raise InvalidArgumentError("timeout", "must be a positive number of seconds")
        message = Message(
            new_id(), self._node_id, "request", require_id("kind", kind), payload, timeout
        )
        data = encode(message)
        answer = asyncio.get_running_loop().create_future()
        self._pending[message.id] = answer
        try:
            async with asyncio.timeout(timeout):
                if not await self._publish(channel, data):
                    raise BusUnavailableError(f"node '{node_id}' is not listening on the bus")
                return await answer
        except TimeoutError:
            raise BusTimeoutError(
                f"node '{node_id}' did not answer '{kind}' within {timeout:g}s"
            ) from None
        finally:
            self._pending.pop(message.id, None)

    # -- sending --------------------------------------------------------------------------------

    def _node_channel(self, node_id: str) -> str:
        return f"{self._prefix}node:{node_id}"

    @property
    def _broadcast_channel(self) -> str:
        return f"{self._prefix}broadcast"

    async def _publish(self, channel: str, data: bytes) -> int:
        """Publish ``data`` once; how many subscribers Redis delivered it to."""
        fault = self.fault()
        if fault is not None:
            raise BusUnavailableError(fault)
        try:
            return int(await self._redis.publish(channel, data))
        except (RedisError, OSError) as exc:
            raise BusUnavailableError(
                f"the bus at {redacted(self._url)} failed to publish: {describe(exc)}"
            ) from exc

    # -- receiving ------------------------------------------------------------------------------

    async def _subscribe(self) -> PubSub:
        """A new subscription to this node's channels, confirmed by Redis."""
        pubsub = self._redis.pubsub()
        try:
            async with asyncio.timeout(self._timeout):
                channels = {self._node_channel(self._node_id), self._broadcast_channel}
                await pubsub.subscribe(*channels)
                while channels:
                    reply = await pubsub.get_message(timeout=self._timeout)
                    if reply is not None and reply["type"] == "subscribe":
                        channels.discard(reply["channel"].decode())
        except BaseException as exc:
            await _close(pubsub)
            if isinstance(exc, TimeoutError):  # asyncio.timeout's, which says nothing
                raise RedisTimeoutError(
                    f"the subscription was not confirmed within {self._timeout:g}s"
                ) from None
            raise
        return pubsub

    async def _listen(self, pubsub: PubSub) -> None:
        """The listener task: read and dispatch; on a lost connection, subscribe again."""
        try:
            while True:
                try:
                    await self._read(pubsub)
                except Exception as exc:  # the connection is unusable, whatever went wrong
                    self._lost(exc)
                await _close(pubsub)
                # The pool's idle connections went the same way: a publish must not find one
                # after a restarted Redis is back (redis-py would notice only by failing).
                with contextlib.suppress(RedisError, OSError):
                    await self._redis.connection_pool.disconnect(inuse_connections=False)
                pubsub = await self._resubscribe()
        finally:
            await _close(pubsub)

    async def _read(self, pubsub: PubSub) -> None:
        """Dispatch what the subscription brings until its connection fails (raises)."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        while True:
            item = await pubsub.get_message(timeout=self._ping_interval / 4)
            if item is not None:
                heard, pinged = loop.time(), False
                if item["type"] == "message":
                    self._receive(item["channel"], item["data"])
                continue
            silent = loop.time() - heard
            if silent >= 2 * self._ping_interval:
                raise RedisConnectionError(f"no answer to PING for {silent:.1f}s")
            if silent >= self._ping_interval and not pinged:
                await pubsub.ping()
                pinged = True

    def _lost(self, exc: Exception) -> None:
        self._state = "reconnecting"
        self._error = describe(exc)
        self._down_since = time.monotonic()
        logger.error(
            "the bus lost its connection to %s (%s); reconnecting",
            redacted(self._url),
            self._error,
            exc_info=not isinstance(exc, RedisError | OSError),
        )
        self._fail_pending(f"the bus lost its connection ({self._error}) before the answer came")

    async def _resubscribe(self) -> PubSub:
        delay = RECONNECT_INITIAL_SECONDS
        while True:
            await asyncio.sleep(delay)
            try:
                pubsub = await self._subscribe()
            except Exception as exc:  # whatever it is, the listener must keep trying
                self._error = describe(exc)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
                continue
            down = time.monotonic() - self._down_since
            self._state = "connected"
            logger.warning("the bus is back at %s after %.1fs", redacted(self._url), down)
            return pubsub

    def _fail_pending(self, reason: str) -> None:
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(BusUnavailableError(reason))
        self._pending.clear()

    def _receive(self, channel: bytes, data: bytes) -> None:
        """Dispatch one message from ``channel``; anything that is not one is logged."""
        try:
            message = decode(data)
        except ValueError as exc:
            logger.warning(
                "dropped what is not a bus message on %s (%s): %r",
                channel.decode(errors="replace"),
                exc,
                data[:_QUOTED],
            )
            return
        if message.sender == self._node_id and channel.decode() == self._broadcast_channel:
            return  # our own broadcast
        if not self._seen.add(message.id):
            logger.debug("dropped message %s from %s: a duplicate", message.id, message.sender)
            return
        if message.type == "event":
            self._events.put_nowait(message)
        elif message.type == "request":
            task = asyncio.get_running_loop().create_task(self._answer(message))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        else:
            self._resolve(message)

    def _resolve(self, reply: Message) -> None:
        answer = self._pending.get(reply.reply_to or "")
        if answer is None or answer.done():
            logger.debug("dropped an answer nobody waits for from %s", reply.sender)
        elif reply.error is not None:
            answer.set_exception(
                RemoteError(reply.sender, reply.kind, reply.error["type"], reply.error["message"])
            )
        else:
            answer.set_result(reply.payload)

    async def _deliver(self) -> None:
        """The events task: hand each event to its handler, in order of arrival."""
        while True:
            message = await self._events.get()
            handler = self._handlers.get(message.kind)
            if handler is None:
                logger.debug("no handler for '%s' from %s; dropped", message.kind, message.sender)
                continue
            try:
                await handler(message)
            except Exception:
                logger.exception(
                    "the handler for '%s' from %s failed", message.kind, message.sender
                )

    async def _answer(self, request: Message) -> None:
        """Run the handler for ``request``, for at most its timeout, and publish the answer."""
        handler = self._handlers.get(request.kind)
        if handler is None:
            logger.warning("no handler for '%s' asked by %s", request.kind, request.sender)
            await self._reply(request, error=LookupError(f"no handler for '{request.kind}'"))
            return
        deadline = asyncio.timeout(request.timeout)
        try:
            async with deadline:
                answer = await handler(request)
        except Exception as exc:
            if deadline.expired():  # the requester has given up: nobody to answer
                logger.warning(
                    "the handler for '%s' asked by %s did not answer within %gs: cancelled",
                    request.kind,
                    request.sender,
                    request.timeout,
                )
                return
            if not isinstance(exc, RegistryError):  # a refusal is an answer, anything else a bug
                logger.warning(
                    "the handler for '%s' asked by %s failed",
                    request.kind,
                    request.sender,
                    exc_info=True,
                )
            await self._reply(request, error=exc)
            return
        await self._reply(request, answer)

    async def _reply(
        self, request: Message, payload: Any = None, *, error: Exception | None = None
    ) -> None:
        described = None if error is None else {"type": type(error).__name__, "message": str(error)}
        reply = Message(
            new_id(), self._node_id, "reply", request.kind, payload, None, request.id, described
        )
        try:
            data = encode(reply)
        except InvalidArgumentError as exc:
            logger.warning("the answer to '%s' asked by %s: %s", request.kind, request.sender, exc)
            await self._reply(request, error=exc)
            return
        try:
            await self._publish(self._node_channel(request.sender), data)
        except BusUnavailableError as exc:
            logger.warning("could not answer '%s' to %s: %s", request.kind, request.sender, exc)
