"""Fixtures for the server tests: a real uvicorn server on a free loopback port, running in the
test's own event loop, and real WebSocket (``websockets``) and HTTP (``httpx``) clients.

``server`` runs on ``db_url``: a fresh SQLite file by default. Modules whose behaviour depends on
the store override ``db_url`` with the parametrised ``database_url`` (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from registry import History, Registry
from registry.server import create_app
from registry.server.sessions import SessionManager
from registry.settings import Settings
from registry.store.dialect import create_engine

API_KEY = "k"
HOST = "127.0.0.1"
#: How long a test waits for a frame (or a condition) that must come.
WAIT = 10.0
#: How long a test waits to be confident a frame that must not come does not.
QUIET = 0.2

#: Every field of a server frame, in wire order (PROTOCOL.md).
SERVER_FIELDS = [
    "type",
    "status",
    "user_request",
    "agent_name",
    "process_name",
    "root_name",
    "actions",
    "messages",
    "error",
    "session_id",
    "task_name",
    "timestamp",
    "response_id",
    "result",
]

T = TypeVar("T")


@dataclass
class Server:
    """A running server: its app (and so its registry) and where to reach it."""

    app: FastAPI
    settings: Settings
    port: int
    database_url: str

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def ws_url(self, token: str | None = API_KEY) -> str:
        base = f"ws://{HOST}:{self.port}/ws"
        return base if token is None else f"{base}?token={token}"

    @property
    def registry(self) -> Registry:
        registry: Registry = self.app.state.registry
        return registry

    @property
    def sessions(self) -> SessionManager:
        sessions: SessionManager = self.app.state.sessions
        return sessions

    def http(self, *, api_key: str | None = API_KEY) -> httpx.AsyncClient:
        headers = {} if api_key is None else {"X-API-Key": api_key}
        return httpx.AsyncClient(base_url=self.http_url, headers=headers, timeout=WAIT)


@asynccontextmanager
async def running_server(database_url: str, **overrides: Any) -> AsyncIterator[Server]:
    """Serve ``create_app(Settings(...))`` with uvicorn on a free port until the block ends."""
    options: dict[str, Any] = {
        "database_url": database_url,
        "api_key": API_KEY,
        "host": HOST,
        "port": 0,
        "heartbeat_interval": 0.5,
    }
    settings = Settings(**(options | overrides))
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=HOST,
        port=0,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        lifespan="on",
        log_level="warning",
        log_config=None,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(), name="uvicorn")
    deadline = time.monotonic() + WAIT
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("uvicorn stopped before it started")
        if time.monotonic() > deadline:
            server.should_exit = True
            await task
            raise TimeoutError("uvicorn did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield Server(app, settings, port, database_url)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'server.db'}"


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """The database the ``server`` fixture uses (overridden per module for both backends)."""
    return sqlite_url


@pytest.fixture
def server_settings() -> dict[str, Any]:
    """Settings overrides for the ``server`` fixture (override per module or test)."""
    return {}


@pytest.fixture
async def server(db_url: str, server_settings: dict[str, Any]) -> AsyncIterator[Server]:
    async with running_server(db_url, **server_settings) as running:
        yield running


# -- WebSocket clients -------------------------------------------------------------------------


@dataclass
class Client:
    """A real WebSocket client that keeps every frame it received."""

    ws: ClientConnection
    client_id: str | None = None
    frames: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str | bytes] = field(default_factory=list)

    async def send(self, **fields: Any) -> None:
        await self.ws.send(json.dumps(fields))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self, wait: float = WAIT) -> dict[str, Any]:
        data = await asyncio.wait_for(self.ws.recv(), wait)
        self.raw.append(data)
        frame: dict[str, Any] = json.loads(data)
        self.frames.append(frame)
        return frame

    async def recv_type(self, kind: str, wait: float = WAIT) -> dict[str, Any]:
        """The next frame of type ``kind``; other frames in between are kept but skipped."""
        deadline = time.monotonic() + wait
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame["type"] == kind:
                return frame

    async def nothing(self, within: float = QUIET) -> None:
        """Assert that no frame arrives within ``within`` seconds."""
        try:
            data = await asyncio.wait_for(self.ws.recv(), within)
        except TimeoutError:
            return
        self.raw.append(data)
        raise AssertionError(f"unexpected frame: {data!r}")

    async def closed(self, wait: float = WAIT) -> tuple[int | None, str | None]:
        """Read until the server closes the connection; the close code and reason it sent."""
        try:
            async with asyncio.timeout(wait):
                while True:
                    data = await self.ws.recv()
                    self.raw.append(data)
                    if isinstance(data, str):
                        self.frames.append(json.loads(data))
        except ConnectionClosed as exc:
            received = exc.rcvd
            return (received.code, received.reason) if received else (None, None)

    async def heartbeat(self, **fields: Any) -> dict[str, Any]:
        await self.send(type="heartbeat", status="ok", **fields)
        return await self.recv()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)


class Clients:
    """Opens clients against one server and closes every one of them at teardown."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._open: list[ClientConnection] = []

    async def open(self, *, token: str | None = API_KEY, **options: Any) -> Client:
        options.setdefault("open_timeout", WAIT)
        options.setdefault("max_size", None)
        ws = await connect(self.server.ws_url(token), **options)
        self._open.append(ws)
        return Client(ws)

    async def register(
        self,
        client_id: str,
        client_type: str = "device",
        *,
        metadata: dict[str, Any] | None = None,
        target_id: str | None = None,
    ) -> Client:
        """Open, register and check the acknowledgement."""
        client = await self.open()
        frame: dict[str, Any] = {
            "type": "register",
            "status": "ok",
            "client_type": client_type,
            "client_id": client_id,
            "metadata": metadata if metadata is not None else {"platform": "linux"},
        }
        if target_id is not None:
            frame["target_id"] = target_id
        await client.send(**frame)
        ack = await client.recv()
        assert ack["type"] == "heartbeat", ack
        assert ack["status"] == "ok", ack
        client.client_id = client_id
        return client

    async def device(self, client_id: str, system_info: dict[str, Any] | None = None) -> Client:
        metadata: dict[str, Any] = {"platform": "linux"}
        if system_info is not None:
            metadata["system_info"] = system_info
        return await self.register(client_id, "device", metadata=metadata)

    async def constellation(self, client_id: str, target_id: str | None = None) -> Client:
        return await self.register(client_id, "constellation", target_id=target_id)

    async def aclose(self) -> None:
        for ws in self._open:
            await ws.close()
        self._open.clear()


