"""Statistics read from the rollups (:mod:`registry.store.rollups`), for :class:`History`.

A window ``[since, until)`` is read as its whole hours, from the rollup rows (whole days and
six-hour blocks of the duration sketch where the window holds them), plus its ragged ends,
less than an hour each, from the connection and session rows themselves: the answers are the
rows' answers, at a cost that hardly grows with the window. Open connections count at query
time (``online_counts`` for who is online; their open rows for time connected so far).

Per-device availability is read a page of devices at a time: whole days from
``device_days``, the ragged ends of the window from the rows of those devices (bounded below
by the earliest opening a day row remembers), and their open connections.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from registry.store import models, rollups
from registry.store.dialect import epoch_seconds, hour_start
from registry.store.rollups import DAY, HOUR, floor
from registry.types import ClientType, DeviceAvailability, HourFigures, Statistics

P95 = 0.95
_LAST = datetime.max.replace(tzinfo=UTC)


def ceiling(at: datetime, span: timedelta) -> datetime:
    """The first period start at or after ``at`` (the last instant there is, past the end)."""
    start = floor(at, span)
    if start == at:
        return start
    try:
        return start + span
    except OverflowError:
        return _LAST


def _cover(
    first: datetime, last: datetime, levels: tuple[tuple[timedelta, str], ...]
) -> list[tuple[str, datetime, datetime]]:
    """``[first, last)`` (whole hours) as ``(duration kind, start, end)`` ranges of the
    longest periods that fit, longest first in :data:`rollups.DURATION_KINDS`."""
    if first >= last:
        return []
    (span, kind), smaller = levels[0], levels[1:]
    if not smaller:
        return [(kind, first, last)]
    start, end = ceiling(first, span), floor(last, span)
    if start >= end:
        return _cover(first, last, smaller)
    return [*_cover(first, start, smaller), (kind, start, end), *_cover(end, last, smaller)]


@dataclass(slots=True)
class _Figures:
    """Window figures, summed from rollup rows and raw rows."""

    connections: int = 0
    closed: int = 0
    closed_seconds: float = 0.0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_state: Counter[str] = field(default_factory=Counter)
    sketch: Counter[int] = field(default_factory=Counter)


def _split(since: datetime, until: datetime) -> tuple[datetime, datetime, list[tuple[Any, Any]]]:
    """The whole hours ``[first, last)`` of a window and its ragged ends (no whole hour:
    ``first == last`` and one ragged end, the window)."""
    first, last = ceiling(since, HOUR), floor(until, HOUR)
    if first >= last:
        return since, since, [(since, until)] if since < until else []
    ends = [(a, b) for a, b in ((since, first), (last, until)) if a < b]
    return first, last, ends


async def statistics(
    connection: AsyncConnection, since: datetime, until: datetime, availability: Any
) -> Statistics:
    c, h, t = models.connections.c, models.connection_hours.c, models.tallies.c
    o, a = models.online_counts.c, models.client_activity.c
    dialect = connection.dialect.name
    figures = _Figures()

    online_by_type = {kind.value: 0 for kind in ClientType}
    online_by_platform: Counter[str] = Counter()
    platform = func.lower(o.platform)  # as the rows' query lower-cased them
    for kind, name, count in await connection.execute(
        select(o.client_type, platform, func.sum(o.connections))
        .where(o.connections > 0)
        .group_by(o.client_type, platform)
    ):
        online_by_type[kind] = online_by_type.get(kind, 0) + int(count)
        online_by_platform[name] += int(count)

    first, last, ends = _split(since, until)
    if first < last:
        count, closed, closed_us = (
            await connection.execute(
                select(
                    func.coalesce(func.sum(h.connects), 0),
                    func.coalesce(func.sum(h.closed), 0),
                    func.coalesce(func.sum(h.closed_us), 0),
                ).where(h.hour >= first, h.hour < last)
            )
        ).one()
        figures.connections += int(count)
        figures.closed += int(closed)
        figures.closed_seconds += int(closed_us) / 1e6
        labelled = {
            rollups.OPENED_CLOSED_BY_REASON: figures.by_reason,
            rollups.SESSIONS_BY_STATE: figures.by_state,
        }
        for kind, label, count in await connection.execute(
            select(t.kind, t.label, func.sum(t.count))
            .where(t.kind.in_(list(labelled)), t.start >= first, t.start < last)
            .group_by(t.kind, t.label)
        ):
            labelled[kind][label] += int(count)
        ranges = _cover(first, last, rollups.DURATION_KINDS)
        for label, count in await connection.execute(
            select(t.label, func.sum(t.count))
            .where(or_(*(and_(t.kind == k, t.start >= s, t.start < e) for k, s, e in ranges)))
            .group_by(t.label)
        ):
            figures.sketch[int(label)] += int(count)

    if ends:
        # The ragged ends from the rows (an hour of them at most): durations to the
        # microsecond, in the sketch's buckets.
        in_ends = or_(*(and_(c.connected_at >= s, c.connected_at < e) for s, e in ends))
        duration = epoch_seconds(dialect, c.disconnected_at) - epoch_seconds(
            dialect, c.connected_at
        )
        for reason, seconds in await connection.execute(
            select(c.close_reason, duration).where(in_ends)
        ):
            figures.connections += 1
            if seconds is None:
                continue
            figures.closed += 1
            figures.closed_seconds += seconds
            figures.by_reason[reason or ""] += 1
            figures.sketch[rollups.duration_bucket(round(seconds * 1e6))] += 1
        s = models.sessions.c
        created = or_(*(and_(s.created_at >= a_, s.created_at < b_) for a_, b_ in ends))
        for state, count in await connection.execute(
            select(s.state, func.count()).where(created).group_by(s.state)
        ):
            figures.by_state[state] += int(count)

    # Distinct clients: those whose newest opening lies in the window, and of those that
    # opened one since, the ones with an opening inside too (none, for a window up to now).
    opened_inside = exists().where(
        c.client_id == a.client_id, c.connected_at >= since, c.connected_at < until
    )
    distinct = (
        await connection.execute(
            select(
                select(func.count())
                .where(a.last_connected_at >= since, a.last_connected_at < until)
                .scalar_subquery(),
                select(func.count())
                .where(a.last_connected_at >= until, opened_inside)
                .scalar_subquery(),
            )
        )
    ).one()
    return Statistics(
        since=since,
        until=until,
        online_by_type=online_by_type,
        online_by_platform=dict(online_by_platform),
        connections=figures.connections,
        distinct_clients=int(distinct[0]) + int(distinct[1]),
        mean_duration_seconds=(figures.closed_seconds / figures.closed if figures.closed else None),
        p95_duration_seconds=rollups.percentile_seconds(figures.sketch, P95),
        disconnects_by_reason=dict(+figures.by_reason),
        sessions_by_state=dict(+figures.by_state),
        availability=availability,
    )


async def hourly(connection: AsyncConnection, start: datetime, end: datetime) -> list[HourFigures]:
    """The whole hours of ``[start, end)``: rollup rows, and the open connections so far."""
    h, t, c = models.connection_hours.c, models.tallies.c, models.connections.c
    dialect = connection.dialect.name
    hours = (end - start) // HOUR
    connects, disconnects = [0] * hours, [0] * hours
    seconds = [0.0] * hours
    reasons: list[dict[str, int]] = [{} for _ in range(hours)]
    for hour, opened, closed, us in await connection.execute(
        select(h.hour, func.sum(h.connects), func.sum(h.disconnects), func.sum(h.connected_us))
        .where(h.hour >= start, h.hour < end)
        .group_by(h.hour)
    ):
        n = (hour - start) // HOUR
        connects[n], disconnects[n], seconds[n] = int(opened), int(closed), int(us) / 1e6
    for hour, label, count in await connection.execute(
        select(t.start, t.label, t.count).where(
            t.kind == rollups.CLOSED_BY_REASON, t.start >= start, t.start < end
        )
    ):
        if count:
            reasons[(hour - start) // HOUR][label] = int(count)

    # Open connections, by the hour they opened in (few rows; their times summed in SQL):
    # each covers the rest of its first hour and every hour after it, up to now.
    now = datetime.now(UTC)
    opened_hour = hour_start(dialect, c.connected_at)
    began = epoch_seconds(dialect, c.connected_at) - epoch_seconds(dialect, opened_hour)
    groups = sorted(
        (hour, int(count), float(offsets))
        for hour, count, offsets in await connection.execute(
            select(opened_hour, func.count(), func.sum(began))
            .where(c.disconnected_at.is_(None), c.connected_at < end)
            .group_by(opened_hour)
        )
    )
    opened_at = [hour for hour, _count, _offsets in groups]
    before = [0]  # open connections opened before the hour of each group
    for _hour, count, _offsets in groups:
        before.append(before[-1] + count)
    for n in range(hours):
        hour = start + n * HOUR
        if hour >= now:
            break
        index = bisect.bisect_left(opened_at, hour)
        length = min((now - hour).total_seconds(), 3600.0)
        seconds[n] += before[index] * length  # opened in an earlier hour
        if index < len(groups) and groups[index][0] == hour:
            _hour, count, offsets = groups[index]
            seconds[n] += max(count * length - offsets, 0.0)  # opened in this one
    return [
        HourFigures(
            hour=start + n * HOUR,
            connects=connects[n],
            disconnects=disconnects[n],
            disconnects_by_reason=reasons[n],
            connected_seconds=seconds[n],
        )
        for n in range(hours)
    ]


async def availability_page(
    connection: AsyncConnection, since: datetime, until: datetime, after: str | None, limit: int
) -> tuple[list[DeviceAvailability], bool]:
    """Up to ``limit`` devices after ``after`` (by id) that had a connection in the window,
    each with the fraction of ``[since, until)`` it was connected (until now at most, for
    connections still open), and whether more follow."""
    length = (until - since).total_seconds()
    if length <= 0:
        return [], False
    end = min(until, datetime.now(UTC))
    days_from, days_to = floor(since, DAY), until
    items: list[DeviceAvailability] = []
    cursor = after
    while len(items) <= limit:
        candidates = await _candidates(connection, since, until, days_from, days_to, cursor, limit)
        if not candidates:
            return items, False
        seconds = await _connected_seconds(connection, candidates, since, until, end)
        for client_id in candidates:
            if client_id in seconds:
                items.append(DeviceAvailability(client_id, min(seconds[client_id] / length, 1.0)))
        cursor = candidates[-1]
    return items[:limit], True


async def _candidates(
    connection: AsyncConnection,
    since: datetime,
    until: datetime,
    days_from: datetime,
    days_to: datetime,
    after: str | None,
    limit: int,
) -> list[str]:
    """Device ids after ``after`` that may have had a connection in the window: a closed one
    over one of its days, or one open now opened before ``until``."""
    cl, d, c = models.clients.c, models.device_days.c, models.connections.c
    some_day = exists().where(d.client_id == cl.client_id, d.day >= days_from, d.day < days_to)
    query = select(cl.client_id).where(some_day).order_by(cl.client_id).limit(limit + 1)
    still_open = (
        select(c.client_id)
        .where(
            c.disconnected_at.is_(None),
            c.client_type == ClientType.DEVICE.value,
            c.connected_at < until,
        )
        .order_by(c.client_id)
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(cl.client_id > after)
        still_open = still_open.where(c.client_id > after)
    ids = set((await connection.execute(query)).scalars())
    ids.update((await connection.execute(still_open)).scalars())
    return sorted(ids)[: limit + 1]


async def _connected_seconds(
    connection: AsyncConnection,
    devices: list[str],
    since: datetime,
    until: datetime,
    end: datetime,
) -> dict[str, float]:
    """Seconds connected in ``[since, end)`` of each of ``devices`` that had a connection in
    ``[since, until)``: whole days from ``device_days``, the ragged ends from the rows."""
    d, c = models.device_days.c, models.connections.c
    seconds: dict[str, float] = {}
    # The ragged ends, each inside one day.
    first_day, last_day = ceiling(since, DAY), floor(until, DAY)
    ends: list[tuple[datetime, datetime]] = []
    if first_day < last_day:
        for client_id, count, us in await connection.execute(
            select(d.client_id, func.sum(d.connections), func.sum(d.connected_us))
            .where(d.client_id.in_(devices), d.day >= first_day, d.day < last_day)
            .group_by(d.client_id)
        ):
            if count:
                seconds[client_id] = int(us) / 1e6
        ends = [(since, first_day), (last_day, until)]
    else:  # no whole day: at most one midnight inside
        ends = [(since, min(first_day, until)), (first_day, until)]
    for a, b in ends:
        if a >= b:
            continue
        # Connections over [a, b) lie over the day of a; none opened before the earliest
        # opening its day row remembers.
        day = models.device_days.alias("day")
        rows = await connection.execute(
            select(c.client_id, c.connected_at, c.disconnected_at)
            .join(day, and_(day.c.client_id == c.client_id, day.c.day == floor(a, DAY)))
            .where(
                c.client_id.in_(devices),
                c.client_type == ClientType.DEVICE.value,
                c.disconnected_at.is_not(None),
                c.connected_at >= day.c.first_connected_at,
                c.connected_at < b,
            )
        )
        for client_id, began, ended in rows:
            if not (began >= since or ended > since):  # as the rows' query selects them
                continue
            overlap = (min(ended, b, end) - max(began, a)).total_seconds()
            seconds[client_id] = seconds.get(client_id, 0.0) + max(overlap, 0.0)
    for client_id, began in await connection.execute(
        select(c.client_id, c.connected_at).where(
            c.client_id.in_(devices),
            c.client_type == ClientType.DEVICE.value,
            c.disconnected_at.is_(None),
            c.connected_at < until,
        )
    ):
        overlap = (end - max(began, since)).total_seconds()
        seconds[client_id] = seconds.get(client_id, 0.0) + max(overlap, 0.0)
    return seconds
