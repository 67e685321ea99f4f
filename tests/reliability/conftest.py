"""Fixtures of the reliability suite: a real uvicorn server (``tests.support``) on a fresh SQLite
file, with settings overridable per module through ``server_settings``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import clients, server, server_settings  # noqa: F401 (fixtures)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """The database the ``server`` fixture uses."""
    return f"sqlite+aiosqlite:///{tmp_path / 'reliability.db'}"
