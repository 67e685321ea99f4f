"""Statistics read from the rollups (:mod:`registry.store.rollups`), for :class:`History`.

A window ``[since, until)`` is read as its whole hours, from the rollup rows (the tallies of
its whole days, and of the hours left over), plus its ragged ends, less than an hour each,
from the connection and session rows themselves: the answers are the rows' answers, at a cost
that hardly grows with the window. Open connections count at query
time (``online_counts`` for who is online; their open rows for time connected so far).

Per-device availability is read a page of devices at a time: whole days from
``device_days``, the ragged ends of the window from the rows of those devices (bounded below
by the earliest opening a day row remembers), and their open connections.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    Executable,
    Float,
    Select,
    Text,
    and_,
    bindparam,
    cast,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from registry.store import models, rollups
from registry.store.dialect import epoch_seconds, greatest, hour_start, least
from registry.store.rollups import DAY, HOUR, floor
from registry.types import ClientType, DeviceAvailability, HourFigures, Statistics

P95 = 0.95
_WINDOW_FIGURES = (rollups.OPENED_CLOSED_BY_REASON, rollups.SESSIONS_BY_STATE, rollups.DURATIONS)
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
    first: datetime, last: datetime, levels: tuple[tuple[timedelta, str], ...] = rollups.LEVELS
) -> list[tuple[str, datetime, datetime]]:
    """``[first, last)`` (whole hours) as ``(level, start, end)`` ranges of the longest
    periods that fit (:data:`rollups.LEVELS`, longest first)."""
    if first >= last:
        return []
    (span, level), smaller = levels[0], levels[1:]
    if not smaller:
        return [(level, first, last)]
    start, end = ceiling(first, span), floor(last, span)
    if start >= end:
        return _cover(first, last, smaller)
    return [*_cover(first, start, smaller), (level, start, end), *_cover(end, last, smaller)]


@dataclass(slots=True)
class _Figures:
    """Window figures, summed from rollup rows and raw rows."""

    connections: int = 0
    closed: int = 0
    closed_seconds: float = 0.0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_state: Counter[str] = field(default_factory=Counter)
    coarse: Counter[int] = field(default_factory=Counter)  # the duration sketch, coarse
    ragged: list[int] = field(default_factory=list)  # fine buckets of the ragged ends


async def _all(
    connection: AsyncConnection, query: Executable, parameters: dict[str, Any] | None = None
) -> Sequence[Any]:
    """Every row at once (iterating a result fetches them one at a time)."""
    rows: Sequence[Any] = (await connection.execute(query, parameters)).all()
    return rows


def _split(since: datetime, until: datetime) -> tuple[datetime, datetime, list[tuple[Any, Any]]]:
    """The whole hours ``[first, last)`` of a window and its ragged ends (no whole hour:
    ``first == last`` and one ragged end, the window)."""
    first, last = ceiling(since, HOUR), floor(until, HOUR)
    if first >= last:
        return since, since, [(since, until)] if since < until else []
    ends = [(a, b) for a, b in ((since, first), (last, until)) if a < b]
    return first, last, ends


def _part(name: str, a: Any, b: Any, *values: Any) -> Select[Any]:
    """One part of the statistics' single statement: ``(part, a, b, x, y, z)`` rows."""
    padded = [*values, *([literal(0)] * (3 - len(values)))]
    return select(
        literal(name).label("part"),
        cast(a, Text).label("a"),
        cast(b, Text).label("b"),
        *(cast(value, Float).label(column) for value, column in zip(padded, "xyz", strict=True)),
    )


def _at(name: str) -> Any:
    return bindparam(name, type_=models.UTCDateTime())


def _within(column: Any, prefix: str, count: int) -> Any:
    """``column`` in any of ``count`` ranges bound as ``{prefix}{i}_start``/``_end``."""
    return or_(
        *(
            and_(column >= _at(f"{prefix}{i}_start"), column < _at(f"{prefix}{i}_end"))
            for i in range(count)
        )
    )


