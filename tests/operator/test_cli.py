"""The ``registry`` command line, run as a subprocess against the database a real server run
filled; the reading commands must work while the server is down.

Exit codes: 0 ok, 1 not found, 2 bad usage, 3 database unavailable or schema mismatch.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from registry.store.schema import HEAD
from tests.operator.conftest import GONE_INFO_2, Fleet, Outcome, cli, is_sqlite
from tests.support import sql

pytestmark = pytest.mark.timeout(90)

UNREACHABLE = "postgresql+asyncpg://postgres@127.0.0.1:1/x"


def ok(outcome: Outcome) -> Outcome:
    assert outcome.code == 0, outcome
    return outcome


async def test_reading_commands_while_the_server_is_up_and_down(fleet: Fleet) -> None:
    url = ("--database-url", fleet.database_url)
    live_json, live_table, windows = await asyncio.gather(
        cli("clients", "--json", *url),
        cli("clients", *url),
        cli("clients", "--platform", "WINDOWS", "--type", "device", "--json", *url),
    )
    rows = ok(live_json).json()["items"]
    assert sorted(row["client_id"] for row in rows) == ["const-1", "dev-lin", "dev-win"]
    assert {row["node_id"] for row in rows} == {fleet.registry.node_id}
    assert all(row["disconnected_at"] is None for row in rows)
    for client_id in ("const-1", "dev-lin", "dev-win"):
        assert client_id in ok(live_table).stdout
    assert [row["client_id"] for row in ok(windows).json()["items"]] == ["dev-win"]

    await fleet.stop()
    (
        clients,
        client_table,
        client_json,
        history_json,
        failed_json,
        sessions_table,
        audit_json,
        stats_json,
        stats_table,
        never_seen,
    ) = await asyncio.gather(
        cli("clients", *url),
        cli("client", "dev-gone", *url),
        cli("client", "dev-gone", "--json", *url),
        cli("history", "dev-gone", "--json", *url),
        cli("sessions", "--state", "failed", "--json", *url),
        cli("sessions", *url),
        cli("audit", "--client", "dev-gone", "--limit", "1000", "--json", *url),
        cli("stats", "--json", *url),
        cli("stats", *url),
        cli("client", "NEVER_SEEN", *url),
    )
    assert ok(clients).stdout.strip() == "no clients online"

    table = ok(client_table).stdout
    assert "dev-gone" in table
    fields = {
        line.split(None, 1)[0]: line.split(None, 1)[1].strip()
        for line in table.splitlines()[2:]
        if len(line.split(None, 1)) == 2
    }
    assert fields["connections"] == "2"
    assert fields["online"] == "no"

    summary = ok(client_json).json()
    assert summary["client_id"] == "dev-gone"
    assert summary["connection_count"] == 2
    assert summary["online"] is False
    assert summary["metadata"]["system_info"] == GONE_INFO_2

    history = ok(history_json).json()
    assert [(c["close_code"], c["close_reason"]) for c in history["items"]] == [
        (1001, "leaving"),
        (1000, "bye"),
    ]
    assert all(c["duration_seconds"] > 0 for c in history["items"])
    assert history["next_cursor"] is None

    assert [s["session_id"] for s in ok(failed_json).json()["items"]] == ["task-c@1"]
    listing = ok(sessions_table).stdout
    for text in ("task-a@1", "task-b@1", "task-c@1", "task-d@1", "interrupted", "failed"):
        assert text in listing

    events = ok(audit_json).json()["items"]
    assert {e["client_id"] for e in events} == {"dev-gone"}
    ids = [e["event_id"] for e in events]
    assert ids == sorted(ids, reverse=True)  # newest first
    assert [e["kind"] for e in events].count("client_registered") == 2

    stats = ok(stats_json).json()
    assert stats["online_by_type"] == {"device": 0, "constellation": 0}
    assert stats["connections"] == 5
    assert stats["distinct_clients"] == 4
    assert stats["sessions_by_state"] == {"completed": 2, "failed": 1, "interrupted": 1}
    assert stats["disconnects_by_reason"] == {"bye": 1, "leaving": 1, "server_shutdown": 3}
    assert 0 < stats["availability"]["dev-win"] <= 1
    assert "sessions interrupted" in ok(stats_table).stdout

    assert never_seen.code == 1, never_seen
    assert "NEVER_SEEN" in never_seen.stderr
    assert never_seen.stdout == ""


async def test_db_commands_on_both_backends(database_url: str) -> None:
    url = ("--database-url", database_url)
    if is_sqlite(database_url):  # a fresh file: nothing there yet
        behind = await cli("db", "check", *url)
        assert behind.code == 3, behind
    ok(await cli("db", "upgrade", *url))
    current, check, clients, inverted = await asyncio.gather(
        cli("db", "current", *url),
        cli("db", "check", *url),
        cli("clients", *url),
        cli("stats", "--since", "2026-01-02", "--until", "2026-01-01", *url),
    )
    assert HEAD in ok(current).stdout
    ok(check)
    assert ok(clients).stdout.strip() == "no clients online"
    assert inverted.code == 2, inverted
    assert "since" in inverted.stderr
    (version,) = await sql(database_url, "SELECT version_num FROM alembic_version")
    assert version[0] == HEAD
    assert await sql(database_url, "SELECT count(*) FROM connections") == [(0,)]


async def test_bad_usage_is_exit_code_2(tmp_path: Path) -> None:
    url = ("--database-url", f"sqlite+aiosqlite:///{tmp_path / 'never-created.db'}")
    outcomes = await asyncio.gather(
        cli("prune", "--older-than", "banana", *url),
        cli("history", "x", "--limit", "0", *url),
        cli("sessions", "--state", "bogus", *url),
        cli("history", "x", "--since", "not-a-time", *url),
    )
    for outcome in outcomes:
        assert outcome.code == 2, outcome
        assert "Error" in outcome.stderr, outcome
    assert "banana" in outcomes[0].stderr
    assert not (tmp_path / "never-created.db").exists()  # refused before touching it


async def test_store_unavailable_or_behind_is_exit_code_3(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    behind = ("--database-url", f"sqlite+aiosqlite:///{empty}")
    gone = ("--database-url", UNREACHABLE)
    nowhere = ("--database-url", f"sqlite+aiosqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    unreachable = await asyncio.gather(
        cli("client", "dev-1", *gone),
        cli("prune", "--older-than", "90d", *gone),
        cli("db", "current", *gone),
        cli("clients", *nowhere),
    )
    for outcome in unreachable:
        assert outcome.code == 3, outcome
        assert outcome.stderr.startswith("Error: "), outcome
        assert "Traceback" not in outcome.stderr, outcome
    mismatched = await asyncio.gather(
        cli("clients", *behind),
        cli("prune", "--older-than", "90d", *behind),
        cli("db", "check", *behind),
    )
    for outcome in mismatched:
        assert outcome.code == 3, outcome
        assert "Traceback" not in outcome.stderr, outcome
    assert "registry db upgrade" in mismatched[0].stderr
    # Neither the reading commands nor `db check` migrate (or write): still no table at all.
    assert await sql(f"sqlite+aiosqlite:///{empty}", "SELECT name FROM sqlite_master") == []
    # `db upgrade` does; then the same file reads fine.
    assert (await cli("db", "upgrade", *behind)).code == 0
    after = await cli("clients", *behind)
    assert after.code == 0, after
    assert after.stdout.strip() == "no clients online"
