"""Per-hour figures (``History.hourly``): whole UTC hours, zeros included, connections that
span hour boundaries split across them, open connections counted up to now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from registry import InvalidArgumentError, Registry
from tests.core.test_history import BASE, insert_connections

H = timedelta(hours=1)


async def test_hours_split_connections_at_their_boundaries(
    registry: Registry, database_url: str
) -> None:
    # BASE is midnight: a 30-minute connection from 00:45 to 01:15, one of 2 h 10 min from
    # 01:50 to 04:00 closed by another reason, and one opened at 03:30 that is still open.
    ids = await insert_connections(
        registry,
        database_url,
        "d1",
        [
            (BASE + timedelta(minutes=45), BASE + timedelta(hours=1, minutes=15)),
            (BASE + timedelta(hours=1, minutes=50), BASE + timedelta(hours=4)),
        ],
    )
    await insert_connections(registry, database_url, "d2", [(BASE + 3.5 * H, None)])
    assert len(ids) == 2

    hourly = await registry.history.hourly(
        since=BASE + timedelta(minutes=10), until=BASE + 4 * H + timedelta(seconds=1)
    )
    assert (hourly.since, hourly.until) == (BASE, BASE + 5 * H)  # widened to whole hours
    assert [item.hour for item in hourly.items] == [BASE + n * H for n in range(5)]
    assert [item.connects for item in hourly.items] == [1, 1, 0, 1, 0]
    assert [item.disconnects for item in hourly.items] == [0, 1, 0, 0, 1]
    assert [item.disconnects_by_reason for item in hourly.items] == [
        {},
        {"client_closed": 1},
        {},
        {},
        {"client_closed": 1},
    ]
    expected = [15 * 60, 15 * 60 + 10 * 60, 3600, 3600 + 1800, 3600]
    assert [item.connected_seconds for item in hourly.items] == pytest.approx(expected, abs=1e-3)

    # A window after the first connection closed, before the still-open one began.
    middle = await registry.history.hourly(since=BASE + 2 * H, until=BASE + 3 * H)
    assert [(i.connects, i.disconnects, i.connected_seconds) for i in middle.items] == [  # type: ignore[comparison-overlap]
        (0, 0, pytest.approx(3600, abs=1e-3))
    ]
    # A window with nothing in it: every hour, all zeros.
    empty = await registry.history.hourly(since=BASE - 3 * H, until=BASE)
    assert [(i.connects, i.disconnects, i.connected_seconds) for i in empty.items] == [
        (0, 0, 0.0)
    ] * 3


async def test_default_window_is_the_last_24_hours(registry: Registry, database_url: str) -> None:
    now = datetime.now(UTC)
    await insert_connections(registry, database_url, "d1", [(now - timedelta(hours=30), None)])
    hourly = await registry.history.hourly()
    assert len(hourly.items) == 24
    assert hourly.until - hourly.since == timedelta(days=1)
    assert hourly.items[-1].hour <= now < hourly.until
    assert sum(item.connects for item in hourly.items) == 0  # opened before the window
    # Open all along: every whole hour counts an hour, the current one up to now.
    assert [item.connected_seconds for item in hourly.items[:-1]] == [3600.0] * 23
    assert 0 < hourly.items[-1].connected_seconds <= 3600


async def test_bad_windows(registry: Registry) -> None:
    history = registry.history
    for call, argument in (
        (lambda: history.hourly(since=BASE, until=BASE + timedelta(days=31, seconds=1)), "since"),
        (lambda: history.hourly(since=BASE + H, until=BASE), "since"),
        (lambda: history.hourly(since=datetime(2020, 1, 1)), "since"),
        (lambda: history.hourly(until=datetime(2020, 1, 1)), "until"),
        (lambda: history.hourly(until=datetime.max.replace(tzinfo=UTC)), "until"),
    ):
        with pytest.raises(InvalidArgumentError) as caught:
            await call()  # type: ignore[no-untyped-call]
        assert caught.value.argument == argument
    longest = await history.hourly(since=BASE, until=BASE + timedelta(days=31))
    assert len(longest.items) == 31 * 24


async def test_windows_at_the_edges_of_time(registry: Registry) -> None:
    first = datetime.min.replace(tzinfo=UTC)
    early = await registry.history.hourly(until=first + 2 * H)
    assert [item.hour for item in early.items] == [first, first + H]
    late = datetime(9999, 12, 31, 23, tzinfo=UTC)
    latest = await registry.history.hourly(since=late - H, until=late)
    assert [item.hour for item in latest.items] == [late - H]
    # The last hour of time does not end inside it: refused (see test_bad_windows).
