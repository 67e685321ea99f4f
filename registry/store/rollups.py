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
within that relative error of the exact one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Executable, Table, and_, bindparam, delete, exists, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from registry.store import models
from registry.store.dialect import greatest, least, upsert

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)

#: Relative error of a percentile read from the duration sketch.
RELATIVE_ACCURACY = 0.02
GAMMA = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_LOG_GAMMA = math.log(GAMMA)

# Kinds of tallies (the ``kind`` column).
CLOSED_BY_REASON = "closed_by_reason"  # per hour of the close
OPENED_CLOSED_BY_REASON = "opened_closed_by_reason"  # per hour of the opening
SESSIONS_BY_STATE = "sessions_by_state"  # per hour of creation
#: Duration sketches per period of the opening, longest period first: a window is read from
#: as few rows as its whole days, six-hour blocks and hours allow.
DURATION_KINDS = (
    (DAY, "duration_day"),
    (6 * HOUR, "duration_6h"),
    (HOUR, "duration_hour"),
)

DEVICE = "device"


def floor(at: datetime, span: timedelta) -> datetime:
    """The start of the ``span``-long period (aligned on the Unix epoch, UTC) holding ``at``."""
    return EPOCH + (at - EPOCH) // span * span


def micros(delta: timedelta) -> int:
    return delta // MICROSECOND


def spread(began: datetime, ended: datetime, span: timedelta) -> Iterator[tuple[datetime, int]]:
    """``(period start, microseconds)`` for each ``span``-long period that ``[began, ended)``
    overlaps; a span of no length (or a negative one) lies in the period of ``began``, for 0."""
    start = floor(began, span)
    if ended <= began:
        yield start, 0
        return
    while start < ended:
        following = start + span
        yield start, micros(min(following, ended) - max(start, began))
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


def percentile_seconds(counts: dict[int, int], fraction: float) -> float | None:
    """The ``fraction`` percentile of the durations in a summed sketch (``bucket -> count``),
    nearest-rank as the exact ranking has it; None for no durations."""
    total = sum(counts.values())
    if total <= 0:
        return None
    rank = max(math.ceil(fraction * total) - 1, 0)
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen > rank:
            return bucket_seconds(bucket)
    raise AssertionError("a sketch's counts add up to its total")


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

    def upsert(self, dialect_name: str) -> Executable:
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


