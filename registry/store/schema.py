"""Bringing a database to the schema this version knows, through Alembic.

Start-up checks the revision with one query; Alembic's scripts are loaded only when the
database is not at :data:`HEAD` (so a normal start costs no script loading).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.errors import SchemaError

#: The newest revision in ``migrations/versions``; a test keeps it equal to Alembic's head.
HEAD = "0001"

_PACKAGE = Path(__file__).resolve().parent.parent


def migrations_dir() -> Path:
    """Where the Alembic scripts are: inside the installed package, or the source tree's."""
    for candidate in (_PACKAGE / "_migrations", _PACKAGE.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise SchemaError("the registry's migrations directory is missing from this installation")


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for the registry's scripts, optionally bound to ``url``."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def current_revision(connection: Connection) -> str | None:
    """The revision stamped in the database, ``None`` for an empty one."""
    return MigrationContext.configure(connection).get_current_revision()


def _ensure(connection: Connection, auto_migrate: bool) -> None:
    current = current_revision(connection)
    if current == HEAD:
        return
    config = alembic_config()
    script = ScriptDirectory.from_config(config)
    if current is not None and current not in {rev.revision for rev in script.walk_revisions()}:
        raise SchemaError(
            f"database schema revision {current!r} is unknown to this version of registry "
            f"(newest known: {HEAD!r}); upgrade registry or point it at another database"
        )
    if not auto_migrate:
        raise SchemaError(
            f"database schema is at {current or 'nothing (empty database)'}, this version needs "
            f"{HEAD!r}; run `registry db upgrade` (or enable auto-migration)"
        )
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def ensure_schema(engine: AsyncEngine, *, auto_migrate: bool) -> None:
    """Make sure the database is at :data:`HEAD`.

    Upgrades when ``auto_migrate`` is true; otherwise raises :class:`SchemaError` naming the
    command to run. A revision this version does not know is always refused.
    """
    async with engine.connect() as connection:
        await connection.run_sync(_ensure, auto_migrate)
        await connection.commit()