def _bounds(prefix: str, ranges: Sequence[tuple[datetime, datetime]]) -> dict[str, datetime]:
    values: dict[str, datetime] = {}
    for i, (start, end) in enumerate(ranges):
        values[f"{prefix}{i}_start"], values[f"{prefix}{i}_end"] = start, end
    return values


@cache
def _statement(dialect: str, levels: tuple[str, ...], ends: int) -> Executable:
    """The statistics' single statement for a window of this shape: its whole hours read at
    ``levels`` (one range each), ``ends`` ragged ends. Built once per shape, so that only its
    parameters change from call to call (SQLAlchemy then reuses the compiled form at once)."""
    c, h, t = models.connections.c, models.connection_hours.c, models.tallies.c
    o, a, s = models.online_counts.c, models.client_activity.c, models.sessions.c
    since, until = _at("since"), _at("until")
    platform = func.lower(o.platform)  # as the rows' query lower-cased them
    parts = [
        _part("online", o.client_type, platform, func.sum(o.connections))
        .where(o.connections > 0)
        .group_by(o.client_type, platform),
        # The whole hours' sums.
        _part(
            "hours",
            null(),
            null(),
            func.coalesce(func.sum(h.connects), 0),
            func.coalesce(func.sum(h.closed), 0),
            func.coalesce(func.sum(h.closed_us), 0),
        ).where(h.hour >= _at("first"), h.hour < _at("last")),
        # Distinct clients: those whose newest opening lies in the window, and of those
        # that opened one since, the ones with an opening inside too (none, for a window up
        # to now).
        _part(
            "distinct",
            null(),
            null(),
            select(func.count())
            .where(a.last_connected_at >= since, a.last_connected_at < until)
            .scalar_subquery(),
            select(func.count())
            .where(
                a.last_connected_at >= until,
                exists().where(
                    c.client_id == a.client_id, c.connected_at >= since, c.connected_at < until
                ),
            )
            .scalar_subquery(),
        ),
    ]
    if levels:
        parts.append(
            _part("tally", t.kind, t.label, func.sum(t.count))
            .where(
                or_(
                    *(
                        and_(
                            t.kind.in_([rollups.kind(figure, level) for figure in _WINDOW_FIGURES]),
                            t.start >= _at(f"r{i}_start"),
                            t.start < _at(f"r{i}_end"),
                        )
                        for i, level in enumerate(levels)
                    )
                )
            )
            .group_by(t.kind, t.label)
        )
    if ends:
        # The ragged ends, from the rows (an hour of them at most): each connection with
        # its duration, and the sessions by state.
        duration = epoch_seconds(dialect, c.disconnected_at) - epoch_seconds(
            dialect, c.connected_at
        )
        in_ends = _within(c.connected_at, "e", ends)
        parts.append(_part("edge", c.close_reason, null(), duration).where(in_ends))
        parts.append(
            _part("session", s.state, null(), func.count())
            .where(_within(s.created_at, "e", ends))
            .group_by(s.state)
        )
    return union_all(*parts)


@cache
def _fine_statement(levels: tuple[str, ...]) -> Executable:
    """The fine counts of one coarse duration bucket over whole-hour ranges at ``levels``."""
    t = models.tallies.c
    return (
        select(t.label, func.sum(t.count))
        .where(
            or_(
                *(
                    and_(
                        t.kind == bindparam(f"r{i}_kind"),
                        t.start >= _at(f"r{i}_start"),
                        t.start < _at(f"r{i}_end"),
                    )
                    for i, _level in enumerate(levels)
                )
            )
        )
        .group_by(t.label)
    )


