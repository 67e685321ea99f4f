"""The SQLite file under a running server.

- **One server per file.** A second ``registry serve`` on the file of a running one refuses to
  start, in one line that names the running one (pid, host, node, start time), and changes
  nothing of it: its connections stay open, its node running, and it keeps serving. The
  command line's readers work beside it. Once it is killed (``kill -9``), a new server starts
  and recovers its rows as after any crash.
- **The file deleted or replaced under it** is a store fault like any other: registrations are
  refused (4503), ``/api/health`` is ``degraded`` naming the file, ``registry_store_healthy``
  is 0, each failed commit is an ERROR log line; nothing is acknowledged as durable that would
  vanish with the unlinked file. The file put back, the server writes what it kept.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from registry.server import closecodes
from tests.server_process import ROOT
from tests.support import (
    API_KEY,
    HOST,
    WAIT,
    Client,
    Serve,
    eventually,
    free_port,
    running_server,
    sql,
)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "serve.log"


@pytest.fixture(autouse=True)
def _show_server_log(request: pytest.FixtureRequest, log_path: Path) -> Iterator[None]:
    yield
    if log_path.exists():
        report = log_path.read_text(errors="replace")
        if report.strip():
            request.node.add_report_section("call", "registry serve output", report)


@asynccontextmanager
async def serving(database_url: str, log: Path, **settings: Any) -> AsyncIterator[Serve]:
    process = Serve(database_url, free_port(), log, settings=settings)
    try:
        await process.ready()
        yield process
    finally:
        await process.stop(signal.SIGKILL)


async def _open(port: int) -> Client:
    return Client(await connect(f"ws://{HOST}:{port}/ws?token={API_KEY}", open_timeout=WAIT))


async def _register(port: int, client_id: str) -> tuple[Client, dict[str, Any]]:
    """Register a device; the client and the first frame it got."""
    client = await _open(port)
    client.client_id, client.client_type = client_id, "device"
    await client.send(
        type="register",
        status="ok",
        client_type="device",
        client_id=client_id,
        metadata={"platform": "linux"},
    )
    return client, await client.recv()


async def _health(port: int) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(
        base_url=f"http://{HOST}:{port}", headers={"X-API-Key": API_KEY}, timeout=WAIT
    ) as http:
        answer = await http.get("/api/health")
        metrics = (await http.get("/metrics")).text
    body: dict[str, Any] = answer.json()
    (healthy,) = [line for line in metrics.splitlines() if line.startswith("registry_store_h")]
    body["registry_store_healthy"] = float(healthy.split()[1])
    return answer.status_code, body


async def _refused(port: int, client_id: str) -> None:
    client, frame = await _register(port, client_id)
    assert frame["type"] == "error", frame
    assert "try again later" in frame["error"], frame
    code, _ = await client.closed()
    assert code == closecodes.STORE_UNAVAILABLE


async def test_a_second_server_on_the_same_file_refuses_to_start(
    tmp_path: Path, log_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    async with serving(url, log_path) as first:
        device, ack = await _register(first.port, "dev-1")
        assert ack["type"] == "heartbeat", ack

        second_log = tmp_path / "second.log"
        second = Serve(url, free_port(), second_log)
        exit_code = await asyncio.to_thread(second.process.wait, 30)
        await second.stop(signal.SIGKILL)  # reaped already: closes its log
        output = second_log.read_text().strip()
        assert exit_code != 0, output
        assert len(output.splitlines()) == 1, output
        assert f"pid {first.process.pid} on host " in output, output
        assert f", node {socket.gethostname()}:{first.port}, started at " in output, output
        assert "in use by another registry" in output, output

        # The first run is untouched and serving.
        await device.heartbeat_ok()
        assert await sql(url, "SELECT client_id, close_reason FROM connections") == [
            ("dev-1", None)
        ]
        assert await sql(url, "SELECT count(*), count(stopped_at) FROM nodes") == [(1, 0)]
        # A reader of the command line works beside it.
        listed = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "registry", "clients", "--database-url", url,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await listed.communicate()
        assert listed.returncode == 0, stderr
        assert "dev-1" in stdout.decode()

        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
        await device.closed()

    # Killed, it holds nothing: the next server starts and recovers its rows.
    async with serving(url, log_path):
        rows = await sql(url, "SELECT close_reason FROM connections")
        assert rows == [("server_restart",)]


async def test_a_deleted_database_file_is_a_store_fault(tmp_path: Path, log_path: Path) -> None:
    path = tmp_path / "registry.db"
    async with serving(f"sqlite+aiosqlite:///{path}", log_path, store_timeout=1) as server:
        device, _ = await _register(server.port, "dev-1")
        path.unlink()

        await _refused(server.port, "dev-2")
        status, body = await _health(server.port)
        assert status == 503, body
        assert body["status"] == "degraded", body
        assert f"the database file {path} has been deleted" in body["error"], body
        assert body["registry_store_healthy"] == 0.0, body
        await device.heartbeat_ok()  # what is live keeps working
        await eventually(
            lambda: asyncio.to_thread(log_path.read_text),
            lambda text: "operations failed: StoreUnavailableError: the database file" in text,
        )


async def test_a_replaced_database_file_is_a_store_fault_until_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    path = tmp_path / "registry.db"
    url = f"sqlite+aiosqlite:///{path}"
    async with running_server(url, store_timeout=1.0) as server:
        device, _ = await _register(server.port, "dev-1")
        aside = tmp_path / "aside.db"
        path.rename(aside)
        shutil.copyfile(aside, path)  # a file of the same content, but another file

        await _refused(server.port, "dev-2")
        status, body = await _health(server.port)
        assert status == 503, body
        assert f"the database file {path} has been replaced by another file" in body["error"]
        assert body["registry_store_healthy"] == 0.0, body
        assert any(
            record.levelno == logging.ERROR and "has been replaced" in record.getMessage()
            for record in caplog.records
        )

        aside.replace(path)  # the file it opened is back
        await eventually(lambda: _health(server.port), lambda answer: answer[0] == 200)
        later, ack = await _register(server.port, "dev-3")
        assert ack["type"] == "heartbeat", ack
        await device.close()
        await later.close()
    rows = await sql(url, "SELECT client_id, close_reason FROM connections ORDER BY client_id")
    assert [tuple(row) for row in rows] == [("dev-1", "client_closed"), ("dev-3", "client_closed")]
