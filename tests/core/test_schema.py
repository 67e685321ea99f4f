"""The schema: models and migrations agree, start-up checks the revision, timestamps are UTC.

Alembic's commands run this project's ``env.py``, which drives its own event loop, so the tests
that call them are synchronous. Migration round trips on PostgreSQL use a throwaway database of
their own, never the shared test database.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import insert, inspect, make_url, select
from sqlalchemy.exc import StatementError

from registry import ClientType, Registry, RegistryClosedError, SchemaError, SessionState
from registry.store import models
from registry.store.dialect import create_engine
from registry.store.models import Base, UTCDateTime
from registry.store.schema import HEAD, alembic_config
from tests.databases import admin, migrate
from tests.support import sql

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = {table.name for table in Base.metadata.sorted_tables}


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            names: list[str] = await connection.run_sync(
                lambda sync: inspect(sync).get_table_names()
            )
            return set(names)
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with nothing in it: a new SQLite file, or a throwaway PostgreSQL database
    (created next to the run's test database and dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    shared: str = request.getfixturevalue("postgres_url")
    name = f"registry_schema_{uuid.uuid4().hex[:10]}"
    run(admin(shared, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(shared).set(database=name).render_as_string(hide_password=False)
    finally:
        run(admin(shared, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- models and migrations agree ----------------------------------------------------------------


def test_head_constant_is_the_scripts_head() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [HEAD]
    assert script.get_current_head() == HEAD


def test_models_match_migrations(database_url: str) -> None:
    run(migrate(database_url))  # the SQLite file is new; PostgreSQL is migrated already
    command.check(alembic_config(database_url))  # raises if autogenerate would emit anything


def test_downgrade_to_base_and_upgrade_again(empty_database_url: str) -> None:
    config = alembic_config(empty_database_url)
    command.upgrade(config, "head")
    assert run(_tables(empty_database_url)) >= TABLES
    command.check(config)
    command.downgrade(config, "base")
    assert run(_tables(empty_database_url)) & TABLES == set()
    assert run(sql(empty_database_url, "SELECT version_num FROM alembic_version")) == []
    command.upgrade(config, "head")
    assert run(_tables(empty_database_url)) >= TABLES
    command.check(config)

    async def use() -> None:
        async with Registry(empty_database_url, auto_migrate=False) as reg:
            reg.add_client("d1", "linux", object(), ClientType.DEVICE)
            await reg.flush()
            page = await reg.history.connections("d1")
            assert len(page.items) == 1

    run(use())


def test_alembic_cli_upgrade_head(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    default_file = REPO_ROOT / "registry.db"
    existed = default_file.exists()
    environment = {**os.environ, "REGISTRY_DATABASE_URL": url}
    completed = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert run(sql(url, "SELECT version_num FROM alembic_version")) == [(HEAD,)]
    assert run(_tables(url)) >= TABLES
    current = subprocess.run(
        [sys.executable, "-m", "alembic", "current"],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert current.returncode == 0, current.stderr
    assert HEAD in current.stdout
    assert default_file.exists() == existed  # the URL came from the environment


# -- start-up refuses what it does not know -----------------------------------------------------


async def test_unknown_revision_is_refused(database_url: str) -> None:
    async with Registry(database_url, auto_migrate=True):
        pass  # migrated (a no-op on PostgreSQL)
    await sql(database_url, "UPDATE alembic_version SET version_num = 'ffff9999'")
    try:
        for auto_migrate in (False, True):
            reg = Registry(database_url, auto_migrate=auto_migrate)
            with pytest.raises(SchemaError, match="ffff9999") as caught:
                await reg.start()
            assert "unknown" in str(caught.value)
            with pytest.raises(RegistryClosedError):
                reg.add_client("d1", "linux", object(), ClientType.DEVICE)
        rows = await sql(database_url, "SELECT version_num FROM alembic_version")
        assert rows == [("ffff9999",)]  # not "fixed" behind the operator's back
        assert await sql(database_url, "SELECT count(*) FROM nodes") == [(1,)]
    finally:
        await sql(database_url, f"UPDATE alembic_version SET version_num = '{HEAD}'")


async def test_empty_database_without_auto_migrate_is_refused(empty_database_url: str) -> None:
    reg = Registry(empty_database_url, auto_migrate=False)
    with pytest.raises(SchemaError, match="registry db upgrade") as caught:
        await reg.start()
    assert HEAD in str(caught.value)
    assert await _tables(empty_database_url) & TABLES == set()
    # PostgreSQL (many nodes share it) does not migrate by default; SQLite does.
    default = Registry(empty_database_url)
    if empty_database_url.startswith("postgresql"):
        with pytest.raises(SchemaError, match="registry db upgrade"):
            await default.start()
        default = Registry(empty_database_url, auto_migrate=True)
    async with default:
        pass
    assert await _tables(empty_database_url) >= TABLES
    assert await sql(empty_database_url, "SELECT version_num FROM alembic_version") == [(HEAD,)]


# -- timestamps --------------------------------------------------------------------------------


def _assert_utc(value: datetime | None, around: datetime) -> None:
    assert value is not None
    assert value.tzinfo is not None
    assert value.utcoffset() == timedelta(0)
    assert abs(value - around) < timedelta(minutes=1)


async def test_timestamps_read_back_are_aware_utc(registry: Registry, database_url: str) -> None:
    now = datetime.now(UTC)
    registry.add_client("d1", "linux", object(), ClientType.DEVICE)
    registry.set_device_info("d1", {"a": 1})
    await registry.open_session("s1", owner_id="c1", executor_id="d1")
    await registry.end_session("s1", SessionState.COMPLETED)
    registry.remove_client("d1")
    await registry.flush()
    connection = (await registry.history.connections("d1")).items[0]
    _assert_utc(connection.connected_at, now)
    _assert_utc(connection.disconnected_at, now)
    session = (await registry.history.sessions("c1")).items[0]
    _assert_utc(session.created_at, now)
    _assert_utc(session.ended_at, now)
    _assert_utc((await registry.history.device_info("d1")).items[0].captured_at, now)
    for event in (await registry.history.audit()).items:
        _assert_utc(event.at, now)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as db:
            for table in (models.nodes, models.clients, models.session_links):
                for row in (await db.execute(select(table))).mappings():
                    for column in table.columns:
                        if isinstance(column.type, UTCDateTime) and row[column.name] is not None:
                            _assert_utc(row[column.name], now)
    finally:
        await engine.dispose()


def test_utc_datetime_refuses_naive_values() -> None:
    kind = UTCDateTime()
    dialect = create_engine("sqlite+aiosqlite:///:memory:").dialect
    with pytest.raises(ValueError, match="naive"):
        kind.process_bind_param(datetime(2024, 1, 1, 12, 0), dialect)
    plus_five = datetime(2024, 1, 1, 17, 0, tzinfo=timezone(timedelta(hours=5)))
    assert kind.process_bind_param(plus_five, dialect) == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert kind.process_result_value(datetime(2024, 1, 1, 12, 0), dialect) == datetime(
        2024, 1, 1, 12, 0, tzinfo=UTC
    )


async def test_naive_datetimes_never_reach_the_database(database_url: str) -> None:
    await migrate(database_url)
    row = {
        "node_id": str(uuid.uuid4()),
        "name": "n",
        "hostname": "h",
        "pid": 1,
        "started_at": datetime(2024, 1, 1, 12, 0),  # naive
        "heartbeat_at": datetime(2024, 1, 1, 12, 0, tzinfo=UTC),
    }
    engine = create_engine(database_url)
    try:
        async with engine.begin() as db:
            with pytest.raises(StatementError, match="naive"):
                await db.execute(insert(models.nodes).values(**row))
        # Aware values in any zone are stored as the same instant and read back in UTC.
        plus_five = datetime(2024, 1, 1, 17, 0, tzinfo=timezone(timedelta(hours=5)))
        async with engine.begin() as db:
            await db.execute(insert(models.nodes).values(**{**row, "started_at": plus_five}))
        async with engine.connect() as db:
            started = (
                await db.execute(
                    select(models.nodes.c.started_at).where(
                        models.nodes.c.node_id == row["node_id"]
                    )
                )
            ).scalar_one()
    finally:
        await engine.dispose()
    assert started == datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
    assert started.utcoffset() == timedelta(0)