class Delta:
    """Contributions added and taken back, summed per rollup row until :meth:`statements`.

    Also what statistics read for the ragged ends of a window, from the rows themselves:
    :attr:`hours`, :attr:`tallies` and :meth:`durations` hold the same figures the tables do.
    """

    def __init__(self) -> None:
        self.hours: defaultdict[tuple[datetime, str, str, str], list[int]] = defaultdict(
            lambda: [0, 0, 0, 0, 0]
        )
        self.tallies: defaultdict[tuple[str, datetime, str], int] = defaultdict(int)
        self.device_days: dict[tuple[str, datetime], list[Any]] = {}
        self.online: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.activity: dict[str, datetime] = {}

    def connection(self, row: ConnectionFacts, sign: int = 1, *, opening: bool = True) -> None:
        """Add (``sign`` 1) or take back (-1) the contribution of a connection row. Only an
        added ``opening`` moves ``client_activity`` (prune recomputes it for what it
        deletes)."""
        dims = (row.client_type, row.platform, row.node_id)
        began, ended = row.connected_at, row.disconnected_at
        opened = floor(began, HOUR)
        self.hours[(opened, *dims)][_CONNECTS] += sign
        if sign > 0 and opening:
            latest = self.activity.get(row.client_id)
            self.activity[row.client_id] = began if latest is None else max(latest, began)
        if ended is None:
            self.online[dims] += sign
            return
        duration = micros(ended - began)
        figures = self.hours[(opened, *dims)]
        figures[_CLOSED] += sign
        figures[_CLOSED_US] += sign * duration
        closed = floor(ended, HOUR)
        self.hours[(closed, *dims)][_DISCONNECTS] += sign
        for start, us in spread(began, ended, HOUR):
            self.hours[(start, *dims)][_CONNECTED_US] += sign * us
        reason = row.close_reason or ""
        self.tallies[(CLOSED_BY_REASON, closed, reason)] += sign
        self.tallies[(OPENED_CLOSED_BY_REASON, opened, reason)] += sign
        bucket = str(duration_bucket(duration))
        for span, kind in DURATION_KINDS:
            self.tallies[(kind, floor(began, span), bucket)] += sign
        if row.client_type == DEVICE:
            for day, us in spread(began, ended, DAY):
                figures_of_day = self.device_days.setdefault((row.client_id, day), [0, 0, began])
                figures_of_day[0] += sign
                figures_of_day[1] += sign * us
                figures_of_day[2] = min(figures_of_day[2], began)

    def close(self, before: ConnectionFacts, after: ConnectionFacts) -> None:
        """A connection row changed from ``before`` to ``after`` (its opening unchanged)."""
        self.connection(before, -1)
        self.connection(after, opening=False)

    def session(self, created_at: datetime, state: str, sign: int = 1) -> None:
        """Add or take back a session row (counted per hour of creation, by state)."""
        self.tallies[(SESSIONS_BY_STATE, floor(created_at, HOUR), state)] += sign

    def durations(self) -> dict[int, int]:
        """The duration sketch of what was added (one period length of it: they agree)."""
        kind = DURATION_KINDS[-1][1]
        counts: defaultdict[int, int] = defaultdict(int)
        for (tally_kind, _start, label), count in self.tallies.items():
            if tally_kind == kind:
                counts[int(label)] += count
        return counts

    def _rows(self) -> Iterator[tuple[_Sums, list[dict[str, Any]]]]:
        hours = [
            dict(
                zip(CONNECTION_HOURS.key + CONNECTION_HOURS.counters, (*key, *figures), strict=True)
            )
            for key, figures in self.hours.items()
            if any(figures)
        ]
        tallies = [
            {"kind": kind, "start": start, "label": label, "count": count}
            for (kind, start, label), count in self.tallies.items()
            if count
        ]
        days = [
            {
                "client_id": client_id,
                "day": day,
                "connections": count,
                "connected_us": us,
                "first_connected_at": first,
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
            {"client_id": client_id, "last_connected_at": at}
            for client_id, at in self.activity.items()
        ]
        for sums, rows in (
            (CONNECTION_HOURS, hours),
            (TALLIES, tallies),
            (DEVICE_DAYS, days),
            (ONLINE_COUNTS, online),
            (CLIENT_ACTIVITY, activity),
        ):
            if rows:
                yield sums, rows

    def statements(self, dialect_name: str) -> list[tuple[Executable, list[dict[str, Any]]]]:
        """The upserts that add this delta to the tables (each key once per statement)."""
        return [(sums.upsert(dialect_name), rows) for sums, rows in self._rows()]

    def cleanup(self) -> list[tuple[Executable, list[dict[str, Any]]]]:
        """Deletes of the rows this delta touched that hold nothing any more (after taking
        contributions back)."""
        return [
            (sums.delete_empty(), [{name: row[name] for name in sums.key} for row in rows])
            for sums, rows in self._rows()
            if sums.counters
        ]


async def apply(connection: AsyncConnection, delta: Delta, *, cleanup: bool = False) -> None:
    """Add ``delta`` to the rollups inside the caller's transaction (and, with ``cleanup``,
    delete the rows it emptied)."""
    for statement, rows in delta.statements(connection.dialect.name):
        await connection.execute(statement, rows)
    if cleanup:
        for statement, rows in delta.cleanup():
            await connection.execute(statement, rows)


async def stored_facts(
    connection: AsyncConnection, connection_ids: Sequence[str]
) -> list[tuple[str, ConnectionFacts]]:
    """``(connection id, facts)`` of the named connection rows as they are now."""
    c = models.connections.c
    found: list[tuple[str, ConnectionFacts]] = []
    for chunk in _chunks(connection_ids):
        rows = await connection.execute(
            select(c.connection_id, *connection_facts()).where(c.connection_id.in_(chunk))
        )
        found.extend((row[0], ConnectionFacts(*row[1:])) for row in rows)
    return found


async def stored_sessions(
    connection: AsyncConnection, session_ids: Sequence[str]
) -> dict[str, tuple[datetime, str]]:
    """``session id -> (created_at, state)`` of the named session rows that exist."""
    s = models.sessions.c
    found: dict[str, tuple[datetime, str]] = {}
    for chunk in _chunks(session_ids):
        rows = await connection.execute(
            select(s.session_id, s.created_at, s.state).where(s.session_id.in_(chunk))
        )
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
    for statement, values in delta.statements(connection.dialect.name):
        connection.execute(statement, values)
