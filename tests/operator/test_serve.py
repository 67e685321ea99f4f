"""``registry serve`` as an operator meets it, run as a real subprocess: the line that says where
it serves, the API key it keeps across restarts, a clean exit on SIGINT and SIGTERM, and one
line (no traceback) with the documented exit code when it cannot start."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import make_url

from tests.databases import POSTGRES_ADMIN_URL, admin
from tests.support import API_KEY, HOST, Serve, free_port

pytestmark = pytest.mark.timeout(120)

START = "registry serving "
EXIT_USAGE = 2
EXIT_STORE = 3
EXIT_CANNOT_SERVE = 4


def start_line(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith(START)]
    return line


async def exited(serve: Serve) -> int:
    """The exit code of a server expected to stop by itself (killed after 30 s)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(serve.process.wait), 30)
    finally:
        await serve.stop(signal.SIGKILL)


def assert_one_line_error(output: str, *needles: str) -> str:
    """The error line of a failed start: no traceback or usage text, and the one ``Error:``
    line holding every needle."""
    assert "Traceback" not in output, output
    assert "Usage:" not in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("Error: ")]
    for needle in needles:
        assert needle in line, (needle, output)
    return line


async def test_start_line_key_file_and_clean_stops(tmp_path: Path) -> None:
    """A SQLite server started without a key keeps a generated one beside its database: printed
    in full once, reused (and only its path printed) after a restart; SIGINT and SIGTERM both
    end it with exit code 0."""
    database = tmp_path / "registry.db"
    url = f"sqlite+aiosqlite:///{database}"
    key_file = tmp_path / "registry.db.key"
    port = free_port()

    first = Serve(url, port, tmp_path / "first.log", auth=())
    try:
        line = start_line(await first.printed(START))
        key = key_file.read_text().strip()
        first.api_key = key
        await first.ready()
        output = first.output()
    finally:
        code = await first.stop(signal.SIGINT)
    assert code == 0, first.output()
    assert "Aborted" not in first.output()
    assert "Traceback" not in first.output()

    assert f"serving http://{HOST}:{port} and ws://{HOST}:{port}/ws," in line, line
    assert f"database {url}" in line, line
    assert re.search(r", node [0-9a-f-]{36},", line), line
    assert f"API key in {key_file}" in line, line
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key) >= 32
    assert output.count(key) == 1, output  # printed in full once, when generated

    port = free_port()
    second = Serve(url, port, tmp_path / "second.log", auth=())
    try:
        line = start_line(await second.printed(START))
        second.api_key = key  # the same key: clients of the first run still get in
        await second.ready()
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as http:
            refused = await http.get("/api/health", headers={"X-API-Key": API_KEY})
            assert refused.status_code == 401
    finally:
        code = await second.stop(signal.SIGTERM)
    assert code == 0, second.output()
    assert key not in second.output()
    assert f"API key in {key_file}" in line
    assert key_file.read_text().strip() == key


@pytest.mark.postgres
async def test_key_choices(tmp_path: Path, postgres_url: str) -> None:
    """PostgreSQL has no database file to keep a key beside: serving it needs a key, a key file
    or --no-auth (exit code 2 otherwise); a key file is created owner-only where named, and
    an empty one is refused (exit code 4) rather than served with."""
    refused = Serve(postgres_url, free_port(), tmp_path / "refused.log", auth=())
    assert await exited(refused) == EXIT_USAGE
    assert_one_line_error(refused.output(), "--api-key", "--api-key-file", "--no-auth")

    empty = tmp_path / "empty.key"
    empty.touch(mode=0o600)
    blank = Serve(
        postgres_url, free_port(), tmp_path / "blank.log", auth=("--api-key-file", str(empty))
    )
    assert await exited(blank) == EXIT_CANNOT_SERVE
    assert_one_line_error(blank.output(), str(empty))

    key_file = tmp_path / "keys" / "registry.key"
    key_file.parent.mkdir()
    port = free_port()
    serve = Serve(
        postgres_url, port, tmp_path / "serve.log", auth=("--api-key-file", str(key_file))
    )
    try:
        line = start_line(await serve.printed(START))
        serve.api_key = key_file.read_text().strip()
        await serve.ready()
    finally:
        code = await serve.stop(signal.SIGTERM)
    assert code == 0, serve.output()
    assert f"API key in {key_file}" in line
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    password = make_url(postgres_url).password
    assert password is None or password not in line


async def test_given_key_and_no_auth_say_so(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    for api_key, where in ((API_KEY, "API key from --api-key"), (None, "no API key (--no-auth)")):
        serve = Serve(url, free_port(), tmp_path / "serve.log", api_key=api_key)
        try:
            line = start_line(await serve.printed(START))
            await serve.ready()
        finally:
            assert await serve.stop(signal.SIGTERM) == 0, serve.output()
        assert where in line, line
        (tmp_path / "serve.log").unlink()
    assert not (tmp_path / "registry.db.key").exists()


@pytest.fixture
async def empty_postgres() -> AsyncIterator[str]:
    """A PostgreSQL database with no schema at all."""
    name = f"registry_empty_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    await admin(POSTGRES_ADMIN_URL, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin(POSTGRES_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
async def test_schema_behind_is_one_line_then_auto_migrate(
    tmp_path: Path, empty_postgres: str
) -> None:
    behind = Serve(empty_postgres, free_port(), tmp_path / "behind.log")
    assert await exited(behind) == EXIT_STORE
    assert_one_line_error(
        behind.output(), "registry db upgrade", "--auto-migrate", "REGISTRY_AUTO_MIGRATE=true"
    )

    serve = Serve(empty_postgres, free_port(), tmp_path / "serve.log", options=["--auto-migrate"])
    try:
        await serve.ready()
    finally:
        assert await serve.stop(signal.SIGTERM) == 0, serve.output()


async def test_sqlite_schema_behind_without_auto_migrate(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    url = f"sqlite+aiosqlite:///{empty}"
    behind = Serve(url, free_port(), tmp_path / "behind.log", options=["--no-auto-migrate"])
    assert await exited(behind) == EXIT_STORE
    assert_one_line_error(behind.output(), "registry db upgrade", "--auto-migrate")


async def test_address_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
        serve = Serve(url, port, tmp_path / "serve.log")
        assert await exited(serve) == EXIT_CANNOT_SERVE
    assert_one_line_error(serve.output(), f"{HOST}:{port}")
