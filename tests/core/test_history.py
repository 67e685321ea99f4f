"""History and statistics queries: filters, windows, keyset paging, and argument checking.

Rows come from the registry itself and, where exact times are needed, from rows written
straight into the real database (the queries must not care who wrote them).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import insert, select

from registry import ClientType, InvalidArgumentError, Page, Registry, SessionState
from registry.audit import AuditKind
from registry.store import models, rollups
from registry.store.dialect import create_engine

T = TypeVar("T")
BASE = datetime(2020, 1, 1, tzinfo=UTC)


async def insert_rows(url: str, table: Any, rows: list[dict[str, Any]]) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            if table is models.clients:  # once per client id
                known = set(
                    (await connection.execute(select(models.clients.c.client_id))).scalars()
                )
                rows = [row for row in rows if row["client_id"] not in known]
            if rows:
                await connection.execute(insert(table), rows)
            if table is models.connections or table is models.sessions:
                # Written behind the registry's back: bring the rollups in line, as the
                # migration that adds them does.
                await connection.run_sync(rollups.rebuild)
    finally:
        await engine.dispose()


async def insert_connections(
    reg: Registry,
    url: str,
    client_id: str,
    spans: list[tuple[datetime, datetime | None]],
    *,
    client_type: str = "device",
    platform: str = "linux",
) -> list[str]:
    """Write connection rows with exact times for ``client_id``; returns their ids."""
    await insert_rows(
        url,
        models.clients,
        [
            {
                "client_id": client_id,
                "client_type": client_type,
                "platform": platform,
                "first_seen": BASE,
                "last_seen": BASE,
                "metadata": {},
            }
        ],
    )
    ids = [str(uuid.uuid4()) for _ in spans]
    await insert_rows(
        url,
        models.connections,
        [
            {
                "connection_id": connection_id,
                "client_id": client_id,
                "node_id": reg.node_id,
                "client_type": client_type,
                "platform": platform,
                "metadata": {},
                "remote_address": None,
                "connected_at": start,
                "disconnected_at": end,
                "close_code": None if end is None else 1000,
                "close_reason": None if end is None else "client_closed",
            }
            for connection_id, (start, end) in zip(ids, spans, strict=True)
        ],
    )
    return ids


async def collect(
    # ``...``: callers bind loop values as lambda defaults, which mypy cannot fit to one argument
    fetch: Callable[..., Awaitable[Page[T]]],
    *,
    between: Callable[[], Awaitable[None]] | None = None,
) -> list[list[T]]:
    """Every page of a query, calling ``between`` after each page but the last."""
    pages: list[list[T]] = []
    cursor: str | None = None
    while True:
        page = await fetch(cursor)
        pages.append(page.items)
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor
        if between is not None:
            await between()


def flat(pages: list[list[T]]) -> list[T]:
    return [item for page in pages for item in page]


# -- connections -------------------------------------------------------------------------------


async def test_connection_history_paging_never_overlaps_or_skips(
    registry: Registry, database_url: str
) -> None:
    # 12 connections one minute apart, and 4 more sharing one instant (ties on connected_at).
    spans: list[tuple[datetime, datetime | None]] = [
        (BASE + timedelta(minutes=i), BASE + timedelta(minutes=i, seconds=30)) for i in range(12)
    ]
    spans += [(BASE + timedelta(minutes=5, seconds=1), None)] * 4
    ids = await insert_connections(registry, database_url, "d1", spans)
    await insert_connections(registry, database_url, "other", [(BASE, None)])
    everything = (await registry.history.connections("d1", limit=1000)).items
    assert len(everything) == 16
    assert {record.connection_id for record in everything} == set(ids)
    keys = [(record.connected_at, record.connection_id) for record in everything]
    assert keys == sorted(keys, reverse=True)  # newest first, ties by id

    for limit in (1, 3, 4, 5, 16, 17):
        pages = await collect(
            lambda cursor, limit=limit: registry.history.connections(
                "d1", limit=limit, cursor=cursor
            )
        )
        assert [len(page) for page in pages[:-1]] == [limit] * (len(pages) - 1)
        assert flat(pages) == everything


async def test_connection_paging_with_rows_inserted_between_pages(
    registry: Registry, database_url: str
) -> None:
    spans: list[tuple[datetime, datetime | None]] = [
        (BASE + timedelta(minutes=10 * i), None) for i in range(10)
    ]
    original = set(await insert_connections(registry, database_url, "d1", spans))
    inserted: list[str] = []
    step = 0

    async def insert_more() -> None:
        # One row newer than everything (belongs before the cursor) and one older than
        # everything (belongs after it); also one from the live registry.
        nonlocal step
        step += 1
        newer = BASE + timedelta(days=1, minutes=step)
        older = BASE - timedelta(days=1, minutes=step)
        inserted.extend(
            await insert_connections(
                registry, database_url, f"late{step}", [(newer, None), (older, None)]
            )
        )
        registry.add_client(f"live{step}", "linux", object(), ClientType.DEVICE)
        await registry.flush()

    pages = await collect(
        lambda cursor: registry.history.connections("d1", limit=3, cursor=cursor),
        between=insert_more,
    )
    seen = [record.connection_id for record in flat(pages)]
    assert len(seen) == len(set(seen))  # no overlap
    assert set(seen) == original  # no skip; other clients' rows never leak in
    assert step == 3

    # The same with rows of the same client inserted meanwhile: older ones show up in later
    # pages (they sort after the cursor), newer ones do not, and none twice.
    late: list[str] = []

    async def insert_same_client() -> None:
        nonlocal step
        step += 1
        late.extend(
            await insert_connections(
                registry,
                database_url,
                "d1",
                [
                    (BASE + timedelta(days=2, minutes=step), None),
                    (BASE - timedelta(days=2, minutes=step), None),
                ],
            )
        )

    pages = await collect(
        lambda cursor: registry.history.connections("d1", limit=4, cursor=cursor),
        between=insert_same_client,
    )
    seen = [record.connection_id for record in flat(pages)]
    assert len(seen) == len(set(seen))
    older_late = set(late[1::2])
    newer_late = set(late[0::2])
    assert set(seen) == original | older_late
    assert not set(seen) & newer_late
    keys = [(r.connected_at, r.connection_id) for r in flat(pages)]
    assert keys == sorted(keys, reverse=True)


async def test_connection_history_time_window(registry: Registry, database_url: str) -> None:
    spans: list[tuple[datetime, datetime | None]] = [
        (BASE + timedelta(hours=i), BASE + timedelta(hours=i, minutes=5)) for i in range(8)
    ]
    await insert_connections(registry, database_url, "d1", spans)
    since, until = BASE + timedelta(hours=2), BASE + timedelta(hours=6)
    page = await registry.history.connections("d1", since=since, until=until)
    # [since, until): the row at since is in, the row at until is out.
    assert [r.connected_at for r in page.items] == [BASE + timedelta(hours=h) for h in (5, 4, 3, 2)]
    pages = await collect(
        lambda cursor: registry.history.connections(
            "d1", since=since, until=until, limit=3, cursor=cursor
        )
    )
    assert flat(pages) == page.items
    assert (await registry.history.connections("d1", until=BASE)).items == []
    only_since = await registry.history.connections("d1", since=BASE + timedelta(hours=7))
    assert len(only_since.items) == 1
    record = only_since.items[0]
    assert record.duration_seconds == 300.0
    assert (record.close_code, record.close_reason) == (1000, "client_closed")
    assert record.client_type is ClientType.DEVICE


async def test_live_connections_appear_in_history(registry: Registry) -> None:
    registry.add_client("d1", "windows", object(), ClientType.DEVICE, {"v": 1}, remote_address="h")
    registry.remove_client("d1", code=4001, reason="bye")
    registry.add_client("d1", "windows", object(), ClientType.DEVICE, {"v": 2})
    await registry.flush()
    page = await registry.history.connections("d1")
    assert [r.metadata for r in page.items] == [{"v": 2}, {"v": 1}]
    newest, oldest = page.items
    assert newest.disconnected_at is None
    assert newest.duration_seconds is None
    assert newest.node_id == registry.node_id
    assert (oldest.close_code, oldest.close_reason, oldest.remote_address) == (4001, "bye", "h")
    assert oldest.duration_seconds is not None
    assert oldest.duration_seconds >= 0
    open_now = (await registry.history.open_connections()).items
    assert [r.connection_id for r in open_now] == [newest.connection_id]


# -- sessions ----------------------------------------------------------------------------------


async def test_sessions_of_a_client(registry: Registry) -> None:
    await registry.open_session("s1", owner_id="c1", executor_id="d1", task_name="t1")
    await registry.open_session("s2", owner_id="c1", executor_id="d2")
    await registry.open_session("s3", owner_id="c2", executor_id="d1")
    await registry.open_session("s4", owner_id="d1", executor_id="d1")
    await registry.end_session("s1", SessionState.COMPLETED)
    await registry.end_session("s3", "failed", "device crashed")

    async def ids(client_id: str | None = None, **filters: Any) -> set[str]:
        page = await registry.history.sessions(client_id, **filters)
        return {record.session_id for record in page.items}

    assert await ids("c1") == {"s1", "s2"}  # as owner
    assert await ids("d1") == {"s1", "s3", "s4"}  # as executor (and owner of s4)
    assert await ids("d1", state="failed") == {"s3"}
    assert await ids("d1", state=SessionState.ACTIVE) == {"s4"}
    assert await ids("c1", state=SessionState.COMPLETED) == {"s1"}
    assert await ids("nobody") == set()
    assert await ids() == {"s1", "s2", "s3", "s4"}
    assert await ids(state="cancelled") == set()

    s3 = (await registry.history.sessions("c2")).items[0]
    assert (s3.owner_id, s3.executor_id, s3.state, s3.end_reason) == (
        "c2",
        "d1",
        SessionState.FAILED,
        "device crashed",
    )
    assert s3.ended_at is not None
    assert s3.ended_at >= s3.created_at
    assert s3.node_id == registry.node_id
    s1 = (await registry.history.sessions("c1", state="completed")).items[0]
    assert s1.task_name == "t1"

    everything = (await registry.history.sessions()).items
    keys = [(r.created_at, r.session_id) for r in everything]
    assert keys == sorted(keys, reverse=True)
    pages = await collect(lambda cursor: registry.history.sessions(limit=1, cursor=cursor))
    assert flat(pages) == everything
    assert len(pages) == 4

    created = {r.session_id: r.created_at for r in everything}
    window = await registry.history.sessions(since=created["s2"], until=created["s4"])
    assert {r.session_id for r in window.items} == {"s2", "s3"}


# -- device info -------------------------------------------------------------------------------


async def test_device_info_snapshots(registry: Registry) -> None:
    for version in range(5):
        registry.set_device_info("d1", {"version": version})
        registry.set_device_info("d1", {"version": version})  # unchanged: no snapshot
        await registry.flush()
    registry.set_device_info("d2", {"version": 99})
    await registry.flush()
    everything = (await registry.history.device_info("d1")).items
    assert [s.info["version"] for s in everything] == [4, 3, 2, 1, 0]
    assert all(s.device_id == "d1" for s in everything)
    pages = await collect(lambda cursor: registry.history.device_info("d1", limit=2, cursor=cursor))
    assert [len(page) for page in pages] == [2, 2, 1]
    assert flat(pages) == everything
    captured = [s.captured_at for s in everything]
    assert captured == sorted(captured, reverse=True)
    window = await registry.history.device_info("d1", since=captured[3], until=captured[1])
    assert [s.info["version"] for s in window.items] == [2, 1]
    assert (await registry.history.device_info("d3")).items == []


# -- audit -------------------------------------------------------------------------------------


async def test_audit_filters_and_paging_in_both_orders(registry: Registry) -> None:
    registry.add_client("d1", "linux", object(), ClientType.DEVICE)
    registry.add_client("c1", "linux", object(), ClientType.CONSTELLATION)
    await registry.open_session("s1", owner_id="c1", executor_id="d1")
    await registry.end_session("s1", "completed")
    registry.set_device_info("d1", {"a": 1})
    registry.remove_client("d1")
    await registry.flush()
    history = registry.history

    everything = (await history.audit(limit=1000)).items
    assert [e.event_id for e in everything] == sorted(e.event_id for e in everything)
    newest_first = (await history.audit(newest_first=True, limit=1000)).items
    assert newest_first == everything[::-1]

    registered = (await history.audit(kind=AuditKind.CLIENT_REGISTERED)).items
    assert [e.client_id for e in registered] == ["d1", "c1"]
    assert registered[0].details["client_type"] == "device"
    about_d1 = (await history.audit(client_id="d1")).items
    assert {e.kind for e in about_d1} >= {
        AuditKind.CLIENT_REGISTERED,
        AuditKind.SESSION_BOUND,
        AuditKind.DEVICE_INFO_CHANGED,
        AuditKind.CLIENT_REMOVED,
    }
    assert all(e.client_id == "d1" for e in about_d1)
    about_s1 = (await history.audit(session_id="s1")).items
    assert about_s1[0].kind == AuditKind.SESSION_OPENED
    assert about_s1[-1].kind == AuditKind.SESSION_ENDED
    assert all(e.session_id == "s1" for e in about_s1)
    combined = (await history.audit(kind=AuditKind.SESSION_BOUND, client_id="c1")).items
    assert [(e.client_id, e.session_id) for e in combined] == [("c1", "s1")]
    assert (await history.audit(kind="no_such_kind")).items == []

    middle = everything[len(everything) // 2]
    window = (await history.audit(since=middle.at)).items
    assert middle in window
    assert all(e.at >= middle.at for e in window)
    before = (await history.audit(until=middle.at)).items
    assert middle not in before
    assert all(e.at < middle.at for e in before)
    assert len(window) + len(before) == len(everything)

    for newest in (False, True):
        for limit in (1, 2, 3, 7):
            pages = await collect(
                lambda cursor, limit=limit, newest=newest: history.audit(
                    newest_first=newest, limit=limit, cursor=cursor
                )
            )
            assert flat(pages) == (newest_first if newest else everything)

    # New events between pages: in event order they show up on later pages; newest first
    # they are ahead of the cursor and do not. Never twice, never a gap.
    def add_event() -> Callable[[], Awaitable[None]]:
        count = 0

        async def add() -> None:
            nonlocal count
            count += 1
            registry.set_device_info("d9", {"n": count})
            await registry.flush()

        return add

    existing = [e.event_id for e in (await history.audit(limit=1000)).items]
    pages = await collect(lambda cursor: history.audit(limit=4, cursor=cursor), between=add_event())
    ids = [e.event_id for e in flat(pages)]
    assert ids == sorted(set(ids))
    assert ids[: len(existing)] == existing
    assert len(ids) == len(existing) + len(pages) - 1  # every event added meanwhile, once

    existing = [e.event_id for e in (await history.audit(limit=1000)).items]
    pages = await collect(
        lambda cursor: history.audit(newest_first=True, limit=4, cursor=cursor),
        between=add_event(),
    )
    ids = [e.event_id for e in flat(pages)]
    assert ids == existing[::-1]  # exactly what existed at the first page, newest first
    assert len(pages) > 2


# -- statistics --------------------------------------------------------------------------------


async def test_statistics(registry: Registry, database_url: str) -> None:
    # Live: two devices and a constellation online; one device came and went.
    registry.add_client("d1", "windows", object(), ClientType.DEVICE)
    registry.add_client("d2", "linux", object(), ClientType.DEVICE)
    registry.add_client("c1", "linux", object(), ClientType.CONSTELLATION)
    registry.add_client("d3", "linux", object(), ClientType.DEVICE)
    registry.remove_client("d3")
    await registry.flush()
    # Past: exact spans in a window of 2020: durations 10 s, 20 s, 60 s; one still open.
    await insert_connections(
        registry,
        database_url,
        "old1",
        [
            (BASE, BASE + timedelta(seconds=10)),
            (BASE + timedelta(hours=1), BASE + timedelta(hours=1, seconds=20)),
        ],
        platform="macos",
    )
    await insert_connections(
        registry,
        database_url,
        "old2",
        [(BASE + timedelta(hours=2), BASE + timedelta(hours=2, minutes=1))],
    )
    await insert_connections(
        registry,
        database_url,
        "old3",
        [
            (BASE + timedelta(hours=3), None),  # never closed: counted, not averaged
            (BASE + timedelta(hours=4), BASE + timedelta(hours=4, seconds=5)),  # at until
        ],
        client_type="constellation",
    )

    stats = await registry.history.statistics(since=BASE, until=BASE + timedelta(hours=4))
    # Open connections now, cluster-wide (the never-closed 2020 row counts: it is open).
    assert stats.online_by_type == {"device": 2, "constellation": 2}
    assert stats.online_by_platform == {"windows": 1, "linux": 3}
    assert (stats.since, stats.until) == (BASE, BASE + timedelta(hours=4))
    assert stats.connections == 4
    assert stats.distinct_clients == 3
    assert stats.mean_duration_seconds == pytest.approx(30.0, abs=1e-3)

    narrow = await registry.history.statistics(
        since=BASE + timedelta(minutes=30), until=BASE + timedelta(hours=2, minutes=30)
    )
    assert (narrow.connections, narrow.distinct_clients) == (2, 2)
    assert narrow.mean_duration_seconds == pytest.approx(40.0, abs=1e-3)

    empty = await registry.history.statistics(since=BASE - timedelta(days=1), until=BASE)
    assert (empty.connections, empty.distinct_clients, empty.mean_duration_seconds) == (
        0,
        0,
        None,
    )

    recent = await registry.history.statistics()  # default: the last 24 hours
    assert recent.until - recent.since == timedelta(days=1)
    assert recent.connections == 4  # d1, d2, c1, d3
    assert recent.distinct_clients == 4
    d3 = (await registry.history.connections("d3")).items[0]
    assert d3.duration_seconds is not None
    assert recent.mean_duration_seconds == pytest.approx(d3.duration_seconds, abs=1e-3)


# -- bad arguments -----------------------------------------------------------------------------


def _cursor(raw: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(raw).encode()).decode()


async def test_bad_query_arguments(registry: Registry) -> None:
    registry.add_client("d1", "linux", object(), ClientType.DEVICE)
    registry.set_device_info("d1", {"a": 1})
    await registry.flush()
    history = registry.history
    audit_cursor = (await history.audit(limit=1)).next_cursor
    assert audit_cursor is not None
    naive = datetime(2024, 1, 1)
    queries: dict[str, Callable[..., Awaitable[Any]]] = {
        "connections": lambda **kw: history.connections("d1", **kw),
        "sessions": lambda **kw: history.sessions("d1", **kw),
        "device_info": lambda **kw: history.device_info("d1", **kw),
        "audit": lambda **kw: history.audit(**kw),
    }
    bad_cursors = [
        "",
        "garbage!!",
        "bm90IGpzb24=",  # base64 of "not json"
        _cursor({"a": 1}),
        _cursor([]),
        _cursor(["2024-01-01T00:00:00", "x"]),  # naive time
        _cursor(["yesterday", "x"]),
        _cursor([1, 2, 3]),
        123,
    ]
    for name, query in queries.items():
        for limit in (0, -1, 10_000, 1.5, True, "10", None):
            with pytest.raises(InvalidArgumentError) as caught:
                await query(limit=limit)
            assert caught.value.argument == "limit", name
        for cursor in bad_cursors:
            with pytest.raises(InvalidArgumentError) as caught:
                await query(cursor=cursor)
            assert caught.value.argument == "cursor", (name, cursor)
        for bound in ("since", "until"):
            for value in (naive, "2024-01-01T00:00:00+00:00", 0):
                with pytest.raises(InvalidArgumentError) as caught:
                    await query(**{bound: value})
                assert caught.value.argument == bound, name
        assert isinstance(await query(limit=1000), Page)  # the maximum is fine
    # A cursor of one query is not a cursor of another shape.
    for name in ("connections", "sessions"):
        with pytest.raises(InvalidArgumentError):
            await queries[name](cursor=audit_cursor)
    with pytest.raises(InvalidArgumentError) as caught:
        await history.sessions(state="bogus")
    assert caught.value.argument == "state"
    for call, argument in (
        (lambda: history.connections(123), "client_id"),  # type: ignore[arg-type]
        (lambda: history.connections(None), "client_id"),  # type: ignore[arg-type]
        (lambda: history.sessions(["d1"]), "client_id"),  # type: ignore[arg-type]
        (lambda: history.device_info(None), "device_id"),  # type: ignore[arg-type]
        (lambda: history.audit(kind=5), "kind"),  # type: ignore[arg-type]
        (lambda: history.audit(session_id=b"s"), "session_id"),  # type: ignore[arg-type]
        (lambda: history.open_connections(limit=0), "limit"),
        (lambda: history.statistics(since=naive), "since"),
        (lambda: history.statistics(until=naive), "until"),
        (lambda: history.statistics(since=BASE + timedelta(days=1), until=BASE), "since"),
    ):
        with pytest.raises(InvalidArgumentError) as caught:
            await call()
        assert caught.value.argument == argument
        assert isinstance(caught.value, ValueError)
