"""Which session states a caller may leave and re-enter (library API, SQLite and PostgreSQL).

A session is live while ``active`` or ``interrupted``; ``completed``, ``failed`` and
``cancelled`` are final. A finished session id is spent: opening it again is refused
(:class:`SessionFinishedError`) and its record is never rewritten, also after a restart, when
the session is only in the store. ``interrupted`` is what the registry sets when its run stops
with the session active: the owner may re-open (resume) it or end it, but no caller ends a
session ``interrupted``.
"""

from __future__ import annotations

from typing import Any

import pytest

from registry import (
    ClientType,
    InvalidArgumentError,
    Registry,
    SessionFinishedError,
    SessionOwnershipError,
    SessionState,
)
from tests.support import sql

FINAL = ("completed", "failed", "cancelled")


async def _row(database_url: str, session_id: str) -> tuple[Any, ...]:
    rows = await sql(
        database_url,
        "SELECT owner_id, executor_id, task_name, state, created_at, ended_at, end_reason "
        "FROM sessions WHERE session_id = :s",
        s=session_id,
    )
    assert len(rows) == 1, rows
    return tuple(rows[0])


async def _opened(database_url: str, session_id: str) -> int:
    rows = await sql(
        database_url,
        "SELECT count(*) FROM audit_events WHERE kind = 'session_opened' AND session_id = :s",
        s=session_id,
    )
    return int(rows[0][0])


# -- a finished session id is spent --------------------------------------------------------------


@pytest.mark.parametrize("state", FINAL)
async def test_the_owner_cannot_reopen_a_finished_session(
    registry: Registry, database_url: str, state: str
) -> None:
    await registry.open_session("run", owner_id="c1", executor_id="d1", task_name="first")
    await registry.end_session("run", state, "run 1 ended")
    before = await _row(database_url, "run")

    with pytest.raises(SessionFinishedError) as caught:
        await registry.open_session("run", owner_id="c1", executor_id="d2", task_name="second")
    assert (caught.value.session_id, caught.value.state) == ("run", state)
    assert f"'run' has already ended ({state})" in str(caught.value)

    # Nothing changed: not in memory, not in the maps, not in the store, not in the audit trail.
    await registry.flush()
    assert registry.get_session("run") is None
    assert registry.get_device_sessions("d2") == set()
    assert registry.get_constellation_sessions("c1") == set()
    assert registry.session_counts() == {}
    assert await _row(database_url, "run") == before
    assert before[2:4] == ("first", state)
    assert await _opened(database_url, "run") == 1


async def test_ownership_is_checked_before_the_end(registry: Registry) -> None:
    """Another client learns only that the id is not its own, not how the session ended."""
    await registry.open_session("mine", owner_id="c1", executor_id="d1")
    await registry.end_session("mine", "failed", "boom")
    with pytest.raises(SessionOwnershipError):
        await registry.open_session("mine", owner_id="c2", executor_id="d1")


async def test_a_finished_session_stays_spent_after_a_restart(database_url: str) -> None:
    async with Registry(database_url) as reg:
        await reg.open_session("old", owner_id="c1", executor_id="d1", task_name="t1")
        await reg.end_session("old", "completed")
    before = await _row(database_url, "old")
    async with Registry(database_url) as reg:
        with pytest.raises(SessionFinishedError) as caught:
            await reg.open_session("old", owner_id="c1", executor_id="d1", task_name="t2")
        assert caught.value.state == "completed"
        assert reg.get_session("old") is None
    assert await _row(database_url, "old") == before
    assert await _opened(database_url, "old") == 1


async def test_an_active_or_interrupted_session_may_be_reopened_by_its_owner(
    database_url: str,
) -> None:
    async with Registry(database_url) as reg:
        first = await reg.open_session("live", owner_id="c1", executor_id="d1", task_name="t")
        again = await reg.open_session("live", owner_id="c1", executor_id="d1", task_name="t")
        assert again.created_at == first.created_at
        assert again.state is SessionState.ACTIVE
    async with Registry(database_url) as reg:  # closing interrupted it
        (interrupted,) = reg.get_interrupted_sessions("c1")
        assert interrupted.session_id == "live"
        resumed = await reg.open_session("live", owner_id="c1", executor_id="d1", task_name="t")
        assert resumed.state is SessionState.ACTIVE
        assert resumed.created_at == first.created_at
        await reg.end_session("live", "completed")
    assert (await _row(database_url, "live"))[3] == "completed"


# -- interrupted: set by the registry, ended by the owner ----------------------------------------


async def test_no_caller_ends_a_session_interrupted(registry: Registry, database_url: str) -> None:
    await registry.open_session("s1", owner_id="c1", executor_id="d1")
    registry.add_device_session("d1", "s2")
    for state in ("interrupted", SessionState.INTERRUPTED, "active"):
        with pytest.raises(InvalidArgumentError) as caught:
            registry.remove_session("s2", state=state)
        assert caught.value.argument == "state"
    with pytest.raises(InvalidArgumentError) as caught:
        await registry.end_session("s1", "interrupted", "stopping")
    assert caught.value.argument == "state"
    assert "interrupted" in str(caught.value)
    # Both sessions are as they were.
    assert registry.session_counts() == {SessionState.ACTIVE: 2}
    assert registry.get_device_sessions("d1") == {"s1", "s2"}
    await registry.flush()
    rows = await sql(database_url, "SELECT session_id, state FROM sessions ORDER BY session_id")
    assert [tuple(row) for row in rows] == [("s1", "active"), ("s2", "active")]


async def test_an_interrupted_session_ends_when_its_owner_ends_it(database_url: str) -> None:
    async with Registry(database_url) as reg:
        reg.add_client("c1", "linux", object(), ClientType.CONSTELLATION)
        await reg.open_session("s1", owner_id="c1", executor_id="d1")
    async with Registry(database_url) as reg:
        assert reg.session_counts() == {SessionState.INTERRUPTED: 1}
        assert [s.session_id for s in reg.get_interrupted_sessions("c1")] == ["s1"]
        await reg.end_session("s1", "failed", "server restarted")
        assert reg.get_session("s1") is None
        assert reg.get_interrupted_sessions("c1") == []
        assert reg.session_counts() == {}
        assert reg.get_device_sessions("d1") == set()
    row = await _row(database_url, "s1")
    assert (row[3], row[6]) == ("failed", "server restarted")


async def test_an_interrupted_session_left_without_links_ends_cancelled(database_url: str) -> None:
    """Its owner could never learn of it again (it is reached through its links): it ends."""
    async with Registry(database_url) as reg:
        await reg.open_session("s1", owner_id="c1", executor_id="d1")
    async with Registry(database_url) as reg:
        reg.remove_constellation_sessions("c1")
        assert reg.get_session("s1") is not None  # still linked to d1
        reg.remove_device_sessions("d1")
        assert reg.get_session("s1") is None
        assert reg.session_counts() == {}
        await reg.flush()
    row = await _row(database_url, "s1")
    assert (row[3], row[6]) == ("cancelled", "unlinked")
    assert row[5] is not None
