"""Rollups: running totals of the history, kept in the same transaction as the rows they
summarise, so that statistics read a few rows per hour instead of every row of a window.

What each table holds is described in :mod:`registry.store.models`. Everything is computed
here, in Python, as the *contribution* of one row, which is added when the row is written and
taken back when it changes or goes: the writer adds the connections it inserts and, for a
close, takes back the open row's contribution and adds the closed row's; start-up recovery
does the same for its set-based closes; prune takes back what it deletes; :func:`rebuild` adds
every row (the migration's backfill). Times are whole microseconds, so taking back leaves
exactly zero.

An open connection contributes only its opening (``connects``, ``online_counts``,
``client_activity``); its connected time is counted at query time, from the open rows (they
are few: at most one per online client).

Connection durations are kept as a mergeable sketch (the buckets of DDSketch): a duration
falls in bucket ``ceil(log(us) / log(GAMMA))``, and a bucket answers with a value within
:data:`RELATIVE_ACCURACY` of every duration in it, so a percentile read from summed buckets is
within that relative error of the exact one. The buckets are tallied twice, fine and grouped
coarse, so that a percentile reads a few rows per period (see :data:`FINE_PER_COARSE`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from operator import itemgetter
from typing import Any, NamedTuple

from sqlalchemy import (
    Executable,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import UpdateBase

from registry.store import models
from registry.store.dialect import greatest, least, upsert
from registry.types import ClientType

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)

#: Relative error of a percentile read from the duration sketch.
RELATIVE_ACCURACY = 0.02
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)

#: Fine sketch buckets per coarse one (a factor of GAMMA**10, about 1.5, between bounds).
FINE_PER_COARSE = 10

# Tallies (the ``kind`` column). Closes by reason per hour of the close, for the hourly
# figures; the window figures per period of the opening (or creation), at two levels: a
# window is read from its whole days and the hours left over. Durations are counted twice,
# per coarse bucket (label) and, under a kind naming the coarse bucket, per fine bucket: a
# percentile reads the coarse counts of the window, then the fine counts of one coarse
# bucket only.
CLOSED_BY_REASON = "closed_by_reason"
OPENED_CLOSED_BY_REASON = "opened_closed_by_reason"
SESSIONS_BY_STATE = "sessions_by_state"
DURATIONS = "durations"
LEVELS = ((DAY, "day"), (HOUR, "hour"))


def kind(figure: str, level: str, coarse: int | None = None) -> str:
    """The ``kind`` of a window figure's tallies at one level (and one coarse bucket)."""
    return f"{figure}/{level}" if coarse is None else f"{figure}/{level}/{coarse}"


DEVICE = ClientType.DEVICE.value


def floor(at: datetime, span: timedelta) -> datetime:
    """The start of the ``span``-long period (aligned on the Unix epoch, UTC) holding ``at``."""
    return EPOCH + (at - EPOCH) // span * span


def micros(delta: timedelta) -> int:
    return delta // MICROSECOND


def _since_epoch(at: datetime) -> int:
    """Microseconds since the Unix epoch (the contributions are summed in these)."""
    return (at - EPOCH) // MICROSECOND


def _spread(began: int, ended: int, span: int) -> Iterator[tuple[int, int]]:
    """``(period start, microseconds)`` for each ``span``-long period (all in microseconds
    since the epoch) that ``[began, ended)`` overlaps; a span of no length (or a negative one)
    lies in the period of ``began``, for 0."""
    start = began - began % span
    if ended <= began:
        yield start, 0
        return
    while start < ended:
        following = start + span
        yield start, min(following, ended) - max(start, began)
        start = following


def duration_bucket(us: int) -> int:
    """The sketch bucket of a duration in microseconds; buckets are ordered as durations are
    (negative durations, which only skewed clocks make, mirror the positive ones below 0)."""
    if us > 0:
        return math.ceil(math.log(us) / _LOG_GAMMA)
    if us == 0:
        return -1
    return -2 - duration_bucket(-us)


def bucket_seconds(bucket: int) -> float:
    """The value a bucket answers with, in seconds (within RELATIVE_ACCURACY of its durations)."""
    if bucket == -1:
        return 0.0
    if bucket < -1:
        return -bucket_seconds(-2 - bucket)
    return 2 * GAMMA**bucket / (GAMMA + 1) / 1e6


def coarse_bucket(bucket: int) -> int:
    return bucket // FINE_PER_COARSE


