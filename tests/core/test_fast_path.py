"""The SQLite writer's fast path (:func:`registry.store.writes.driver_plan`) is taken.

It relies on SQLAlchemy compiler internals (``positiontup``, ``escaped_bind_names``), which is
why pyproject pins SQLAlchemy to the range tested here. Should they change, the writer would
fall back to SQLAlchemy's executemany without a word: these tests fail instead.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import event

from registry import ClientType, Registry
from registry.store.writes import ROWS, Op, driver_plan, statement


def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"


async def test_every_operation_has_a_driver_plan_over_its_row_shape(tmp_path: Path) -> None:
    """Each operation's statement binds only keys of its row shape, and compiles to a plan."""
    async with Registry(_sqlite_url(tmp_path)) as registry:
        dialect = registry.engine.dialect
        for op in Op:
            keys = tuple(ROWS[op].__annotations__)
            compiled = statement(op, dialect.name).compile(
                dialect=dialect, column_keys=list(keys), for_executemany=True
            )
            assert set(compiled.binds) <= set(keys), op
            assert driver_plan(dialect, statement(op, dialect.name), keys) is not None, op


async def test_the_writer_commits_every_kind_through_the_driver(tmp_path: Path) -> None:
    """A workload that journals every kind of row but the beat commits without one statement
    compiled by SQLAlchemy: all of it went through the driver plans."""
    compiled: list[str] = []
    driver: list[str] = []

    def seen(
        conn: Any, cursor: Any, sql: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE")):
            (driver if context.compiled is None else compiled).append(sql)

    async with Registry(_sqlite_url(tmp_path), heartbeat_interval=60.0) as registry:
        event.listen(registry.engine.sync_engine, "before_cursor_execute", seen)
        try:
            registry.add_client("c", "linux", object(), ClientType.CONSTELLATION, {"a": 1})
            registry.add_client("d", "linux", object(), ClientType.DEVICE, {"b": [1]})
            registry.set_device_info("d", {"os": "linux", "at": str(datetime.now(UTC))})
            registry.add_constellation_session("c", "s1")
            registry.add_device_session("d", "s1")
            registry.remove_session("s1", reason="done")
            registry.remove_client("d", code=1000, reason="client_closed")
            await registry.flush()
        finally:
            event.remove(registry.engine.sync_engine, "before_cursor_execute", seen)
    assert compiled == []
    assert len(driver) >= len(Op) - 1  # every kind but the heartbeat, at least once
