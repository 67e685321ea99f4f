"""Fixtures of the reliability suite: a real uvicorn server (``tests.server.conftest``) on a
fresh SQLite file, with settings overridable per module through ``server_settings``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import Clients, Server, running_server


@pytest.fixture
def server_settings() -> dict[str, Any]:
    """Settings overrides for the ``server`` fixture (override per module or test)."""
    return {}


@pytest.fixture
async def server(tmp_path: Path, server_settings: dict[str, Any]) -> AsyncIterator[Server]:
    async with running_server(
        f"sqlite+aiosqlite:///{tmp_path / 'reliability.db'}", **server_settings
    ) as running:
        yield running


@pytest.fixture
async def clients(server: Server) -> AsyncIterator[Clients]:
    opened = Clients(server)
    try:
        yield opened
    finally:
        await opened.aclose()