def nth(counts: dict[int, int], rank: int) -> tuple[int, int]:
    """The bucket holding the ``rank``-th smallest duration (from 0) of a sketch's counts, and
    that duration's rank inside the bucket."""
    for bucket in sorted(counts):
        if rank < counts[bucket]:
            return bucket, rank
        rank -= counts[bucket]
    raise IndexError("rank beyond the sketch's counts")


def percentile_rank(total: int, fraction: float) -> int:
    """The rank (from 0) of the ``fraction`` percentile of ``total`` values, nearest-rank as
    the exact ranking has it."""
    return max(math.ceil(fraction * total) - 1, 0)


class ConnectionFacts(NamedTuple):
    """The columns of a connection row that its contribution depends on."""

    client_id: str
    client_type: str
    platform: str
    node_id: str
    connected_at: datetime
    disconnected_at: datetime | None
    close_reason: str | None


FACTS = ConnectionFacts._fields


def connection_facts() -> list[Any]:
    """The select list of :class:`ConnectionFacts`, in order."""
    c = models.connections.c
    return [c[name] for name in FACTS]


@dataclass(frozen=True, slots=True)
class _Sums:
    """A rollup table: its key columns, the counters a contribution adds to, and columns kept
    by another rule (``least``/``greatest`` of the stored and the proposed value)."""

    table: Table
    key: tuple[str, ...]
    counters: tuple[str, ...]
    kept: tuple[tuple[str, str], ...] = ()

    def upsert(self, dialect_name: str) -> UpdateBase:
        rules = {"least": least, "greatest": greatest}
        columns = self.table.c
        return upsert(
            dialect_name,
            self.table,
            list(self.key),
            lambda excluded: {
                **{name: columns[name] + excluded[name] for name in self.counters},
                **{
                    name: rules[rule](dialect_name, columns[name], excluded[name])
                    for name, rule in self.kept
                },
            },
        )

    def delete_empty(self) -> Executable:
        """Delete the row of a key if every counter is zero (after taking contributions back)."""
        columns = self.table.c
        return delete(self.table).where(
            and_(*(columns[name] == bindparam(name) for name in self.key)),
            *(columns[name] == 0 for name in self.counters),
        )


CONNECTION_HOURS = _Sums(
    models.connection_hours,
    ("hour", "client_type", "platform", "node_id"),
    ("connects", "disconnects", "connected_us", "closed", "closed_us"),
)
TALLIES = _Sums(models.tallies, ("kind", "start", "label"), ("count",))
DEVICE_DAYS = _Sums(
    models.device_days,
    ("client_id", "day"),
    ("connections", "connected_us"),
    (("first_connected_at", "least"),),
)
ONLINE_COUNTS = _Sums(
    models.online_counts, ("client_type", "platform", "node_id"), ("connections",)
)
CLIENT_ACTIVITY = _Sums(
    models.client_activity, ("client_id",), (), (("last_connected_at", "greatest"),)
)
#: Every rollup table, for clearing them all.
TABLES = (CONNECTION_HOURS, TALLIES, DEVICE_DAYS, ONLINE_COUNTS, CLIENT_ACTIVITY)

_CONNECTS, _DISCONNECTS, _CONNECTED_US, _CLOSED, _CLOSED_US = range(5)


_HOUR_US, _DAY_US = micros(HOUR), micros(DAY)
#: Per level: its span in microseconds and the kinds of its tallies.
_LEVELS_US = tuple(
    (
        micros(span),
        kind(OPENED_CLOSED_BY_REASON, level),
        kind(DURATIONS, level),
        kind(SESSIONS_BY_STATE, level),
    )
    for span, level in LEVELS
)


