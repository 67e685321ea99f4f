"""Shared fixtures: every store test runs on a real SQLite file and on the real PostgreSQL.

PostgreSQL is reached at ``REGISTRY_TEST_POSTGRES_URL`` (default: the local server's ``test``
database); each test run creates its own database there and drops it at the end. Without a
reachable server the PostgreSQL variants skip with the reason, unless
``REGISTRY_TEST_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which makes that a failure.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import make_url

from registry import Registry
from tests.databases import POSTGRES_ADMIN_URL, REQUIRE_POSTGRES, admin, empty, migrate


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A migrated PostgreSQL database of this test run's own."""
    name = f"registry_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        asyncio.run(admin(POSTGRES_ADMIN_URL, f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        reason = f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}"
        if REQUIRE_POSTGRES:
            pytest.fail(reason)
        pytest.skip(reason)
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    asyncio.run(migrate(url))
    yield url
    asyncio.run(admin(POSTGRES_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty registry database: a fresh SQLite file, or the run's PostgreSQL database
    with every table emptied."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_url")
    asyncio.run(empty(url))
    return url


@pytest.fixture
async def registry(database_url: str) -> AsyncIterator[Registry]:
    """A started registry on ``database_url``, closed after the test."""
    reg = Registry(database_url, heartbeat_interval=0.2)
    await reg.start()
    try:
        yield reg
    finally:
        await reg.close()
