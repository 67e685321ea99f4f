"""Fixtures of the operator suite: the database is filled by a real server run.

``running_server`` serves ``create_app(Settings(...))`` with uvicorn on a free loopback port, as a
task of the test's own event loop. ``fleet`` runs a scenario against it with real WebSocket
clients (``websockets``): devices and a constellation register, heartbeat, run sessions through
the default relay runner, one session fails because its device disconnects mid-session, one is
left running. ``Fleet.marks`` holds instants between known events, for "who was online at".

Everything runs on the parametrised ``database_url`` (SQLite file and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text
from websockets.asyncio.client import ClientConnection, connect

from registry import Registry
from registry.server import create_app
from registry.settings import Settings
from registry.store.dialect import create_engine

API_KEY = "k"
HOST = "127.0.0.1"
#: How long a test waits for something that must happen.
WAIT = 10.0

T = TypeVar("T")

WIN_INFO = {"os": "Windows 11", "cpu_count": 8, "memory_gb": 32}
LIN_INFO = {"os": "Ubuntu 24.04", "cpu_count": 4}
GONE_INFO_1 = {"os": "Debian 12", "version": 1}
GONE_INFO_2 = {"os": "Debian 12", "version": 2}
DEVICE_DISCONNECTED = "Task was cancelled because target device disconnected"


def free_socket() -> socket.socket:
    """A socket bound to a free loopback port (uvicorn listens on it: no port race).

    ``IPPROTO_TCP`` explicitly: asyncio sets TCP_NODELAY only on sockets that say so, and
    without it every response waits ~40 ms for a delayed ACK."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    return sock


@dataclass
class Server:
    """A running server: its app (and so its registry) and where to reach it."""

    app: FastAPI
    port: int
    database_url: str
    uvicorn_server: uvicorn.Server
    task: asyncio.Task[None]

    @property
    def registry(self) -> Registry:
        registry: Registry = self.app.state.registry
        return registry

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def ws_url(self, token: str = API_KEY) -> str:
        return f"ws://{HOST}:{self.port}/ws?token={token}"

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
async def running_server(database_url: str, **overrides: Any) -> AsyncIterator[Server]:
    """Serve the app on a free port until the block ends (or ``Server.stop``)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    options: dict[str, Any] = {
        "database_url": database_url,
        "api_key": API_KEY,
        "host": HOST,
        "port": port,
        "node_name": f"operator-test:{port}",
        "heartbeat_interval": 0.5,
        "command_timeout": 60.0,
    }
    app = create_app(Settings(**(options | overrides)))
    config = uvicorn.Config(
        app, host=HOST, port=port, lifespan="on", log_level="warning", log_config=None
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
        yield Server(app, port, database_url, server, task)
    finally:
        server.should_exit = True
        await task
        sock.close()


# -- WebSocket clients --------------------------------------------------------------------------


@dataclass
class WsClient:
    """A real AIP client on one WebSocket connection."""

    ws: ClientConnection
    client_id: str
    client_type: str
    frames: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, **fields: Any) -> None:
        await self.ws.send(json.dumps(fields))

    async def recv(self, wait: float = WAIT) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), wait))
        self.frames.append(frame)
        return frame

    async def recv_type(self, kind: str, wait: float = WAIT) -> dict[str, Any]:
        """The next frame of type ``kind`` (frames in between are kept, skipped)."""
        deadline = time.monotonic() + wait
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame["type"] == kind:
                return frame

    async def heartbeat(self) -> None:
        # The constellation client heartbeats with the default client_type "device".
        await self.send(type="heartbeat", status="ok", client_id=self.client_id)
        frame = await self.recv()
        assert (frame["type"], frame["status"]) == ("heartbeat", "ok"), frame
        assert frame["response_id"], frame

    async def task(self, session_id: str, task_name: str, target_id: str | None = None) -> None:
        """Ask for a task and check the acknowledgement."""
        await self.send(
            type="task",
            status="continue",
            client_type=self.client_type,
            client_id=self.client_id,
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
        await self.send(
            type="command_results",
            status="continue",
            client_type=self.client_type,
            client_id=self.client_id,
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
    """Opens clients against one server; closes every one at the end."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.opened: list[WsClient] = []

    async def register(
        self,
        client_id: str,
        client_type: str = "device",
        *,
        platform: str = "linux",
        system_info: dict[str, Any] | None = None,
        target_id: str | None = None,
    ) -> WsClient:
        ws = await connect(self.server.ws_url(), open_timeout=WAIT)
        client = WsClient(ws, client_id, client_type)
        self.opened.append(client)
        metadata: dict[str, Any] = {"platform": platform}
        if system_info is not None:
            metadata["system_info"] = system_info
        await client.send(
            type="register",
            status="ok",
            client_type=client_type,
            client_id=client_id,
            target_id=target_id,
            metadata=metadata,
        )
        ack = await client.recv()
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok"), ack
        return client

    async def aclose(self) -> None:
        for client in self.opened:
            await client.ws.close()
        self.opened.clear()


# -- waiting ------------------------------------------------------------------------------------


async def eventually(
    probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool], *, wait: float = WAIT
) -> T:
    """Poll ``probe`` until ``accept`` holds for its answer."""
    deadline = time.monotonic() + wait
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {wait}s; last value: {value!r}")
        await asyncio.sleep(0.02)


