"""The PostgreSQL server the suites use, and what they do to databases outside the registry:
run administrative statements, migrate, empty.

PostgreSQL is reached at ``REGISTRY_TEST_POSTGRES_URL`` (default: the local server's ``test``
database). ``REGISTRY_TEST_REQUIRE_POSTGRES=1`` (set by ``.ci/run``) makes its absence a
failure instead of a skip.
"""

from __future__ import annotations

import os

from sqlalchemy import text

from registry.store.dialect import create_engine
from registry.store.models import Base
from registry.store.schema import ensure_schema

POSTGRES_ADMIN_URL = os.environ.get(
    "REGISTRY_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("REGISTRY_TEST_REQUIRE_POSTGRES") == "1"


async def admin(url: str, *statements: str) -> None:
    """Run ``statements`` on ``url`` outside a transaction (CREATE, DROP, ALTER DATABASE)."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def migrate(url: str) -> None:
    """Bring the database at ``url`` to the head revision."""
    engine = create_engine(url)
    try:
        await ensure_schema(engine, auto_migrate=True)
    finally:
        await engine.dispose()


async def empty(url: str) -> None:
    """Delete every row of every registry table of the PostgreSQL database at ``url``."""
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            names = ", ".join(table.name for table in Base.metadata.sorted_tables)
            await connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    finally:
        await engine.dispose()
