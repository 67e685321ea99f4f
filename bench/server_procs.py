"""Server subprocesses for the server benchmark: start on a free loopback port, probe, measure
(RSS and CPU from ``/proc``), stop.

Both servers get the same environment (any ``REGISTRY_*`` variable removed, so both read the
defaults of :class:`~registry.settings.Settings`) and inherit this process's
``RLIMIT_NOFILE``, which :func:`raise_fd_limit` raises first.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import IO

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def reap(processes: Iterable[BaseProcess], timeout: float) -> None:
    """Join each worker process, terminating (then killing) one that outlives ``timeout``."""
    for process in processes:
        process.join(timeout=timeout)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` towards ``wanted`` (capped by the hard limit); return
    the (soft, hard) limits now in force. Subprocesses started afterwards inherit them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def machine_busy_seconds() -> float:
    """CPU seconds spent by every process of the machine so far, all cores (``/proc/stat``:
    user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _server_environment() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    paths = [str(REPO_ROOT), *filter(None, [environment.get("PYTHONPATH")])]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    return environment


@dataclass
class ServerProcess:
    """One server under test, running as a subprocess of the benchmark."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log_file: IO[bytes]
    database: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    def rss_bytes(self) -> int:
        """Resident set size of the server process (``VmRSS``)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process, all its threads included."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        return ticks / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 30) -> str:
        self.log_file.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} server exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Return once the server accepts TCP connections (uvicorn binds after startup)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError):
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} server not ready after {timeout:.0f}s")

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGINT (uvicorn's graceful shutdown), then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log_file.close()


def _start(name: str, command: Sequence[str], port: int, workdir: Path) -> ServerProcess:
    log_path = workdir / f"{name}-{port}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        list(command),
        cwd=workdir,
        env=_server_environment(),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    server = ServerProcess(name, process, port, log_path, log_file)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def start_registry(workdir: Path, log_level: str, database: Path | None = None) -> ServerProcess:
    """``registry serve --no-auth`` on a free port, on ``database`` (an SQLite file) or by
    default a fresh one in ``workdir``."""
    port = free_port()
    database = database or workdir / f"registry-{port}.db"
    command = [
        sys.executable,
        "-m",
        "registry",
        "serve",
        "--no-auth",
        "--host",
        HOST,
        "--port",
        str(port),
        "--database-url",
        f"sqlite+aiosqlite:///{database}",
        "--log-level",
        log_level,
    ]
    server = _start("registry", command, port, workdir)
    server.database = database
    return server


def start_bare(workdir: Path, log_level: str) -> ServerProcess:
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


def online_clients(server: ServerProcess) -> list[str]:
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
