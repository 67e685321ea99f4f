"""Fixtures of the bus suites: the shared Redis, Redis servers of a test's own, and buses.

The shared Redis is reached at ``REGISTRY_TEST_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``); each test's buses use a channel prefix of its own, so parallel
runs never cross. A test that starts its own ``redis-server`` (to kill, freeze and restart it)
needs it on ``PATH``. Without either, those tests skip with the reason, unless
``REGISTRY_TEST_REQUIRE_REDIS=1`` (set by ``.ci/run``), which makes that a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import pytest
from redis.asyncio import Redis

from registry.cluster import Bus, Message, bus_from_url
from registry.errors import describe
from tests.server_process import HOST, ServerProcess, free_port
from tests.support import until

REDIS_URL = os.environ.get("REGISTRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("REGISTRY_TEST_REQUIRE_REDIS") == "1"


def unavailable(reason: str) -> NoReturn:
    if REQUIRE_REDIS:
        pytest.fail(reason)
    pytest.skip(reason)


async def ping(url: str) -> None:
    client = Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0)
    try:
        await client.ping()
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The shared Redis, checked once per run."""
    try:
        asyncio.run(ping(REDIS_URL))
    except Exception as exc:
        unavailable(f"Redis not reachable at {REDIS_URL}: {describe(exc)}")
    return REDIS_URL


@pytest.fixture
def prefix() -> str:
    """Channel names of this test's own."""
    return f"registry-test:{uuid.uuid4().hex}:"


class Connect(Protocol):
    def __call__(self, url: str, node_id: str, **options: Any) -> Awaitable[Bus]: ...


@pytest.fixture
async def connect(prefix: str) -> AsyncIterator[Connect]:
    """``await connect(url, node_id, **options)``: a connected bus on this test's channels,
    closed at the end of the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(url: str, node_id: str, **options: Any) -> Bus:
            bus = bus_from_url(url, node_id=node_id, channel_prefix=prefix, **options)
            return await stack.enter_async_context(bus)

        yield start


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    """A plain redis-py client of the shared Redis, to put anything on a channel."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


#: Seconds within which a failure that must be fast is (a busy machine included): far below
#: any TCP or request timeout.
FAST = 1.0


async def settled(sender: Bus, receiver: str, inbox: Inbox) -> None:
    """Return once everything ``sender`` sent ``receiver`` before has been handled: events from
    one sender are handled in order, so a marker sent last is handled last."""
    count = len(inbox.messages)
    await sender.send(receiver, "note", "marker")
    await until(lambda: len(inbox.messages) > count)
    assert inbox.payloads[-1] == "marker"
    inbox.messages.pop()


class Inbox:
    """A handler that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def payloads(self) -> list[Any]:
        return [message.payload for message in self.messages]


class RedisServer:
    """A ``redis-server`` of a test's own on a free loopback port (and a Unix socket), without
    persistence: killed, it comes back empty, as a restarted Redis does."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.process: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket}?db=0"

    async def start(self) -> None:
        """Start it (again, on the same port) and return once it accepts connections."""
        command = ["redis-server", "--port", str(self.port), "--bind", HOST]
        command += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        command += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        command += ["--dir", str(self.directory)]
        self.process = ServerProcess(
            command,
            self.port,
            self.directory / "redis.log",
            name="redis-server",
            cwd=self.directory,
        )
        await self.process.ready()

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def kill(self) -> None:
        assert self.process is not None
        self.process.halt(signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None:
            self.signal(signal.SIGCONT)  # a frozen server would not heed SIGTERM
            self.process.halt()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A started :class:`RedisServer`, stopped at the end of the test."""
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not on PATH")
    server = RedisServer(tmp_path)
    try:
        await server.start()
        yield server
    finally:
        server.stop()
