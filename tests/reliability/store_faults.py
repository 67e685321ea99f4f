"""Real store faults to inject under a running server, and to clear again.

Each :class:`Fault` owns a database of its own and breaks it the way it breaks in production:

- ``sqlite-locked``: another process holds SQLite's write lock (``BEGIN EXCLUSIVE``), so every
  commit waits out the busy timeout and fails with ``database is locked``;
- ``sqlite-disk-full``: the database lives on a small tmpfs that a ballast file fills, so
  commits fail with ``database or disk is full`` (needs the right to mount; else it skips);
- ``postgresql-read-only``: the database is switched to ``default_transaction_read_only`` and
  its sessions are ended, so every new transaction is read-only;
- ``postgresql-refusing``: the database stops accepting connections (``ALLOW_CONNECTIONS
  false``) and its sessions are ended;
- ``postgresql-restart``: a PostgreSQL cluster of the test's own is stopped as a crash would
  (``pg_ctl stop -m immediate``) and started again.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import make_url

from tests.databases import POSTGRES_ADMIN_URL, REQUIRE_POSTGRES, admin
from tests.support import free_port


class Fault(ABC):
    """A database (``url``) and a way to break it and mend it."""

    url: str
    broken = False

    async def inject(self) -> None:
        """Break the store: from now on commits fail (or hang) until :meth:`clear`."""
        self.broken = True  # also if breaking fails halfway: clear() then mends what it did
        await self._break()

    async def clear(self) -> None:
        """Mend the store (if broken); the server must find it writable again by itself."""
        if self.broken:
            await self._mend()
            self.broken = False

    @abstractmethod
    async def _break(self) -> None: ...

    @abstractmethod
    async def _mend(self) -> None: ...


def _unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail where the PostgreSQL tests are required (CI)."""
    if REQUIRE_POSTGRES:
        pytest.fail(reason)
    pytest.skip(reason)


class SqliteLocked(Fault):
    def __init__(self, directory: Path) -> None:
        self._path = directory / "registry.db"
        self.url = f"sqlite+aiosqlite:///{self._path}"
        self._holder: sqlite3.Connection | None = None

    async def _break(self) -> None:
        holder = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        await asyncio.to_thread(holder.execute, "BEGIN EXCLUSIVE")
        self._holder = holder

    async def _mend(self) -> None:
        if self._holder is not None:
            self._holder.execute("ROLLBACK")
            self._holder.close()
            self._holder = None


class SqliteDiskFull(Fault):
    SIZE = 16 * 1024 * 1024

    def __init__(self, mountpoint: Path) -> None:
        self._mountpoint = mountpoint
        self._path = mountpoint / "registry.db"
        self._ballast = mountpoint / "ballast"
        self.url = f"sqlite+aiosqlite:///{self._path}"

    def mount(self) -> None:
        self._mountpoint.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.SIZE}", "tmpfs", str(self._mountpoint)],
            capture_output=True,
            text=True,
            check=False,
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill: {mounted.stderr.strip()}")

    def unmount(self) -> None:
        # Lazily: a server that failed to stop may still hold the file; the kernel unmounts
        # once it lets go.
        subprocess.run(["umount", "--lazy", str(self._mountpoint)], check=True)

    async def _break(self) -> None:
        # An empty WAL first, so the next commit must grow a file (a WAL that already has room
        # would take a small commit on a full disk).
        with sqlite3.connect(self._path) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with self._ballast.open("wb", buffering=0) as ballast:
            for chunk in (1024 * 1024, 4096, 512):
                try:
                    while True:
                        ballast.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
        assert shutil.disk_usage(self._mountpoint).free < 4096

    async def _mend(self) -> None:
        self._ballast.unlink(missing_ok=True)


