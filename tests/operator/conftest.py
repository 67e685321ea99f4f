"""Fixtures of the operator suite: the database is filled by a real server run.

``running_server`` serves ``create_app(Settings(...))`` with uvicorn on a free loopback port, as a
task of the test's own event loop (``tests.support``, with this suite's settings). ``fleet`` runs
a scenario against it with real WebSocket clients (``websockets``): devices and a constellation
register, heartbeat, run sessions through the default relay runner, one session fails because its
device disconnects mid-session, one is left running. ``Fleet.marks`` holds instants between known
events, for "who was online at".

Everything runs on the parametrised ``database_url`` (SQLite file and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from registry import Registry
from tests import support
from tests.support import API_KEY, Client, Clients, Server, eventually, free_socket

WIN_INFO = {"os": "Windows 11", "cpu_count": 8, "memory_gb": 32}
LIN_INFO = {"os": "Ubuntu 24.04", "cpu_count": 4}
GONE_INFO_1 = {"os": "Debian 12", "version": 1}
GONE_INFO_2 = {"os": "Debian 12", "version": 2}
DEVICE_DISCONNECTED = "Task was cancelled because target device disconnected"


@asynccontextmanager
async def running_server(database_url: str, **overrides: Any) -> AsyncIterator[Server]:
    """``tests.support.running_server`` with the operator suite's settings: the served port in
    ``Settings.port``, a node name of that port's own and a long command timeout."""
    sock = free_socket()
    port = sock.getsockname()[1]
    options: dict[str, Any] = {
        "port": port,
        "node_name": f"operator-test:{port}",
        "command_timeout": 60.0,
    }
    async with support.running_server(database_url, sock=sock, **(options | overrides)) as server:
        yield server


# -- instants -----------------------------------------------------------------------------------


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
    live: dict[str, Client]
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
) -> tuple[dict[str, Client], dict[str, datetime]]:
    marks: dict[str, datetime] = {"start": await mark()}
    win = await clients.register("dev-win", platform="Windows", system_info=WIN_INFO)
    lin = await clients.register("dev-lin", platform="linux", system_info=LIN_INFO)
    marks["two_devices"] = await mark()

    gone = await clients.register("dev-gone", platform="linux", system_info=GONE_INFO_1)
    await gone.heartbeat_ok()
    marks["gone_online"] = await mark()
    await gone.close(1000, "bye")
    await _offline_in_store(server, "dev-gone")
    marks["gone_offline"] = await mark()

    const = await clients.register("const-1", "constellation", platform="linux")
    marks["const_online"] = await mark()
    gone = await clients.register("dev-gone", platform="linux", system_info=GONE_INFO_2)
    marks["all_online"] = await mark()
    for client in (win, lin, const, gone):
        await client.heartbeat_ok()

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


# -- running the CLI ----------------------------------------------------------------------------


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
