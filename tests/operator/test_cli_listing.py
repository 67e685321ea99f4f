"""The listing commands page through everything in the store, filter in SQL, and say when there
is more; a command about one client says when that client was never seen. Each runs as a
subprocess on a database a running registry keeps filling (SQLite file and PostgreSQL)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from registry import ClientType, Registry
from registry.store import schema
from tests.operator.conftest import Outcome, cli

pytestmark = pytest.mark.timeout(120)

LINUX_DEVICES = 1100
WINDOWS_DEVICES = 150
CONSTELLATIONS = 50


def ok(outcome: Outcome) -> Outcome:
    assert outcome.code == 0, outcome
    return outcome


async def every_page(*args: str) -> list[dict[str, Any]]:
    """Every item of a ``--json`` listing, following ``next_cursor``."""
    items: list[dict[str, Any]] = []
    cursor: tuple[str, ...] = ()
    while True:
        page = ok(await cli(*args, "--json", *cursor)).json()
        items.extend(page["items"])
        if page["next_cursor"] is None:
            return items
        cursor = ("--cursor", page["next_cursor"])


async def test_clients_above_a_thousand_filtered_in_sql(registry: Registry) -> None:
    """The Windows devices connected after 1,100 Linux ones are all found, and every online
    client is listed exactly once across pages."""
    for n in range(LINUX_DEVICES):
        registry.add_client(f"lin-{n:04}", "linux", object(), ClientType.DEVICE)
    for n in range(WINDOWS_DEVICES):
        registry.add_client(f"win-{n:03}", "Windows", object(), ClientType.DEVICE)
    for n in range(CONSTELLATIONS):
        registry.add_client(f"const-{n:02}", "linux", object(), ClientType.CONSTELLATION)
    await registry.flush()
    url = ("--database-url", registry.database_url)

    windows, constellations, table = await asyncio.gather(
        cli(
            "clients",
            "--platform",
            "WINDOWS",
            "--type",
            "device",
            "--limit",
            "1000",
            "--json",
            *url,
        ),
        cli("clients", "--type", "constellation", "--json", *url),
        cli("clients", *url),
    )
    page = ok(windows).json()
    assert sorted(row["client_id"] for row in page["items"]) == [
        f"win-{n:03}" for n in range(WINDOWS_DEVICES)
    ]
    assert page["next_cursor"] is None
    page = ok(constellations).json()
    assert len(page["items"]) == CONSTELLATIONS  # exactly one default page: nothing more
    assert page["next_cursor"] is None

    # The table shows the first page and says, on stderr, how to get the next.
    listing = ok(table)
    assert len(listing.stdout.splitlines()) == 2 + 50  # header, rule, the default page
    assert "more: run again with --cursor " in listing.stderr, listing

    everyone = await every_page("clients", "--limit", "1000", *url)
    ids = [row["client_id"] for row in everyone]
    assert len(ids) == len(set(ids)) == LINUX_DEVICES + WINDOWS_DEVICES + CONSTELLATIONS
    linux = await every_page("clients", "--platform", "Linux", "--limit", "400", *url)
    assert len(linux) == LINUX_DEVICES + CONSTELLATIONS


async def test_history_sessions_and_audit_page_with_cursor(registry: Registry) -> None:
    for n in range(3):
        registry.add_client("dev-1", "linux", object(), ClientType.DEVICE)
        await registry.open_session(f"s-{n}", owner_id="dev-1", executor_id="dev-1")
        registry.remove_client("dev-1", reason=f"bye {n}")
    await registry.flush()
    url = ("--database-url", registry.database_url)

    history = await every_page("history", "dev-1", "--limit", "1", *url)
    assert [row["close_reason"] for row in history] == ["bye 2", "bye 1", "bye 0"]
    sessions = await every_page("sessions", "--client", "dev-1", "--limit", "2", *url)
    assert [row["session_id"] for row in sessions] == ["s-2", "s-1", "s-0"]
    audit = await every_page("audit", "--client", "dev-1", "--limit", "3", *url)
    assert len(audit) == len({row["event_id"] for row in audit}) >= 6

    table = ok(await cli("history", "dev-1", "--limit", "2", *url))
    assert "bye 2" in table.stdout
    assert "bye 0" not in table.stdout
    assert "--cursor" in table.stderr, table
    last = ok(await cli("history", "dev-1", "--limit", "3", *url))
    assert "--cursor" not in last.stderr, last


async def test_history_of_a_client_never_seen_is_exit_code_1(registry: Registry) -> None:
    registry.add_client("dev-1", "linux", object(), ClientType.DEVICE)
    await registry.flush()
    url = ("--database-url", registry.database_url)
    never, never_json, quiet_window = await asyncio.gather(
        cli("history", "NEVER_SEEN", *url),
        cli("history", "NEVER_SEEN", "--json", *url),
        cli("history", "dev-1", "--until", "2000-01-01", *url),
    )
    for outcome in (never, never_json):
        assert outcome.code == 1, outcome
        assert "NEVER_SEEN" in outcome.stderr, outcome
        assert outcome.stdout == "", outcome
    # A client that exists but has nothing in the window is an empty answer, not "not found".
    assert "no connections" in ok(quiet_window).stdout


async def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    database = tmp_path / "registry.db"
    url = ("--database-url", f"sqlite+aiosqlite:///{database}")
    outcomes = await asyncio.gather(
        cli("db", "current", *url),
        cli("db", "check", *url),
        cli("clients", *url),
        cli("history", "dev-1", *url),
        cli("stats", *url),
    )
    for outcome in outcomes:
        assert outcome.code == 3, outcome
        assert outcome.stderr.strip() == f"Error: no registry database at {database}", outcome
    assert not database.exists()
    # Upgrading is the command that creates it.
    ok(await cli("db", "upgrade", *url))
    assert schema.HEAD in ok(await cli("db", "current", *url)).stdout