class PostgresSwitched(Fault):
    """A database of the test's own on the shared server, switched by ``ALTER DATABASE``."""

    def __init__(self, broken: str, mended: str) -> None:
        self._name = f"registry_fault_{uuid.uuid4().hex[:8]}"
        self.url = make_url(POSTGRES_ADMIN_URL).set(database=self._name).render_as_string(False)
        self._broken, self._mended = broken, mended

    async def create(self) -> None:
        await admin(POSTGRES_ADMIN_URL, f'CREATE DATABASE "{self._name}"')

    async def drop(self) -> None:
        await admin(POSTGRES_ADMIN_URL, f'DROP DATABASE IF EXISTS "{self._name}" WITH (FORCE)')

    async def _switch(self, setting: str) -> None:
        await admin(
            POSTGRES_ADMIN_URL,
            f'ALTER DATABASE "{self._name}" {setting}',
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{self._name}' AND pid <> pg_backend_pid()",
        )

    async def _break(self) -> None:
        await self._switch(self._broken)

    async def _mend(self) -> None:
        await self._switch(self._mended)


class PostgresCluster(Fault):
    """A PostgreSQL cluster of the test's own, in a temporary directory, on a free port."""

    def __init__(self) -> None:
        bindir = self._bindir()
        self._pg_ctl = str(Path(bindir) / "pg_ctl")
        self._initdb = str(Path(bindir) / "initdb")
        self._port = free_port()
        self._root = Path(tempfile.mkdtemp(prefix="registry-pg-"))
        self._data = self._root / "data"
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self._port}/registry"

    @staticmethod
    def _bindir() -> str:
        pg_config = shutil.which("pg_config")
        if pg_config is None:
            _unavailable("no PostgreSQL server binaries (pg_config) to run a cluster with")
        found = subprocess.run(
            [str(pg_config), "--bindir"], capture_output=True, text=True, check=True
        )
        bindir = found.stdout.strip()
        if not (Path(bindir) / "initdb").exists():
            _unavailable(f"no initdb in {bindir} to run a PostgreSQL cluster with")
        return bindir

    def _run(self, *command: str) -> None:
        """Run a PostgreSQL tool as its owner: the server refuses to run as root."""
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=60)

    async def create(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self._root, "postgres")
        await asyncio.to_thread(
            self._run, self._initdb, "-D", str(self._data), "-A", "trust", "-U", "postgres",
            "--no-sync",
        )  # fmt: skip
        await self._start()
        await admin(
            f"postgresql+asyncpg://postgres@127.0.0.1:{self._port}/postgres",
            "CREATE DATABASE registry",
        )

    async def _start(self) -> None:
        options = f"-p {self._port} -k {self._root} -c listen_addresses=127.0.0.1"
        await asyncio.to_thread(
            self._run, self._pg_ctl, "-D", str(self._data), "-o", options,
            "-l", str(self._root / "server.log"), "-w", "start",
        )  # fmt: skip

    async def _stop(self, mode: str) -> None:
        await asyncio.to_thread(
            self._run, self._pg_ctl, "-D", str(self._data), "-m", mode, "-w", "stop"
        )

    async def _break(self) -> None:
        await self._stop("immediate")

    async def _mend(self) -> None:
        await self._start()

    async def drop(self) -> None:
        try:
            await self._stop("fast")
        finally:
            shutil.rmtree(self._root, ignore_errors=True)


FAULTS = [
    "sqlite-locked",
    "sqlite-disk-full",
    pytest.param("postgresql-read-only", marks=pytest.mark.postgres),
    pytest.param("postgresql-refusing", marks=pytest.mark.postgres),
    pytest.param("postgresql-restart", marks=pytest.mark.postgres),
]


@asynccontextmanager
async def prepared(name: str, directory: Path) -> AsyncIterator[Fault]:
    """The fault ``name`` with its database created (in ``directory`` for SQLite), removed
    at the end."""
    if name == "sqlite-locked":
        yield SqliteLocked(directory)
    elif name == "sqlite-disk-full":
        disk = SqliteDiskFull(directory / "disk")
        disk.mount()
        try:
            yield disk
        finally:
            disk.unmount()
    elif name == "postgresql-restart":
        cluster = PostgresCluster()
        try:
            await cluster.create()
            yield cluster
        finally:
            await cluster.drop()
    else:
        switched = {
            "postgresql-read-only": PostgresSwitched(
                "SET default_transaction_read_only = on", "RESET default_transaction_read_only"
            ),
            "postgresql-refusing": PostgresSwitched(
                "WITH ALLOW_CONNECTIONS false", "WITH ALLOW_CONNECTIONS true"
            ),
        }[name]
        try:
            await switched.create()
        except Exception as exc:
            _unavailable(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}")
        try:
            yield switched
        finally:
            await switched.drop()