def now() -> datetime:
    return datetime.now(UTC)


async def mark() -> datetime:
    """An instant strictly between what happened before and what happens after."""
    await asyncio.sleep(0.002)
    instant = now()
    await asyncio.sleep(0.002)
    return instant


# -- the scenario -------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The scenario's server, its clients and instants between its events.

    While the server runs: ``dev-win`` (Windows), ``dev-lin`` and ``const-1`` (linux) are online;
    ``dev-gone`` made two connections, both closed ("bye", then "leaving" mid-session).
    Sessions: ``task-a@1`` const-1 -> dev-win completed, ``task-b@1`` dev-lin's own completed,
    ``task-c@1`` const-1 -> dev-gone failed, ``task-d@1`` const-1 -> dev-lin still active
    (``interrupted`` once the server has stopped).
    """

    server: Server
    clients: Clients
    live: dict[str, WsClient]
    marks: dict[str, datetime]
    database_url: str
    stopped: bool = False

    @property
    def registry(self) -> Registry:
        return self.server.registry

    def http(self, *, api_key: str | None = API_KEY) -> httpx.AsyncClient:
        return self.server.http(api_key=api_key)

    async def stop(self) -> None:
        """Stop the server (clients are closed by it) and close the client side."""
        if not self.stopped:
            self.stopped = True
            await self.server.stop()
            await self.clients.aclose()


async def _offline_in_store(server: Server, client_id: str) -> None:
    async with server.http() as http:

        async def probe() -> dict[str, Any]:
            body: dict[str, Any] = (await http.get(f"/api/clients/{client_id}")).json()
            return body

        await eventually(probe, lambda body: body.get("online") is False)


async def play_scenario(
    server: Server, clients: Clients
) -> tuple[dict[str, WsClient], dict[str, datetime]]:
    marks: dict[str, datetime] = {"start": await mark()}
    win = await clients.register("dev-win", platform="Windows", system_info=WIN_INFO)
    lin = await clients.register("dev-lin", platform="linux", system_info=LIN_INFO)
    marks["two_devices"] = await mark()

    gone = await clients.register("dev-gone", platform="linux", system_info=GONE_INFO_1)
    await gone.heartbeat()
    marks["gone_online"] = await mark()
    await gone.close(1000, "bye")
    await _offline_in_store(server, "dev-gone")
    marks["gone_offline"] = await mark()

    const = await clients.register("const-1", "constellation", platform="linux")
    marks["const_online"] = await mark()
    gone = await clients.register("dev-gone", platform="linux", system_info=GONE_INFO_2)
    marks["all_online"] = await mark()
    for client in (win, lin, const, gone):
        await client.heartbeat()

    # A constellation's task, relayed to dev-win and answered.
    await const.task("task-a@1", "task-a", target_id="dev-win")
    await win.answer_command("task-a@1")
    end = await const.recv_type("task_end")
    assert (end["session_id"], end["status"]) == ("task-a@1", "completed"), end
    assert (await win.recv_type("task_end"))["session_id"] == "task-a@1"
    marks["after_a"] = await mark()

    # A device's own task.
    await lin.task("task-b@1", "task-b")
    await lin.answer_command("task-b@1")
    end = await lin.recv_type("task_end")
    assert (end["session_id"], end["status"]) == ("task-b@1", "completed"), end
    marks["after_b"] = await mark()

    # dev-gone disconnects while it executes a session: the session fails.
    await const.task("task-c@1", "task-c", target_id="dev-gone")
    await gone.recv_type("command")
    await gone.close(1001, "leaving")
    end = await const.recv_type("task_end")
    assert (end["session_id"], end["status"]) == ("task-c@1", "failed"), end
    assert end["error"] == DEVICE_DISCONNECTED, end
    await _offline_in_store(server, "dev-gone")
    marks["gone_failed"] = await mark()

    # A session left running: dev-lin gets the command and never answers.
    await const.task("task-d@1", "task-d", target_id="dev-lin")
    await lin.recv_type("command")
    await server.registry.flush()
    marks["end"] = await mark()
    return {"dev-win": win, "dev-lin": lin, "const-1": const}, marks


@pytest.fixture
async def server(database_url: str) -> AsyncIterator[Server]:
    """A running server on ``database_url`` without any client."""
    async with running_server(database_url) as running:
        yield running


@pytest.fixture
async def fleet(database_url: str) -> AsyncIterator[Fleet]:
    """The scenario played against a running server (stopped at the end at the latest)."""
    async with running_server(database_url) as running:
        clients = Clients(running)
        try:
            live, marks = await play_scenario(running, clients)
            fleet = Fleet(running, clients, live, marks, database_url)
            yield fleet
        finally:
            if running.running:
                await running.stop()
            await clients.aclose()


# -- reading the database and running the CLI --------------------------------------------------


async def sql(database_url: str, statement: str, **params: Any) -> list[Any]:
    """Rows of one SQL statement (committed), on an engine of the test's own."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            result = await connection.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def cli(*args: str) -> Outcome:
    """Run ``python -m registry ARGS`` in a subprocess (the event loop keeps serving)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "registry",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Outcome(process.returncode, stdout.decode(), stderr.decode())


def is_sqlite(database_url: str) -> bool:
    return database_url.startswith("sqlite")
