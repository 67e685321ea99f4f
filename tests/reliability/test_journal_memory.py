"""What a client can make the server hold for the store is bounded in bytes, not only in count.

- A registration whose metadata (or device info) is over its cap (``max_metadata_bytes``,
  ``max_device_info_bytes``) is refused with 4400 and an error naming the field and the cap;
  nothing of it is recorded.
- During an outage, the journal also refuses new work at once at ``journal_limit_bytes``.
- A registration refused after ``store_timeout`` is withdrawn from the journal: its memory is
  given back at once and it is not written when the store is back. Twenty registrations of
  20 MB each during an outage (caps raised to let them in) leave the server's memory where it
  was, where they once took it from 89 MB to 1.6 GB.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from registry.server import closecodes
from tests.reliability.store_faults import Fault, SqliteLocked, prepared
from tests.support import (
    API_KEY,
    HOST,
    WAIT,
    Client,
    Clients,
    Serve,
    Server,
    eventually,
    free_port,
    sql,
)

KIB = 1024
MIB = 1024 * KIB
STORE_TIMEOUT = 1.0
#: How long the server may take to find the store writable again (see test_store_faults).
RECOVERY = 30.0


def _metadata(size: int) -> dict[str, str]:
    """Registration metadata of exactly ``size`` bytes as canonical JSON."""
    return {"platform": "linux", "blob": "x" * (size - len('{"blob":"","platform":"linux"}'))}


async def _register(clients: Clients, client_id: str, metadata: dict[str, Any]) -> Client:
    client = await clients.open()
    await client.send(
        type="register", status="ok", client_type="device", client_id=client_id, metadata=metadata
    )
    return client


def _metric(text: str, name: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    return float(line.split()[1])


async def _health(server: Server) -> tuple[int, dict[str, Any]]:
    async with server.http() as http:
        answer = await http.get("/api/health")
        body: dict[str, Any] = answer.json()
        return answer.status_code, body


class TestCaps:
    @pytest.fixture
    def server_settings(self) -> dict[str, Any]:
        return {"max_device_info_bytes": 4 * KIB, "heartbeat_interval": 60.0}

    async def test_metadata_over_its_cap_is_refused_and_nothing_is_recorded(
        self, server: Server, clients: Clients
    ) -> None:
        before = server.registry.journal.last_sequence
        client = await _register(clients, "big", _metadata(64 * KIB + 1))
        frame = await client.recv()
        assert frame["error"] == (
            "Invalid registration: metadata: is 65,537 bytes as JSON, over the limit of "
            "65,536 (max_metadata_bytes)"
        ), frame
        assert await client.closed() == (closecodes.INVALID_REGISTRATION, "invalid_registration")
        assert server.registry.journal.last_sequence == before  # nothing journalled
        at_cap = await _register(clients, "at-cap", _metadata(64 * KIB))
        assert (await at_cap.recv())["type"] == "heartbeat"
        await server.registry.flush()
        rows = await sql(server.database_url, "SELECT client_id FROM connections")
        assert rows == [("at-cap",)]

    async def test_device_info_over_its_cap_is_refused_and_nothing_is_recorded(
        self, server: Server, clients: Clients
    ) -> None:
        metadata = {"platform": "linux", "system_info": {"blob": "x" * (4 * KIB)}}
        client = await _register(clients, "big", metadata)
        frame = await client.recv()
        assert frame["error"] == (
            "Invalid registration: device_info: is 4,107 bytes as JSON, over the limit of "
            "4,096 (max_device_info_bytes)"
        ), frame
        assert await client.closed() == (closecodes.INVALID_REGISTRATION, "invalid_registration")
        assert not server.registry.is_online("big")
        await server.registry.flush()
        for table in ("connections", "clients", "device_info_snapshots", "audit_events"):
            rows = await sql(server.database_url, f"SELECT count(*) FROM {table}")
            assert rows == [(1 if table == "audit_events" else 0,)], table  # node_started


class TestByteLimit:
    LIMIT_BYTES = 1 * MIB

    @pytest.fixture(
        params=["sqlite-locked", pytest.param("postgresql-refusing", marks=pytest.mark.postgres)]
    )
    async def fault(self, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fault]:
        async with prepared(request.param, tmp_path) as prepared_fault:
            yield prepared_fault

    @pytest.fixture
    def db_url(self, fault: Fault) -> str:
        return fault.url

    @pytest.fixture
    def server_settings(self) -> dict[str, Any]:
        return {
            "store_timeout": STORE_TIMEOUT,
            "auto_migrate": True,
            "heartbeat_interval": 60.0,
            "journal_limit_bytes": self.LIMIT_BYTES,
        }

    async def test_the_byte_limit_refuses_registrations_at_once(
        self, fault: Fault, server: Server, clients: Clients
    ) -> None:
        """Twenty devices with 60 KiB of metadata each leave during an outage: their ends are
        accepted (1.2 MiB of client rows); the next registration is refused at once."""
        metadata = _metadata(60 * KIB)
        leaving = [await clients.register(f"dev-{n}", metadata=metadata) for n in range(20)]
        try:
            await fault.inject()
            for client in leaving:
                await client.close()
            journal = server.registry.journal
            await eventually(
                lambda: _health(server),
                lambda answer: answer[1].get("journal_bytes", 0) >= self.LIMIT_BYTES,
            )
            started = time.monotonic()
            refused = await _register(clients, "late", {"platform": "linux"})
            frame = await refused.recv()
            assert "try again later" in frame["error"], frame
            assert await refused.closed() == (closecodes.STORE_UNAVAILABLE, "journal_full")
            assert time.monotonic() - started < STORE_TIMEOUT / 2
            status, body = await _health(server)
            assert status == 503, body
            assert body["journal_limit_bytes"] == self.LIMIT_BYTES, body
            assert body["journal_depth"] < body["journal_limit"], body  # bytes, not count
            async with server.http() as http:
                metrics = (await http.get("/metrics")).text
            assert _metric(metrics, "registry_journal_limit_bytes") == self.LIMIT_BYTES
            assert _metric(metrics, "registry_journal_bytes") == journal.depth_bytes
        finally:
            await fault.clear()
        await eventually(lambda: _health(server), lambda answer: answer[0] == 200, wait=RECOVERY)
        await server.registry.flush()
        rows = await sql(server.database_url, "SELECT count(*) FROM connections")
        assert rows == [(20,)]
        closed = await sql(
            server.database_url, "SELECT count(*) FROM connections WHERE disconnected_at IS NULL"
        )
        assert closed == [(0,)]


def _resident(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid``, in bytes."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) * KIB, int(fields["VmHWM"].split()[0]) * KIB


async def _refused_registration(port: int, frame: str) -> None:
    ws = await connect(f"ws://{HOST}:{port}/ws?token={API_KEY}", open_timeout=WAIT)
    client = Client(ws)
    await client.send_raw(frame)
    answer = await client.recv()
    assert "try again later" in answer["error"], answer
    assert await client.closed() == (closecodes.STORE_UNAVAILABLE, "store_unavailable")


async def test_large_registrations_refused_in_an_outage_keep_memory_bounded(
    tmp_path: Path,
) -> None:
    """The issue's reproduction, against ``registry serve``: 20 registrations of 20 MB
    metadata each during an outage (caps raised so they get as far as the journal). The
    server's memory follows what is in flight, not how many were refused: the second ten
    leave it no higher than the first ten did."""
    locked = SqliteLocked(tmp_path)
    settings = {
        "store_timeout": STORE_TIMEOUT,
        "max_metadata_bytes": 32 * MIB,
        "heartbeat_interval": 60.0,
    }
    server = Serve(locked.url, free_port(), tmp_path / "serve.log", settings=settings)
    http = httpx.AsyncClient(
        base_url=f"http://{HOST}:{server.port}", headers={"X-API-Key": API_KEY}, timeout=WAIT
    )
    blob = "x" * (20 * MIB)
    resident: list[int] = []
    try:
        await server.ready()
        pid = server.process.pid
        before, _ = _resident(pid)
        await locked.inject()
        try:
            for number in range(20):
                frame = {
                    "type": "register",
                    "status": "ok",
                    "client_type": "device",
                    "client_id": f"big-{number}",
                    "metadata": {"platform": "linux", "blob": blob},
                }
                await _refused_registration(server.port, json.dumps(frame))
                resident.append(_resident(pid)[0])
            # Nothing of them stays queued once the commit that was trying them has failed
            # (one in a commit that succeeded when the store is back would be recorded as
            # closed instead).
            await eventually(
                lambda: http.get("/api/health"),
                lambda answer: answer.json()["journal_depth"] == 0,
                wait=RECOVERY,
            )
            after, peak = _resident(pid)
        finally:
            await locked.clear()
        await eventually(
            lambda: http.get("/api/health"), lambda answer: answer.status_code == 200, wait=RECOVERY
        )
    finally:
        await http.aclose()
        await server.stop(signal.SIGTERM)
    assert await sql(locked.url, "SELECT client_id FROM connections") == []
    assert await sql(locked.url, "SELECT client_id FROM clients") == []
    print(
        f"\n20 registrations of 20 MB refused during an outage: server RSS {before / MIB:.0f} "
        f"MiB before, at most {max(resident[:10]) / MIB:.0f} MiB over the first ten, "
        f"{max(resident[10:]) / MIB:.0f} MiB over the next ten, {after / MIB:.0f} MiB after "
        f"(peak {peak / MIB:.0f} MiB); none written"
    )
    assert max(resident[10:]) <= max(resident[:10]) + 64 * MIB, [r // MIB for r in resident]
    assert after - before < 400 * MIB
