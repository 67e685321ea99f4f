"""A SQLite database has one registry.

A second registry on a file that another one has open (in another process, or in this one) is
refused at start with :class:`DatabaseInUseError` naming the holder, and changes nothing: the
holder's open connections, its node run and its sessions stay as they are. The lock goes with
the holder's process however it ends, so after ``kill -9`` the next start recovers as after any
crash. Readers (``History``) take no lock and work beside a running registry.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from registry import ClientType, DatabaseInUseError, Registry
from tests.server_process import ROOT
from tests.support import sql, store

HOLDING_RUN = textwrap.dedent(
    """
    import asyncio, sys
    from registry import ClientType, Registry

    async def main() -> None:
        async with Registry(sys.argv[1], node_name="holder:5000") as reg:
            reg.add_client("d1", "linux", object(), ClientType.DEVICE)
            await reg.open_session("s1", owner_id="d1", executor_id="d1", task_name="t")
            await reg.flush()
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())
    """
)


@asynccontextmanager
async def holder(url: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """Another process with a registry started on ``url``, one client and one session live;
    killed with SIGKILL at the end if still running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDING_RUN,
        url,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if line != b"ready\n":
            assert process.stderr is not None
            raise AssertionError((line, await process.stderr.read()))
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _untouched(url: str) -> None:
    """The holder's run is as it left it: connection open, session active, node running."""
    assert await sql(url, "SELECT close_reason FROM connections") == [(None,)]
    assert await sql(url, "SELECT state FROM sessions") == [("active",)]
    assert await sql(url, "SELECT stopped_at FROM nodes") == [(None,)]


async def test_a_second_registry_in_another_process_is_refused(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    async with holder(url) as process:
        second = Registry(url, node_name="second:5001")
        with pytest.raises(DatabaseInUseError) as refused:
            await second.start()
        message = str(refused.value)
        assert message.startswith(
            f"the database {tmp_path / 'registry.db'} is in use by another registry "
            f"(pid {process.pid} on host {socket.gethostname()}, node holder:5000, started at "
        ), message
        assert message.endswith("); stop that one first, or use another database"), message
        with pytest.raises(DatabaseInUseError):
            second.ensure_free()
        await _untouched(url)
        # Readers work beside it.
        async with store(url) as history:
            assert [row.client_id for row in (await history.open_connections()).items] == ["d1"]

        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
        second.ensure_free()
        async with second:  # the lock went with the process: recovery as after a crash
            assert [s.session_id for s in second.get_interrupted_sessions("d1")] == ["s1"]
    reasons = await sql(url, "SELECT close_reason FROM connections")
    assert reasons == [("server_restart",)]
    stops = await sql(url, "SELECT stop_reason FROM nodes ORDER BY started_at")
    assert stops == [("server_restart",), ("shutdown",)]


async def test_a_second_registry_in_the_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    url = f"sqlite+aiosqlite:///{path}"
    async with Registry(url) as first:
        first.add_client("d1", "linux", object(), ClientType.DEVICE)
        await first.flush()
        # The same file by another name is the same database.
        (tmp_path / "alias.db").symlink_to(path)
        for other in (url, f"sqlite+aiosqlite:///{tmp_path / 'alias.db'}"):
            with pytest.raises(DatabaseInUseError, match=r"pid \d+ on host .*, node "):
                await Registry(other).start()
        assert first.is_online("d1")
        await first.flush()  # it still writes
    async with Registry(url) as again:  # closed: free again
        assert again.get_online_count() == 0
    assert await sql(url, "SELECT close_reason FROM connections") == [("server_shutdown",)]
    # Closed, the lock file says nobody holds it.
    assert (tmp_path / "registry.db.lock").read_text() == ""


def test_checking_a_free_database_creates_nothing(tmp_path: Path) -> None:
    Registry(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}").ensure_free()
    assert list(tmp_path.iterdir()) == []
