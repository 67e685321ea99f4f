"""A client id claimed while a connection holds it: the holder is pinged at once, and one that
does not answer within ``twin_ping_timeout`` is replaced (4411 ``replaced``, recorded and
audited); one that answers keeps its id and the newcomer gets 4409. With
``on_duplicate=replace`` the holder is replaced without a ping, and closed the same way.

The frozen holder is a real client in a process of its own (``twin_client.py``), stopped with
SIGSTOP as a hung machine or a network dropped without FIN would leave it. Runs on SQLite and
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from registry.audit import AuditKind
from registry.server import closecodes
from registry.server.sessions import DEVICE_DISCONNECTED
from registry.settings import Settings
from tests.support import (
    QUIET,
    WAIT,
    Client,
    Clients,
    Server,
    assert_error,
    eventually,
    running_server,
    store,
)

TWIN_CLIENT = Path(__file__).with_name("twin_client.py")
PING_TIMEOUT: float = Settings.model_fields["twin_ping_timeout"].default


@pytest.fixture
def db_url(database_url: str) -> str:
    return database_url


class Twin:
    """A device client in a process of its own (see ``twin_client.py``)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        data = await asyncio.wait_for(self.process.stdout.readline(), WAIT)
        assert data, "the twin client exited"
        document: dict[str, Any] = json.loads(data)
        return document

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    async def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):  # it may have exited on its own
            self.thaw()
            self.process.kill()
        await self.process.wait()


