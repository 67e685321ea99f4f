"""The plain SQL queries of README.md ("Asking questions after the fact"), run as printed on
both backends against a database filled by a real server run."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from registry import History
from registry.store.dialect import create_engine
from tests.operator.conftest import DEVICE_DISCONNECTED, Fleet, is_sqlite, now
from tests.support import sql

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).resolve().parents[2] / "README.md"
QUERY = re.compile(r"<!-- sql:(?P<name>[\w-]+) -->\s*```sql\n(?P<body>.*?)```", re.DOTALL)


def readme_queries() -> dict[str, str]:
    """Each marked query without its ``--`` comment lines: SQLAlchemy's text() would take the
    ``(:at)`` in a comment for a bind parameter (and SQLite then counts one ``?`` too many)."""
    return {
        match["name"]: "\n".join(
            line for line in match["body"].splitlines() if not line.lstrip().startswith("--")
        )
        for match in QUERY.finditer(README.read_text())
    }


def bind(database_url: str, value: datetime) -> Any:
    """A time as README says to bind it: text on SQLite, an aware datetime on PostgreSQL."""
    if is_sqlite(database_url):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def as_time(value: Any) -> datetime:
    """A timestamp read back by plain SQL (text on SQLite) as an aware datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def run(fleet: Fleet, name: str, **params: datetime) -> list[Any]:
    url = fleet.database_url
    return await sql(url, readme_queries()[name], **{k: bind(url, v) for k, v in params.items()})


def test_readme_has_the_four_queries() -> None:
    queries = readme_queries()
    assert list(queries) == ["online-at", "connections-per-day", "bad-sessions", "info-changed"]
    assert ":at" in queries["online-at"]
    assert ":since" in queries["info-changed"]


async def test_online_at(fleet: Fleet) -> None:
    marks = fleet.marks
    live = await run(fleet, "online-at", at=now())
    assert [row.client_id for row in live] == ["const-1", "dev-lin", "dev-win"]
    assert all(row.disconnected_at is None for row in live)
    await fleet.stop()

    expected = {
        "start": [],
        "two_devices": ["dev-lin", "dev-win"],
        "gone_online": ["dev-gone", "dev-lin", "dev-win"],
        "gone_offline": ["dev-lin", "dev-win"],
        "const_online": ["const-1", "dev-lin", "dev-win"],
        "all_online": ["const-1", "dev-gone", "dev-lin", "dev-win"],
        "after_b": ["const-1", "dev-gone", "dev-lin", "dev-win"],
        "gone_failed": ["const-1", "dev-lin", "dev-win"],
        "end": ["const-1", "dev-lin", "dev-win"],
    }
    for mark, clients in expected.items():
        rows = await run(fleet, "online-at", at=marks[mark])
        assert [row.client_id for row in rows] == clients, mark
    rows = await run(fleet, "online-at", at=marks["two_devices"])
    assert [(row.client_type, row.platform) for row in rows] == [
        ("device", "linux"),
        ("device", "Windows"),
    ]
    # Closed by the shutdown since, with a time after that instant.
    assert all(as_time(row.disconnected_at) > marks["end"] for row in rows)
    assert await run(fleet, "online-at", at=now()) == []


async def test_connections_per_day(fleet: Fleet) -> None:
    await fleet.stop()
    engine = create_engine(fleet.database_url)
    try:
        history = History(engine)
        expected: dict[tuple[str, str], int] = {}
        for client_id in ("dev-win", "dev-lin", "dev-gone", "const-1"):
            for record in (await history.connections(client_id)).items:
                key = (client_id, record.connected_at.date().isoformat())
                expected[key] = expected.get(key, 0) + 1
    finally:
        await engine.dispose()
    rows = await run(fleet, "connections-per-day")
    answer = {(row.client_id, str(row.day)): row.connections for row in rows}
    assert answer == expected
    assert sum(answer.values()) == 5
    assert sum(count for (client, _), count in answer.items() if client == "dev-gone") == 2
    assert [(str(row.day), row.client_id) for row in rows] == sorted(
        (str(row.day), row.client_id) for row in rows
    )


async def test_bad_sessions(fleet: Fleet) -> None:
    await fleet.stop()  # the session left running is interrupted by the shutdown
    rows = await run(fleet, "bad-sessions")
    assert [tuple(row) for row in rows] == [
        ("task-c@1", "failed", DEVICE_DISCONNECTED, "const-1", "dev-gone"),
        ("task-d@1", "interrupted", "server_shutdown", "const-1", "dev-lin"),
    ]


async def test_info_changed(fleet: Fleet) -> None:
    marks = fleet.marks
    await fleet.stop()
    engine = create_engine(fleet.database_url)
    try:
        history = History(engine)
        latest = {
            device: snapshot.captured_at
            for device in ("dev-win", "dev-lin", "dev-gone")
            if (snapshot := await history.latest_device_info(device)) is not None
        }
    finally:
        await engine.dispose()
    rows = await run(fleet, "info-changed", since=marks["start"])
    assert [(row.device_id, row.snapshots) for row in rows] == [
        ("dev-gone", 2),
        ("dev-lin", 1),
        ("dev-win", 1),
    ]
    for row in rows:
        assert as_time(row.last_change) == latest[row.device_id]
    rows = await run(fleet, "info-changed", since=marks["gone_offline"])
    assert [(row.device_id, row.snapshots) for row in rows] == [("dev-gone", 1)]
    assert as_time(rows[0].last_change) == latest["dev-gone"]
    assert await run(fleet, "info-changed", since=marks["end"]) == []
    a_week_ago = await run(fleet, "info-changed", since=now() - timedelta(days=7))
    assert len(a_week_ago) == 3
