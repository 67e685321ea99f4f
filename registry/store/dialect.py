"""Everything that differs between SQLite and PostgreSQL: engine set-up, pragmas, upserts,
epoch arithmetic. The rest of the store is dialect-neutral SQLAlchemy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import ColumnCollection, ColumnElement, Float, Table, event, func, make_url
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql.dml import Insert

from registry.errors import InvalidArgumentError

DEFAULT_URL = "sqlite+aiosqlite:///registry.db"
SQLITE_BUSY_TIMEOUT_MS = 5000
SQLITE_AUTOCHECKPOINT_PAGES = 1000  # SQLite's default


def parse_url(url: str | URL) -> URL:
    """Parse and check a database URL; only SQLite (aiosqlite) and PostgreSQL are supported."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise InvalidArgumentError("database_url", f"cannot parse {url!r}: {exc}") from exc
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise InvalidArgumentError(
            "database_url", f"unsupported backend {parsed.get_backend_name()!r}"
        )
    if parsed.get_backend_name() == "sqlite" and parsed.get_driver_name() != "aiosqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "asyncpg":
        parsed = parsed.set(drivername="postgresql+asyncpg")
    return parsed


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def create_engine(url: str | URL) -> AsyncEngine:
    """An async engine for ``url``. SQLite files get WAL, ``synchronous=NORMAL``, a busy timeout
    and enforced foreign keys on every connection."""
    parsed = parse_url(url)
    if not is_sqlite(parsed):
        return create_async_engine(parsed, pool_pre_ping=True)
    engine = create_async_engine(parsed)

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if parsed.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    return engine


def upsert(
    dialect_name: str,
    table: Table,
    key: Sequence[str],
    update: Callable[[ColumnCollection[str, Any]], dict[str, Any]],
) -> Insert:
    """``INSERT ... ON CONFLICT (key) DO UPDATE SET update(excluded)`` for the given dialect.

    ``update`` receives the proposed row's columns (``excluded``) and returns the SET clause.
    """
    stmt: Any = postgresql.insert(table) if dialect_name == "postgresql" else sqlite.insert(table)
    result: Insert = stmt.on_conflict_do_update(
        index_elements=list(key), set_=update(stmt.excluded)
    )
    return result


def epoch_seconds(dialect_name: str, column: Any) -> ColumnElement[float]:
    """Seconds since the Unix epoch of a timestamp column, as SQL."""
    if dialect_name == "postgresql":
        # date_part returns double precision; EXTRACT returns numeric, much slower to sum.
        return func.date_part("epoch", column, type_=Float)
    return (func.julianday(column) - 2440587.5) * 86400.0


def hour_start(dialect_name: str, column: Any) -> ColumnElement[Any]:
    """The start of the UTC hour holding a timestamp column, as SQL of the column's type.

    On SQLite the text is the format SQLAlchemy stores timestamps in, so it compares with and
    reads back as stored timestamps; PostgreSQL truncates in UTC whatever the session's zone.
    """
    if dialect_name == "postgresql":
        utc = func.timezone("UTC", column)
        return func.timezone("UTC", func.date_trunc("hour", utc), type_=column.type)
    return func.strftime("%Y-%m-%d %H:00:00.000000", column, type_=column.type)


def json_object(dialect_name: str, **fields: Any) -> ColumnElement[Any]:
    """A JSON object built in SQL from column expressions or literals."""
    args: list[Any] = []
    for key, value in fields.items():
        args.extend((key, value))
    if dialect_name == "postgresql":
        return func.jsonb_build_object(*args)
    return func.json(func.json_object(*args))


def least(dialect_name: str, *values: Any) -> ColumnElement[Any]:
    """The smallest of ``values`` (SQLite's scalar ``min``, PostgreSQL's ``least``)."""
    return func.least(*values) if dialect_name == "postgresql" else func.min(*values)


def greatest(dialect_name: str, *values: Any) -> ColumnElement[Any]:
    """The largest of ``values`` (SQLite's scalar ``max``, PostgreSQL's ``greatest``)."""
    return func.greatest(*values) if dialect_name == "postgresql" else func.max(*values)


@asynccontextmanager
async def checkpoint_deferred(connection: AsyncConnection) -> AsyncIterator[AsyncConnection]:
    """A transaction on ``connection`` whose commit does not checkpoint SQLite's WAL.

    A large transaction (start-up recovery) would otherwise copy the whole WAL back into the
    database inside its commit; deferred, the next commit of the writer task does it in the
    background. Other dialects just get the transaction.
    """
    sqlite_file = connection.dialect.name == "sqlite"
    if sqlite_file:
        await connection.exec_driver_sql("PRAGMA wal_autocheckpoint = 0")
        await connection.commit()
    try:
        async with connection.begin():
            yield connection
    finally:
        if sqlite_file:
            await connection.exec_driver_sql(
                f"PRAGMA wal_autocheckpoint = {SQLITE_AUTOCHECKPOINT_PAGES}"
            )
            await connection.commit()
