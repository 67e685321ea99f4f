"""A client's "last seen" (library, REST ``/api/clients/{id}``, ``registry client``): now while a
connection of it is open, and when its last connection closed once it has left, also when
that close was recorded by recovery after a crash (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import pytest

from registry import Registry
from tests.operator.conftest import cli, running_server
from tests.support import Clients, closed_record, store

pytestmark = pytest.mark.timeout(90)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_last_seen_is_now_while_connected_then_the_disconnect_time(
    database_url: str,
) -> None:
    async with running_server(database_url) as server:
        clients = Clients(server)
        try:
            device = await clients.device("dev-seen")
            await device.heartbeat_ok()
            url = ("--database-url", database_url)
            async with server.http() as http:
                before = datetime.now(UTC)
                rest = (await http.get("/api/clients/dev-seen")).json()
                async with store(database_url) as history:
                    summary = await history.client("dev-seen")
                table, as_json = await asyncio.gather(
                    cli("client", "dev-seen", *url), cli("client", "dev-seen", "--json", *url)
                )
                assert rest["online"] is True
                assert _time(rest["last_seen"]) >= before
                assert summary is not None
                assert summary.online
                assert summary.last_seen >= before
                assert as_json.code == 0, as_json
                assert _time(as_json.json()["last_seen"]) >= before
                assert table.code == 0, table
                assert "last seen    now" in table.stdout, table.stdout

                await device.close()
                record = await closed_record(server, "dev-seen")
                assert record.disconnected_at is not None
                rest = (await http.get("/api/clients/dev-seen")).json()
                assert rest["online"] is False
                assert _time(rest["last_seen"]) == record.disconnected_at
                table, as_json = await asyncio.gather(
                    cli("client", "dev-seen", *url), cli("client", "dev-seen", "--json", *url)
                )
                assert _time(as_json.json()["last_seen"]) == record.disconnected_at
                shown = record.disconnected_at.strftime("%Y-%m-%d %H:%M:%S")
                assert f"last seen    {shown}" in table.stdout, table.stdout
        finally:
            await clients.aclose()


CRASHING_RUN = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from registry import ClientType, Registry

    async def main() -> None:
        reg = Registry(sys.argv[1], auto_migrate=True, node_name="seen-node",
                       heartbeat_interval=0.05)
        await reg.start()
        reg.add_client("dev-crash", "linux", object(), ClientType.DEVICE)
        await reg.flush()
        await asyncio.sleep(0.5)  # the node heartbeats meanwhile: it saw the device live
        await reg.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_last_seen_after_a_crash_is_when_recovery_closed_the_connection(
    database_url: str,
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_RUN, database_url, stderr=subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    async with Registry(database_url, node_name="seen-node") as reg:
        (record,) = (await reg.history.connections("dev-crash")).items
        assert record.close_reason == "server_restart"
        assert record.disconnected_at is not None
        assert record.disconnected_at > record.connected_at
        summary = await reg.history.client("dev-crash")
        assert summary is not None
        assert not summary.online
        assert summary.last_seen == record.disconnected_at
