"""Fixtures for the server tests: a real uvicorn server on a free loopback port, running in the
test's own event loop, and real WebSocket (``websockets``) and HTTP (``httpx``) clients (all in
``tests.support``).

``server`` runs on ``db_url``: a fresh SQLite file by default. Modules whose behaviour depends on
the store override ``db_url`` with the parametrised ``database_url`` (SQLite and PostgreSQL).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import clients, server, server_settings  # noqa: F401 (fixtures)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'server.db'}"


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """The database the ``server`` fixture uses (overridden per module for both backends)."""
    return sqlite_url