async def statistics(
    connection: AsyncConnection, since: datetime, until: datetime, availability: Any
) -> Statistics:
    """The figures of ``[since, until)``, read in one statement (a UNION ALL of its parts,
    one round trip) and, for the 95th percentile, a second one."""
    first, last, ends = _split(since, until)
    ranges = _cover(first, last)
    levels = tuple(level for level, _start, _end in ranges)
    figure_of = {
        rollups.kind(figure, level): figure for figure in _WINDOW_FIGURES for level in levels
    }
    parameters = {
        "since": since,
        "until": until,
        "first": first,
        "last": last,
        **_bounds("r", [(start, end) for _level, start, end in ranges]),
        **_bounds("e", ends),
    }
    statement = _statement(connection.dialect.name, levels, len(ends))
    figures = _Figures()
    online_by_type = {kind.value: 0 for kind in ClientType}
    online_by_platform: Counter[str] = Counter()
    distinct = 0
    durations: list[float] = []
    for part, a_, b_, x, y, z in await _all(connection, statement, parameters):
        if part == "edge":
            figures.connections += 1
            if x is not None:
                durations.append(x)
                figures.by_reason[a_ or ""] += 1
        elif part == "tally":
            figure = figure_of[a_]
            if figure == rollups.DURATIONS:
                figures.coarse[int(b_)] += int(x)
            elif figure == rollups.OPENED_CLOSED_BY_REASON:
                figures.by_reason[b_] += int(x)
            else:
                figures.by_state[b_] += int(x)
        elif part == "hours":
            figures.connections += int(x)
            figures.closed += int(y)
            figures.closed_seconds += z / 1e6
        elif part == "online":
            online_by_type[a_] = online_by_type.get(a_, 0) + int(x)
            online_by_platform[b_] += int(x)
        elif part == "distinct":
            distinct = int(x) + int(y)
        else:
            figures.by_state[a_] += int(x)
    figures.closed += len(durations)
    figures.closed_seconds += sum(durations)
    figures.ragged = [rollups.duration_bucket(round(x * 1e6)) for x in durations]
    figures.coarse.update(map(rollups.coarse_bucket, figures.ragged))
    return Statistics(
        since=since,
        until=until,
        online_by_type=online_by_type,
        online_by_platform=dict(online_by_platform),
        connections=figures.connections,
        distinct_clients=distinct,
        mean_duration_seconds=(figures.closed_seconds / figures.closed if figures.closed else None),
        p95_duration_seconds=await _p95(connection, figures, ranges),
        disconnects_by_reason=dict(+figures.by_reason),
        sessions_by_state=dict(+figures.by_state),
        availability=availability,
    )


async def _p95(
    connection: AsyncConnection, figures: _Figures, ranges: list[tuple[str, datetime, datetime]]
) -> float | None:
    """The 95th percentile of the window's durations, from the sketch: the coarse bucket that
    holds it, then the fine counts of that bucket alone."""
    total = sum(figures.coarse.values())
    if total <= 0:
        return None
    coarse, rank = rollups.nth(figures.coarse, rollups.percentile_rank(total, P95))
    fine = Counter(b for b in figures.ragged if rollups.coarse_bucket(b) == coarse)
    if ranges:
        levels = tuple(level for level, _start, _end in ranges)
        parameters = {
            **_bounds("r", [(start, end) for _level, start, end in ranges]),
            **{
                f"r{i}_kind": rollups.kind(rollups.DURATIONS, level, coarse)
                for i, level in enumerate(levels)
            },
        }
        for label, count in await _all(connection, _fine_statement(levels), parameters):
            fine[int(label)] += int(count)
    bucket, _rank = rollups.nth(fine, rank)
    return rollups.bucket_seconds(bucket)


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
    c = models.connections.c
    dialect = connection.dialect.name
    # Open connections: one pass over the open rows (few), their time summed in SQL.
    start_s, end_s = literal(since.timestamp()), literal(end.timestamp())
    began = greatest(dialect, epoch_seconds(dialect, c.connected_at), start_s)
    query = (
        select(c.client_id, func.sum(greatest(dialect, end_s - began, literal(0.0))))
        .where(
            c.disconnected_at.is_(None),
            c.client_type == ClientType.DEVICE.value,
            c.connected_at < until,
        )
        .group_by(c.client_id)
    )
    if after is not None:
        query = query.where(c.client_id > after)
    still_open = {client_id: float(total) for client_id, total in await _all(connection, query)}
    open_ids = sorted(still_open)
    items: list[DeviceAvailability] = []
    cursor = after
    while len(items) <= limit:
        wanted = limit + 1 - len(items)  # one more than the page tells whether more follow
        candidates = await _with_closed(connection, since, until, cursor, wanted)
        candidates = sorted({*candidates, *_after(open_ids, cursor, wanted)})[:wanted]
        if not candidates:
            return items, False
        seconds = await _connected_seconds(connection, candidates, since, until, end)
        for client_id in candidates:
            if client_id in still_open:
                seconds[client_id] = seconds.get(client_id, 0.0) + still_open[client_id]
            if client_id in seconds:
                items.append(DeviceAvailability(client_id, min(seconds[client_id] / length, 1.0)))
        cursor = candidates[-1]
    return items[:limit], True