class Delta:
    """Contributions added and taken back, summed per rollup row until :meth:`statements`
    (times as microseconds since the epoch until then: cheaper to add up)."""

    def __init__(self) -> None:
        self.hours: defaultdict[tuple[int, str, str, str], list[int]] = defaultdict(
            lambda: [0, 0, 0, 0, 0]
        )
        self.tallies: defaultdict[tuple[str, int, str], int] = defaultdict(int)
        self.device_days: dict[tuple[str, int], list[int]] = {}
        self.online: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.activity: dict[str, datetime] = {}

    def connection(self, row: ConnectionFacts, sign: int = 1, *, opening: bool = True) -> None:
        """Add (``sign`` 1) or take back (-1) the contribution of a connection row. Only an
        added ``opening`` moves ``client_activity`` (prune recomputes it for what it
        deletes)."""
        dims = (row.client_type, row.platform, row.node_id)
        hours = self.hours
        began = _since_epoch(row.connected_at)
        opened = began - began % _HOUR_US
        figures = hours[(opened, *dims)]
        figures[_CONNECTS] += sign
        if sign > 0 and opening:
            latest = self.activity.get(row.client_id)
            if latest is None or row.connected_at > latest:
                self.activity[row.client_id] = row.connected_at
        if row.disconnected_at is None:
            self.online[dims] += sign
            return
        ended = _since_epoch(row.disconnected_at)
        duration = ended - began
        figures[_CLOSED] += sign
        figures[_CLOSED_US] += sign * duration
        closed = ended - ended % _HOUR_US
        hours[(closed, *dims)][_DISCONNECTS] += sign
        for start, us in _spread(began, ended, _HOUR_US):
            hours[(start, *dims)][_CONNECTED_US] += sign * us
        reason = row.close_reason or ""
        tallies = self.tallies
        tallies[(CLOSED_BY_REASON, closed, reason)] += sign
        bucket = duration_bucket(duration)
        coarse = str(coarse_bucket(bucket))
        fine = str(bucket)
        for span, by_reason, durations, _sessions in _LEVELS_US:
            start = began - began % span
            tallies[(by_reason, start, reason)] += sign
            tallies[(durations, start, coarse)] += sign
            tallies[(f"{durations}/{coarse}", start, fine)] += sign  # kind(..., coarse)
        if row.client_type == DEVICE:
            for day, us in _spread(began, ended, _DAY_US):
                of_day = self.device_days.setdefault((row.client_id, day), [0, 0, began])
                of_day[0] += sign
                of_day[1] += sign * us
                of_day[2] = min(of_day[2], began)

    def close(self, before: ConnectionFacts, after: ConnectionFacts) -> None:
        """A connection row changed from ``before`` to ``after`` (its opening unchanged)."""
        self.connection(before, -1)
        self.connection(after, opening=False)

    def session(self, created_at: datetime, state: str, sign: int = 1) -> None:
        """Add or take back a session row (counted per period of creation, by state)."""
        created = _since_epoch(created_at)
        for span, _by_reason, _durations, sessions in _LEVELS_US:
            self.tallies[(sessions, created - created % span, state)] += sign

    def _rows(self) -> Iterator[tuple[_Sums, list[dict[str, Any]]]]:
        times: dict[int, datetime] = {}

        def at(us: int) -> datetime:  # one datetime per distinct instant
            moment = times.get(us)
            if moment is None:
                moment = times[us] = EPOCH + timedelta(microseconds=us)
            return moment

        hours = [
            {
                "hour": at(hour),
                "client_type": client_type,
                "platform": platform,
                "node_id": node_id,
                **dict(zip(CONNECTION_HOURS.counters, figures, strict=True)),
            }
            for (hour, client_type, platform, node_id), figures in self.hours.items()
            if any(figures)
        ]
        tallies = [
            {"kind": tally_kind, "start": at(start), "label": label, "count": count}
            for (tally_kind, start, label), count in self.tallies.items()
            if count
        ]
        days = [
            {
                "client_id": client_id,
                "day": at(day),
                "connections": count,
                "connected_us": us,
                "first_connected_at": at(first),
            }
            for (client_id, day), (count, us, first) in self.device_days.items()
            if count or us
        ]
        online = [
            {"client_type": kind, "platform": platform, "node_id": node, "connections": count}
            for (kind, platform, node), count in self.online.items()
            if count
        ]
        activity = [
            {"client_id": client_id, "last_connected_at": latest}
            for client_id, latest in self.activity.items()
        ]
        for sums, rows in (
            (CONNECTION_HOURS, hours),
            (TALLIES, tallies),
            (DEVICE_DAYS, days),
            (ONLINE_COUNTS, online),
            (CLIENT_ACTIVITY, activity),
        ):
            if rows:
                # In key order: writers of several nodes then lock shared rows (the tallies)
                # in the same order, and cannot deadlock each other on PostgreSQL.
                rows.sort(key=itemgetter(*sums.key))
                yield sums, rows

    def statements(
        self, dialect_name: str, *, empty: bool = False
    ) -> list[tuple[UpdateBase, list[dict[str, Any]]]]:
        """The upserts that add this delta to the tables (each key once per statement), or
        plain inserts into ``empty`` tables."""
        return [
            (insert(sums.table) if empty else _upsert(sums, dialect_name), rows)
            for sums, rows in self._rows()
        ]

    def cleanup(self) -> list[tuple[Executable, list[dict[str, Any]]]]:
        """Deletes of the rows this delta touched that hold nothing any more (after taking
        contributions back)."""
        return [
            (sums.delete_empty(), [{name: row[name] for name in sums.key} for row in rows])
            for sums, rows in self._rows()
            if sums.counters
        ]


