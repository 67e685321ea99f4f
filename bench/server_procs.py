"""Server subprocesses for the benchmarks (started by :mod:`tests.server_process`, the
launcher the suites use too): start on a free loopback port, probe, measure (RSS and CPU from
``/proc``), stop.

Every server inherits this process's ``RLIMIT_NOFILE``, which
:func:`bench.client.raise_fd_limit` raises first.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.server_process import HOST, ServerProcess, environment, free_port, serve_command


def machine_busy_seconds() -> float:
    """CPU seconds spent by every process of the machine so far, all cores (``/proc/stat``:
    user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` line of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``), None once it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    return None


class MeasuredServer(ServerProcess):
    """A server under measurement, with its database when it is the registry's."""

    database_url: str | None = None
    database: Path | None = None  # the SQLite file, when the benchmark made one

    def rss_bytes(self) -> int:
        """Resident set size of the server process (``VmRSS``)."""
        kib = proc_status_kib(self.pid, "VmRSS")
        if kib is None:
            raise RuntimeError(f"no VmRSS for pid {self.pid}")
        return kib * 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, all its threads included."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        return ticks / os.sysconf("SC_CLK_TCK")


def _start(name: str, command: Sequence[str], port: int, workdir: Path) -> MeasuredServer:
    server = MeasuredServer(command, port, workdir / f"{name}-{port}.log", name=name, cwd=workdir)
    try:
        server.wait_ready()
    except BaseException:
        server.halt()
        raise
    return server


def start_registry(
    workdir: Path,
    log_level: str,
    *,
    database_url: str | None = None,
    entry: Sequence[str] = ("-m", "registry"),
) -> MeasuredServer:
    """``registry serve --no-auth`` on a free port and a fresh SQLite file in ``workdir``, or on
    ``database_url`` after ``registry db upgrade`` (the server does not migrate PostgreSQL
    itself: that is the operator's step). ``entry`` as :func:`tests.server_process.serve_command`
    takes it."""
    port = free_port()
    database = None if database_url else workdir / f"registry-{port}.db"
    url = database_url or f"sqlite+aiosqlite:///{database}"
    if database_url:
        subprocess.run(
            [sys.executable, "-m", "registry", "db", "upgrade", "--database-url", url],
            cwd=workdir,
            env=environment(),
            stdin=subprocess.DEVNULL,
            check=True,
            timeout=120,
        )
    command = serve_command(url, port, api_key=None, log_level=log_level, entry=entry)
    server = _start("registry", command, port, workdir)
    server.database_url, server.database = url, database
    return server


def start_bare(workdir: Path, log_level: str) -> MeasuredServer:
    """The bare FastAPI baseline (:mod:`bench.server_bare`) on a free port."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bench.server_bare",
        "--port",
        str(port),
        "--log-level",
        log_level,
    ]
    return _start("bare", command, port, workdir)


def online_clients(server: MeasuredServer) -> list[str]:
    """``GET /api/clients`` of the registry server."""
    url = f"http://{HOST}:{server.port}/api/clients"
    with urllib.request.urlopen(url, timeout=60) as response:
        body = json.load(response)
    clients: list[str] = body["online_clients"]
    return clients


@dataclass(frozen=True, slots=True)
class ConnectionRows:
    """What the ``connections`` table of a registry database says."""

    total: int
    still_open: int
    close_codes: dict[str, int]


def connection_rows(database: Path) -> ConnectionRows:
    """Count connection rows, open ones (no ``disconnected_at``) and rows per close code/reason,
    read with plain ``sqlite3`` while the server runs (WAL readers do not block it)."""
    with contextlib.closing(sqlite3.connect(database, timeout=30)) as connection:
        total, still_open = connection.execute(
            "SELECT count(*), count(*) - count(disconnected_at) FROM connections"
        ).fetchone()
        codes = connection.execute(
            "SELECT close_code, close_reason, count(*) FROM connections "
            "WHERE disconnected_at IS NOT NULL GROUP BY close_code, close_reason"
        ).fetchall()
    return ConnectionRows(
        total=total,
        still_open=still_open,
        close_codes={f"{code} {reason}": count for code, reason, count in codes},
    )