def _after(ids: list[str], after: str | None, count: int) -> list[str]:
    """The first ``count`` of the sorted ``ids`` after ``after``."""
    start = 0 if after is None else bisect.bisect_right(ids, after)
    return ids[start : start + count]


async def _with_closed(
    connection: AsyncConnection, since: datetime, until: datetime, after: str | None, count: int
) -> list[str]:
    """The first ``count`` device ids after ``after`` with a closed connection over one of
    the window's days (which may lie outside the window: they are candidates)."""
    cl, d = models.clients.c, models.device_days.c
    some_day = exists().where(
        d.client_id == cl.client_id, d.day >= floor(since, DAY), d.day < until
    )
    query = select(cl.client_id).where(some_day).order_by(cl.client_id).limit(count)
    if after is not None:
        query = query.where(cl.client_id > after)
    return list((await connection.execute(query)).scalars())


async def _connected_seconds(
    connection: AsyncConnection,
    devices: list[str],
    since: datetime,
    until: datetime,
    end: datetime,
) -> dict[str, float]:
    """Seconds of closed connections in ``[since, end)`` of each of ``devices`` that had one
    in ``[since, until)``: whole days from ``device_days``, the ragged ends from the rows."""
    d, c = models.device_days.c, models.connections.c
    seconds: dict[str, float] = {}
    first_day, last_day = ceiling(since, DAY), floor(until, DAY)
    ends: list[tuple[datetime, datetime]] = []
    if first_day < last_day:
        for client_id, count, us in await _all(
            connection,
            select(d.client_id, func.sum(d.connections), func.sum(d.connected_us))
            .where(d.client_id.in_(devices), d.day >= first_day, d.day < last_day)
            .group_by(d.client_id),
        ):
            if count:
                seconds[client_id] = int(us) / 1e6
        ends = [(since, first_day), (last_day, until)]
    else:  # no whole day: at most one midnight inside
        ends = [(since, min(first_day, until)), (first_day, until)]
    ends = [(a, b) for a, b in ends if a < b]  # the ragged ends, each inside one day
    if not ends:
        return seconds
    # Connections over [a, b) lie over the day of a: none opened before the earliest opening
    # its day row remembers, and a device without that row had none.
    firsts: dict[datetime, dict[str, datetime]] = {floor(a, DAY): {} for a, _b in ends}
    for client_id, day, first in await _all(
        connection,
        select(d.client_id, d.day, d.first_connected_at).where(
            d.client_id.in_(devices), d.day.in_(list(firsts)), d.connections > 0
        ),
    ):
        firsts[day][client_id] = first
    dialect = connection.dialect.name
    for a, b in ends:
        first_of = firsts[floor(a, DAY)]
        if not first_of:
            continue
        # Each connection's time inside [a, b) (and before now), summed in SQL.
        inside = least(
            dialect, epoch_seconds(dialect, c.disconnected_at), literal(min(b, end).timestamp())
        ) - greatest(dialect, epoch_seconds(dialect, c.connected_at), literal(a.timestamp()))
        for client_id, total in await _all(
            connection,
            select(c.client_id, func.sum(greatest(dialect, inside, literal(0.0))))
            .where(
                c.client_id.in_(list(first_of)),
                c.client_type == ClientType.DEVICE.value,
                c.disconnected_at.is_not(None),
                c.connected_at >= min(first_of.values()),
                c.connected_at < b,
                or_(c.connected_at >= since, c.disconnected_at > since),  # as the rows' query
            )
            .group_by(c.client_id),
        ):
            seconds[client_id] = seconds.get(client_id, 0.0) + float(total)
    return seconds