@pytest.fixture
async def clients(server: Server) -> AsyncIterator[Clients]:
    opened = Clients(server)
    try:
        yield opened
    finally:
        await opened.aclose()


# -- waiting and reading the store -------------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool] = bool,
    *,
    wait: float = WAIT,
) -> T:
    """Poll ``probe`` until ``accept`` holds for its answer; the last answer on time-out fails."""
    deadline = time.monotonic() + wait
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {wait}s; last value: {value!r}")
        await asyncio.sleep(0.05)


async def until(condition: Callable[[], bool], *, wait: float = WAIT) -> None:
    """Wait until ``condition()`` holds (checked every few milliseconds)."""
    deadline = time.monotonic() + wait
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {wait}s")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def store(database_url: str) -> AsyncIterator[History]:
    """Read-only history queries on ``database_url`` through an engine of the test's own."""
    engine = create_engine(database_url)
    try:
        yield History(engine)
    finally:
        await engine.dispose()


async def sql(database_url: str, statement: str, **params: Any) -> list[Any]:
    """Rows of one SQL statement, on an engine of the test's own."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            return list((await connection.execute(text(statement), params)).all())
    finally:
        await engine.dispose()


def assert_server_frame(frame: dict[str, Any]) -> None:
    """Every ServerMessage field is present, in order, and nothing else."""
    assert list(frame) == SERVER_FIELDS, list(frame)


def assert_error(frame: dict[str, Any], text: str) -> None:
    assert_server_frame(frame)
    assert frame["type"] == "error", frame
    assert frame["status"] == "error", frame
    assert frame["error"] == text, frame