class Twins:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.started: list[Twin] = []

    async def register(self, client_id: str) -> Twin:
        """A twin client process registered as ``client_id``."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(TWIN_CLIENT),
            self.server.ws_url(),
            client_id,
            stdout=asyncio.subprocess.PIPE,
        )
        twin = Twin(process)
        self.started.append(twin)
        assert await twin.line() == {"registered": True}
        return twin


@pytest.fixture
async def twins(server: Server) -> AsyncIterator[Twins]:
    started = Twins(server)
    try:
        yield started
    finally:
        for twin in started.started:
            await twin.end()


async def claim(clients: Clients, client_id: str) -> int | None:
    """Register ``client_id`` on a new connection: None if accepted, else the close code."""
    client = await clients.open()
    await client.send(type="register", status="ok", client_id=client_id)
    frame = await client.recv()
    if (frame["type"], frame["status"]) == ("heartbeat", "ok"):
        return None
    code, _ = await client.closed()
    return code


async def audited(server: Server, kind: str, client_id: str) -> list[dict[str, Any]]:
    await server.registry.flush()
    async with store(server.database_url) as history:
        page = await history.audit(kind=kind, client_id=client_id)
    return [event.details for event in page.items]


async def test_a_frozen_holder_is_replaced_after_one_short_ping(
    server: Server, clients: Clients, twins: Twins
) -> None:
    twin = await twins.register("dev-frozen")
    frozen = server.registry.get_client_info("dev-frozen")
    assert frozen is not None
    twin.freeze()

    started = time.monotonic()
    newcomer = await clients.device("dev-frozen")
    waited = time.monotonic() - started
    # One ping, given up after twin_ping_timeout: not the 40 s of the keepalive pings.
    assert PING_TIMEOUT <= waited < PING_TIMEOUT + 3.0, waited

    live = server.registry.get_client_info("dev-frozen")
    assert live is not None
    assert live.connection_id != frozen.connection_id
    await newcomer.heartbeat_ok()
    async with store(server.database_url) as history:
        await server.registry.flush()
        rows = {row.connection_id: row for row in (await history.connections("dev-frozen")).items}
    old = rows[frozen.connection_id]
    assert old.disconnected_at is not None
    assert (old.close_code, old.close_reason) == (closecodes.REPLACED, "replaced")
    assert rows[live.connection_id].disconnected_at is None
    replaced = await audited(server, AuditKind.CLIENT_REPLACED, "dev-frozen")
    assert [(event["connection_id"], event["code"], event["reason"]) for event in replaced] == [
        (frozen.connection_id, closecodes.REPLACED, "replaced")
    ]

    # Woken up, the old client finds its connection closed, and why.
    twin.thaw()
    assert await twin.line() == {"closed": [closecodes.REPLACED, "replaced"]}
    await newcomer.heartbeat_ok()
    assert server.registry.get_client_info("dev-frozen") == live


async def test_a_live_holder_keeps_its_id_and_the_newcomer_is_refused_at_once(
    server: Server, clients: Clients, twins: Twins
) -> None:
    twin = await twins.register("dev-live")
    holder = server.registry.get_client_info("dev-live")

    started = time.monotonic()
    stranger = await clients.open()
    await stranger.send(type="register", status="ok", client_id="dev-live")
    assert_error(
        await stranger.recv(),
        "client_id 'dev-live' is already registered; duplicate registrations are not allowed",
    )
    code, _ = await stranger.closed()
    refused_after = time.monotonic() - started
    assert code == closecodes.DUPLICATE_CLIENT
    assert refused_after < PING_TIMEOUT, refused_after  # the holder answered its ping

    assert server.registry.get_client_info("dev-live") == holder
    assert await audited(server, AuditKind.CLIENT_REPLACED, "dev-live") == []
    # The holder's connection still works: a task dispatched to it reaches it.
    async with server.http() as http:
        answer = await http.post("/api/dispatch", json={"client_id": "dev-live", "request": "go"})
    assert answer.status_code == 200, answer.text
    assert (await twin.line())["frame"]["type"] == "task"


async def test_concurrent_claims_on_a_frozen_holder_have_exactly_one_winner(
    server: Server, clients: Clients, twins: Twins
) -> None:
    twin = await twins.register("dev-contested")
    twin.freeze()
    outcomes = await asyncio.gather(*(claim(clients, "dev-contested") for _ in range(5)))
    assert sorted(outcomes, key=str) == [closecodes.DUPLICATE_CLIENT] * 4 + [None], outcomes
    assert server.registry.get_online_count() == 1
    assert len(await audited(server, AuditKind.CLIENT_REPLACED, "dev-contested")) == 1


# -- on_duplicate=replace ---------------------------------------------------------------------


async def test_replace_policy_closes_the_replaced_connection(db_url: str) -> None:
    async with running_server(db_url, on_duplicate="replace") as server:
        clients = Clients(server)
        try:
            old = await clients.device("dev-r")
            old_info = server.registry.get_client_info("dev-r")
            assert old_info is not None
            new = await clients.device("dev-r")
            assert await old.closed() == (closecodes.REPLACED, "replaced")
            await new.heartbeat_ok()
            live = server.registry.get_client_info("dev-r")
            assert live is not None
            assert live.connection_id != old_info.connection_id
            async with store(server.database_url) as history:
                await server.registry.flush()
                rows = {
                    row.connection_id: row for row in (await history.connections("dev-r")).items
                }
            replaced = rows[old_info.connection_id]
            assert (replaced.close_code, replaced.close_reason) == (
                closecodes.REPLACED,
                "replaced",
            )
        finally:
            await clients.aclose()


async def _command(device: Client, session_id: str) -> dict[str, Any]:
    command = await device.recv_type("command")
    assert command["session_id"] == session_id, command
    return command


async def _answer(device: Client, command: dict[str, Any]) -> None:
    await device.send_as(
        "command_results",
        session_id=command["session_id"],
        prev_response_id=command["response_id"],
        # One result whatever the command asked: it says which connection answered.
        action_results=[{"status": "success", "result": {"by": "new"}, "call_id": "answer"}],
    )


async def test_the_replaced_connection_ends_its_own_sessions_and_nothing_of_the_new_one(
    db_url: str,
) -> None:
    async with running_server(db_url, on_duplicate="replace") as server:
        clients = Clients(server)
        try:
            const = await clients.constellation("const-r")
            old = await clients.device("dev-r")
            await const.task("s-old", "t-old", target_id="dev-r")
            await _command(old, "s-old")  # never answered: the old connection is replaced

            new = await clients.device("dev-r")
            ended = await const.recv_type("task_end")
            assert (ended["session_id"], ended["status"], ended["error"]) == (
                "s-old",
                "failed",
                DEVICE_DISCONNECTED,
            )
            assert await old.closed() == (closecodes.REPLACED, "replaced")

            await const.task("s-new", "t-new", target_id="dev-r")
            command = await _command(new, "s-new")
            await old.close()  # the old client's own end, once more: it changes nothing
            await const.nothing(QUIET)
            await _answer(new, command)
            ended = await const.recv_type("task_end")
            assert (ended["session_id"], ended["status"], ended["error"]) == (
                "s-new",
                "completed",
                None,
            )
            assert ended["result"][0]["result"] == {"by": "new"}
            await server.registry.flush()
            async with store(server.database_url) as history:
                detail = await history.session("s-new")
            assert detail is not None
            assert detail.session.state == "completed"
        finally:
            await clients.aclose()


async def test_replace_policy_under_a_storm_of_registrations_leaves_one_open(
    db_url: str,
) -> None:
    """Registrations of one id replacing each other, some while the one they replace is
    still being committed: every replaced one is closed with 4411, the last one is served,
    and the store agrees."""
    async with running_server(db_url, on_duplicate="replace") as server:
        clients = Clients(server)
        try:
            opened = [await clients.open() for _ in range(10)]
            await asyncio.gather(
                *(client.send(type="register", status="ok", client_id="dev-s") for client in opened)
            )

            async def rows() -> list[Any]:
                await server.registry.flush()
                async with store(server.database_url) as history:
                    return (await history.connections("dev-s")).items

            records = await eventually(rows, lambda items: len(items) == 10)
            assert [row.disconnected_at for row in records].count(None) == 1
            assert {row.close_reason for row in records if row.disconnected_at} == {"replaced"}
            live = server.registry.get_client_info("dev-s")
            assert live is not None
            survivors = [
                client
                for client in opened
                if live.remote_address == "{}:{}".format(*client.ws.local_address)
            ]
            assert len(survivors) == 1
            for client in opened:
                if client is not survivors[0]:
                    assert (await client.closed())[0] == closecodes.REPLACED
            survivor = survivors[0]
            survivor.client_id = "dev-s"
            assert (await survivor.recv())["type"] == "heartbeat"  # its registration's ack
            await survivor.heartbeat_ok()
            assert server.registry.get_online_count() == 1
        finally:
            await clients.aclose()