@cache
def _upsert(sums: _Sums, dialect_name: str) -> UpdateBase:
    """A rollup table's upsert, built once per dialect (only its rows change)."""
    return sums.upsert(dialect_name)


@cache
def _stored_facts() -> Executable:
    c = models.connections.c
    ids: Any = bindparam("ids", expanding=True)
    return select(c.connection_id, *connection_facts()).where(c.connection_id.in_(ids))


@cache
def _stored_sessions() -> Executable:
    s = models.sessions.c
    ids: Any = bindparam("ids", expanding=True)
    return select(s.session_id, s.created_at, s.state).where(s.session_id.in_(ids))


async def apply(connection: AsyncConnection, delta: Delta, *, cleanup: bool = False) -> None:
    """Add ``delta`` to the rollups inside the caller's transaction (and, with ``cleanup``,
    delete the rows it emptied)."""
    for statement, rows in delta.statements(connection.dialect.name):
        await connection.execute(statement, rows)
    if cleanup:
        for empty, keys in delta.cleanup():
            await connection.execute(empty, keys)


async def stored_facts(
    connection: AsyncConnection, connection_ids: Sequence[str]
) -> list[tuple[str, ConnectionFacts]]:
    """``(connection id, facts)`` of the named connection rows as they are now."""
    found: list[tuple[str, ConnectionFacts]] = []
    for chunk in _chunks(connection_ids):
        rows = (await connection.execute(_stored_facts(), {"ids": list(chunk)})).all()
        found.extend((row[0], ConnectionFacts(*row[1:])) for row in rows)
    return found


async def stored_sessions(
    connection: AsyncConnection, session_ids: Sequence[str]
) -> dict[str, tuple[datetime, str]]:
    """``session id -> (created_at, state)`` of the named session rows that exist."""
    found: dict[str, tuple[datetime, str]] = {}
    for chunk in _chunks(session_ids):
        rows = (await connection.execute(_stored_sessions(), {"ids": list(chunk)})).all()
        found.update((session_id, (created_at, state)) for session_id, created_at, state in rows)
    return found


async def recount_activity(connection: AsyncConnection, client_ids: Iterable[str]) -> None:
    """Set ``client_activity`` of these clients from their remaining connection rows (after
    deleting some): the newest opening, or no row for a client without any."""
    a, c = models.client_activity.c, models.connections.c
    for chunk in _chunks(sorted(client_ids)):
        newest = (
            select(func.max(c.connected_at)).where(c.client_id == a.client_id).scalar_subquery()
        )
        await connection.execute(
            delete(models.client_activity).where(
                a.client_id.in_(chunk),
                ~exists().where(c.client_id == a.client_id),
            )
        )
        await connection.execute(
            update(models.client_activity)
            .where(a.client_id.in_(chunk))
            .values(last_connected_at=newest)
        )


def _chunks(values: Sequence[str], size: int = 500) -> Iterable[Sequence[str]]:
    """Slices short enough for one IN list (SQLite caps the bind parameters of a statement)."""
    return (values[i : i + size] for i in range(0, len(values), size))


def rebuild(connection: Connection) -> None:
    """Recompute every rollup from the rows (inside the caller's transaction): the backfill of
    the migration that adds them, and the way to bring them back in line with rows written
    behind the registry's back."""
    for sums in TABLES:
        connection.execute(delete(sums.table))
    delta = Delta()
    streamed = {"yield_per": 20_000}  # on the statements: a connection's options would stay
    for row in connection.execute(select(*connection_facts()), execution_options=streamed):
        delta.connection(ConnectionFacts(*row))
    s = models.sessions.c
    for created_at, state in connection.execute(
        select(s.created_at, s.state), execution_options=streamed
    ):
        delta.session(created_at, state)
    for statement, values in delta.statements(connection.dialect.name, empty=True):
        connection.execute(statement, values)
