"""What the server, operator and reliability suites share: a real uvicorn server on a free
loopback port, running in the test's own event loop, and real WebSocket (``websockets``) and HTTP
(``httpx``) clients against it, with helpers to wait for things and to read the store.

The fixtures at the end (``server_settings``, ``server``, ``clients``) are made available to a
package by importing them into its ``conftest.py``; ``server`` runs on the ``db_url`` fixture,
which that package's conftest defines.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
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

from registry import ConnectionRecord, History, Registry
from registry.server import create_app, listen
from registry.server.sessions import SessionManager
from registry.settings import Settings
from registry.store.dialect import create_engine
from tests.server_process import HOST as HOST  # the suites import these from here
from tests.server_process import ServerProcess, serve_command
from tests.server_process import free_port as free_port

API_KEY = "k"
#: How long a test waits for a frame (or a condition) that must come.
WAIT = 10.0
#: How long a test waits to be confident a frame that must not come does not.
QUIET = 0.2

#: Every field of a server frame, in wire order (docs/protocol.md).
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


# -- the server ---------------------------------------------------------------------------------


def free_socket(send_timeout: float | None = None) -> socket.socket:
    """A socket bound to a free loopback port, made as ``registry serve`` makes its own
    (:func:`registry.server.listen.bind`; ``send_timeout`` defaults to the setting's default);
    uvicorn listens on it, so there is no port race."""
    if send_timeout is None:
        send_timeout = Settings.model_fields["send_timeout"].default
    return listen.bind(HOST, 0, send_timeout)


@dataclass
class Server:
    """A running server: its app (and so its registry) and where to reach it."""

    app: FastAPI
    settings: Settings
    port: int
    database_url: str
    uvicorn_server: uvicorn.Server
    task: asyncio.Task[None]

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

    @property
    def running(self) -> bool:
        return not self.task.done()

    async def stop(self) -> None:
        """Shut the server down (its lifespan closes the registry) and wait for it."""
        self.uvicorn_server.should_exit = True
        await self.task


@asynccontextmanager
async def running_server(
    database_url: str, *, sock: socket.socket | None = None, **overrides: Any
) -> AsyncIterator[Server]:
    """Serve ``create_app(Settings(...))`` with uvicorn until the block ends (or ``Server.stop``).

    uvicorn listens on ``sock`` (closed at the end), by default a :func:`free_socket`, and gets
    the options ``registry serve`` passes it (:mod:`registry.server.listen`). ``overrides``
    are settings; by default ``Settings.port`` is 0 whatever port is served."""
    options: dict[str, Any] = {
        "database_url": database_url,
        "api_key": API_KEY,
        "host": HOST,
        "port": 0,
        "heartbeat_interval": 0.5,
    }
    settings = Settings(**(options | overrides))
    if sock is None:
        sock = free_socket(settings.send_timeout)
    port = sock.getsockname()[1]
    app = create_app(settings)
    config = listen.uvicorn_config(
        app, settings, port=port, lifespan="on", log_level="warning", log_config=None
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="uvicorn")
    try:
        deadline = time.monotonic() + WAIT
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it started")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            await asyncio.sleep(0.01)
        yield Server(app, settings, port, database_url, server, task)
    finally:
        server.should_exit = True
        await task
        sock.close()


# -- WebSocket clients --------------------------------------------------------------------------


@dataclass
class Client:
    """A real AIP client on one WebSocket connection that keeps every frame it received."""

    ws: ClientConnection
    client_id: str | None = None
    client_type: str | None = None
    frames: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str | bytes] = field(default_factory=list)

    async def send(self, **fields: Any) -> None:
        await self.ws.send(json.dumps(fields))

    async def send_as(self, kind: str, status: str = "continue", **fields: Any) -> None:
        """Send a ``kind`` frame that names this client (``client_type``, ``client_id``)."""
        await self.send(
            type=kind,
            status=status,
            client_type=self.client_type,
            client_id=self.client_id,
            **fields,
        )

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
        """Send a heartbeat with exactly ``fields`` added; the next frame, unchecked."""
        await self.send(type="heartbeat", status="ok", **fields)
        return await self.recv()

    async def heartbeat_ok(self) -> None:
        """Heartbeat with this client's id and check the ``ok`` answer and its response id."""
        # The constellation client heartbeats with the default client_type "device".
        frame = await self.heartbeat(client_id=self.client_id)
        assert (frame["type"], frame["status"]) == ("heartbeat", "ok"), frame
        assert frame["response_id"], frame

    async def task(self, session_id: str, task_name: str, target_id: str | None = None) -> None:
        """Ask for a task and check the acknowledgement."""
        await self.send_as(
            "task",
            target_id=target_id,
            session_id=session_id,
            task_name=task_name,
            request=f"please run {task_name}",
        )
        ack = await self.recv_type("heartbeat")
        assert (ack["status"], ack["session_id"]) == ("ok", session_id), ack

    async def answer_command(self, session_id: str) -> dict[str, Any]:
        """Wait for a ``command`` of ``session_id`` and answer it with success results."""
        command = await self.recv_type("command")
        assert command["session_id"] == session_id, command
        await self.send_as(
            "command_results",
            session_id=session_id,
            prev_response_id=command["response_id"],
            action_results=[
                {"status": "success", "result": {"done": True}, "call_id": action["call_id"]}
                for action in command["actions"]
            ],
        )
        return command

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)


