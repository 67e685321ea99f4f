"""A server as a subprocess on a loopback port: ``registry serve`` for the suites that kill and
restart it, and the servers the benchmarks measure.

The benchmarks import this module (the suites must not depend on the benchmarks, which are
heavier and change for their own reasons), so it imports nothing of pytest or of the other
test modules. Every server gets the same environment: this process's, less any ``REGISTRY_*``
variable (settings come from the command line and the defaults only), with the repository
first on ``PYTHONPATH`` (the checkout's code runs, whatever the working directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
#: Exit codes of a server that shut down gracefully on SIGINT or SIGTERM: ``registry serve``
#: exits 0 (it does not let uvicorn re-raise the signal).
CLEAN_EXITS = frozenset({0})


def free_port() -> int:
    """A TCP port on HOST that was free a moment ago (for a server in another process)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def environment() -> dict[str, str]:
    """The environment of every server subprocess (see the module docstring)."""
    variables = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    variables["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [variables.get("PYTHONPATH")])]
    )
    return variables


def serve_command(
    database_url: str,
    port: int,
    *,
    api_key: str | None,
    log_level: str = "warning",
    entry: Sequence[str] = ("-m", "registry"),
    auth: Sequence[str] | None = None,
    options: Sequence[str] = (),
) -> list[str]:
    """``registry serve`` on HOST:``port`` and ``database_url``; ``api_key`` None serves with
    ``--no-auth``, ``auth`` replaces those authentication options, ``options`` are appended.
    ``entry`` replaces ``-m registry``, e.g. by a ``-c`` bootstrap that ends in the CLI."""
    if auth is None:
        auth = ["--no-auth"] if api_key is None else ["--api-key", api_key]
    return [
        sys.executable,
        *entry,
        "serve",
        *auth,
        "--host",
        HOST,
        "--port",
        str(port),
        "--database-url",
        database_url,
        "--log-level",
        log_level,
        *options,
    ]


class ServerProcess:
    """One server subprocess that listens on HOST:``port``, its output appended to ``log``.
    It starts on construction; always end it with :meth:`halt` or :meth:`stop`."""

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        log: Path,
        *,
        name: str = "registry serve",
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log
        self.killed = False  # by halt(), after the signal it sent went unheeded
        with log.open("ab") as output:  # the child has its own copy of the descriptor
            self.process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=environment(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws"

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise if the process has exited, with its exit code and the end of its log."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Return once the server accepts TCP connections: uvicorn listens only once the
        application's startup is done (for the registry: schema check and recovery). Raise if
        the process exits first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(OSError):
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s")
            time.sleep(0.05)

    async def ready(self) -> None:
        """:meth:`wait_ready` without blocking the caller's event loop."""
        await asyncio.to_thread(self.wait_ready)

    def halt(self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` unless the process has exited, wait up to ``timeout`` seconds for it,
        then SIGKILL it (``killed``); the exit code. Calling it again only returns that."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """:meth:`halt` in a thread, so that the caller's event loop keeps serving its own
        clients (their closing handshakes) while the server shuts down."""
        return await asyncio.to_thread(self.halt, sig)

    @property
    def stopped_cleanly(self) -> bool:
        """It exited by itself after a graceful shutdown (:data:`CLEAN_EXITS`)."""
        return self.process.returncode in CLEAN_EXITS and not self.killed