class Clients:
    """Opens clients against one server and closes every one of them at teardown (``aclose``)."""

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
        platform: str = "linux",
        system_info: dict[str, Any] | None = None,
        target_id: str | None = None,
    ) -> Client:
        """Open, register and check the acknowledgement. ``metadata`` defaults to ``platform``
        and, when given, ``system_info``."""
        client = await self.open()
        client.client_id, client.client_type = client_id, client_type
        if metadata is None:
            metadata = {"platform": platform}
            if system_info is not None:
                metadata["system_info"] = system_info
        frame: dict[str, Any] = {
            "type": "register",
            "status": "ok",
            "client_type": client_type,
            "client_id": client_id,
            "metadata": metadata,
        }
        if target_id is not None:
            frame["target_id"] = target_id
        await client.send(**frame)
        ack = await client.recv()
        assert ack["type"] == "heartbeat", ack
        assert ack["status"] == "ok", ack
        return client

    async def device(self, client_id: str, system_info: dict[str, Any] | None = None) -> Client:
        return await self.register(client_id, "device", system_info=system_info)

    async def constellation(self, client_id: str, target_id: str | None = None) -> Client:
        return await self.register(client_id, "constellation", target_id=target_id)

    async def aclose(self) -> None:
        for ws in self._open:
            await ws.close()
        self._open.clear()


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
        await asyncio.sleep(0.02)


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


async def closed_record(server: Server, client_id: str) -> ConnectionRecord:
    """The client's only connection row, once it is closed (the server's journal flushed)."""

    async def rows() -> list[ConnectionRecord]:
        await server.registry.flush()
        async with store(server.database_url) as history:
            return (await history.connections(client_id)).items

    items = await eventually(rows, lambda items: len(items) == 1 and bool(items[0].disconnected_at))
    return items[0]


async def sql(database_url: str, statement: str, **params: Any) -> list[Any]:
    """Rows of one SQL statement (committed), on an engine of the test's own."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            result = await connection.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []
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


# -- fixtures (imported by the conftests that use them) -----------------------------------------


@pytest.fixture
def server_settings() -> dict[str, Any]:
    """Settings overrides for the ``server`` fixture (override per module or test)."""
    return {}


@pytest.fixture
async def server(db_url: str, server_settings: dict[str, Any]) -> AsyncIterator[Server]:
    """A running server on the package's ``db_url`` with ``server_settings``."""
    async with running_server(db_url, **server_settings) as running:
        yield running


@pytest.fixture
async def clients(server: Server) -> AsyncIterator[Clients]:
    """Clients against ``server``, every one closed after the test."""
    async with aclosing(Clients(server)) as opened:
        yield opened


# -- `registry serve` as a subprocess ------------------------------------------------------


class Serve(ServerProcess):
    """One ``python -m registry serve`` process on HOST:``port`` (see
    :mod:`tests.server_process`), its output appended to ``log``. ``api_key`` is the key it is
    started with (None: ``--no-auth``); ``auth`` replaces those authentication options (then
    set ``api_key`` to the key the server will use); ``options`` are added to the command
    line. Always reap it with :meth:`~tests.server_process.ServerProcess.stop`."""

    def __init__(
        self,
        database_url: str,
        port: int,
        log: Path,
        *,
        api_key: str | None = API_KEY,
        log_level: str = "warning",
        auth: Sequence[str] | None = None,
        options: Sequence[str] = (),
    ) -> None:
        self.api_key = api_key
        command = serve_command(
            database_url, port, api_key=api_key, log_level=log_level, auth=auth, options=options
        )
        super().__init__(command, port, log)

    def output(self) -> str:
        """What the process printed so far (and whatever else ``log`` held before)."""
        return self.log_path.read_text(errors="replace")

    async def printed(self, text: str) -> str:
        """Wait until the output holds ``text`` (30 s at most, failing if the process exits
        first); the output."""
        deadline = time.monotonic() + 30
        while text not in (output := self.output()):
            if self.process.poll() is not None:
                raise AssertionError(f"registry serve exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError(f"registry serve did not print {text!r}: {output}")
            await asyncio.sleep(0.05)
        return output
