"""History and statistics: read-only SQL queries on the store, cluster-wide.

Everything here reads the database (never the live map), so the answers cover every node and
survive restarts. Pages are keyset-paged: a cursor names the last row returned, so rows inserted
meanwhile never shift or repeat a page.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from registry import statistics as rollup_statistics
from registry.errors import InvalidArgumentError, store_errors
from registry.store import models
from registry.types import (
    AuditEvent,
    ClientSummary,
    ClientType,
    ConnectionRecord,
    DeviceAvailability,
    DeviceInfoSnapshot,
    HourlyStatistics,
    LinkRole,
    NodeRecord,
    Page,
    SessionDetail,
    SessionLinkRecord,
    SessionRecord,
    SessionState,
    Statistics,
)
from registry.validation import storable_text

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Close reasons of connections that ended as they should: the client or an operator closed
#: them, or the server shut down cleanly. Every other reason is worth a look.
NORMAL_CLOSE_REASONS = ("client_closed", "going_away", "removed", "server_shutdown")
HOUR = timedelta(hours=1)
#: The longest window :meth:`History.hourly` answers (744 hours).
MAX_HOURLY_WINDOW = timedelta(days=31)

T = TypeVar("T")


def _limit(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgumentError("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return limit


def _aware(argument: str, value: datetime | None) -> datetime | None:
    if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
        raise InvalidArgumentError(argument, "must be a timezone-aware datetime")
    return value


def _text(argument: str, value: object, *, optional: bool = False) -> None:
    """Refuse a filter that is not a string, or that no backend could compare (a NUL, a lone
    surrogate), before it reaches SQL, where it would fail as a store error."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise InvalidArgumentError(argument, f"must be a string, not {type(value).__name__}")
    problem = storable_text(value)
    if problem is not None:
        raise InvalidArgumentError(argument, problem)


def encode_cursor(*key: Any) -> str:
    """An opaque cursor for a row's sort key (datetimes as ISO 8601)."""
    raw = [value.isoformat() if isinstance(value, datetime) else value for value in key]
    return base64.urlsafe_b64encode(json.dumps(raw).encode()).decode()


_BIGINT = (-(2**63), 2**63 - 1)


def _key_part(kind: type, value: Any) -> Any:
    """One part of a decoded sort key, as ``kind``; ValueError unless it is one exactly, and one
    the database can take (an integer fits the BIGINT key columns; a string holds no NUL or
    lone surrogate)."""
    if kind is datetime:
        if not isinstance(value, str):
            raise ValueError("not a time")
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            raise ValueError("naive datetime")
        return parsed.astimezone(UTC)  # OverflowError for an instant UTC cannot hold
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("not an integer")
        if not _BIGINT[0] <= value <= _BIGINT[1]:
            raise ValueError("integer out of range")
        return value
    if not isinstance(value, kind):
        raise ValueError(f"not a {kind.__name__}")
    if isinstance(value, str) and storable_text(value) is not None:
        raise ValueError("text no backend can compare")
    return value


def decode_cursor(cursor: str, *kinds: type) -> list[Any]:
    """The sort key in ``cursor``, checked against ``kinds``; InvalidArgumentError otherwise."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(raw, list) or len(raw) != len(kinds):
            raise ValueError("wrong shape")
        return [_key_part(kind, value) for kind, value in zip(kinds, raw, strict=True)]
    except (ValueError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
        raise InvalidArgumentError("cursor", "is not a cursor returned by this query") from exc


def _window(column: Any, since: datetime | None, until: datetime | None) -> list[Any]:
    conditions = []
    if _aware("since", since) is not None:
        conditions.append(column >= since)
    if _aware("until", until) is not None:
        conditions.append(column < until)
    return conditions


def _before(
    column: Any, at: datetime, tiebreak: Any, key: str
) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """Rows before ``(at, key)`` in ``(column, tiebreak)`` order, newest first: ``column < at
    OR (column = at AND tiebreak < key)``, written as ``column <= at AND (column < at OR
    tiebreak < key)`` so that the bound on ``column`` is a plain range an index can seek to.
    (A top-level OR makes SQLite, once ANALYZEd, read every older row of a client through two
    index scans and sort them all, 50 ms for 20,000 rows instead of 2 ms.)"""
    return column <= at, or_(column < at, tiebreak < key)


class History:
    """Read-only queries on the store (cluster-wide, independent of any live map)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def _rows(self, query: Select[Any]) -> Sequence[Any]:
        with store_errors("history query failed"):
            async with self._engine.connect() as connection:
                rows: Sequence[Any] = (await connection.execute(query)).all()
                return rows

    async def _page(
        self,
        query: Select[Any],
        limit: int,
        record: Callable[[Any], T],
        key: Callable[[Any], tuple[Any, ...]],
    ) -> Page[T]:
        rows = await self._rows(query.limit(_limit(limit) + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(
            items=[record(row) for row in rows],
            next_cursor=encode_cursor(*key(rows[-1])) if more else None,
        )

    async def session_status(self, session_id: str) -> tuple[str | None, SessionState] | None:
        """The stored owner and state of a session id, or None if it was never seen."""
        _text("session_id", session_id)
        s = models.sessions.c
        rows = await self._rows(select(s.owner_id, s.state).where(s.session_id == session_id))
        return (rows[0][0], SessionState(rows[0][1])) if rows else None

    async def connections(
        self,
        client_id: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[ConnectionRecord]:
        """Connections of one client opened in ``[since, until)``, newest first."""
        _text("client_id", client_id)
        c = models.connections.c
        conditions: list[ColumnElement[bool]] = [
            c.client_id == client_id,
            *_window(c.connected_at, since, until),
        ]
        if cursor is not None:
            at, connection_id = decode_cursor(cursor, datetime, str)
            conditions.extend(_before(c.connected_at, at, c.connection_id, connection_id))
        query = (
            select(models.connections)
            .where(*conditions)
            .order_by(c.connected_at.desc(), c.connection_id.desc())
        )
        return await self._page(
            query, limit, _connection_record, lambda row: (row.connected_at, row.connection_id)
        )

    async def open_connections(
        self,
        *,
        client_type: ClientType | str | None = None,
        platform: str | None = None,
        node_id: str | None = None,
        search: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[ConnectionRecord]:
        """Connections open now on any node, newest first; ``client_type`` and ``platform``
        (in any case, as the live lookups compare it), ``node_id`` and ``search`` (a part of
        the client id, in any case) narrow them."""
        _text("platform", platform, optional=True)
        _text("node_id", node_id, optional=True)
        _text("search", search, optional=True)
        c = models.connections.c
        conditions: list[ColumnElement[bool]] = [c.disconnected_at.is_(None)]
        if node_id is not None:
            conditions.append(c.node_id == node_id)
        if search:
            conditions.append(func.lower(c.client_id).contains(search.lower(), autoescape=True))
        if client_type is not None:
            try:
                conditions.append(c.client_type == ClientType(client_type).value)
            except ValueError:
                raise InvalidArgumentError(
                    "client_type", f"unknown client type {client_type!r}"
                ) from None
        if platform is not None:
            conditions.append(func.lower(c.platform) == platform.lower())
        if cursor is not None:
            at, connection_id = decode_cursor(cursor, datetime, str)
            conditions.extend(_before(c.connected_at, at, c.connection_id, connection_id))
        query = (
            select(models.connections)
            .where(*conditions)
            .order_by(c.connected_at.desc(), c.connection_id.desc())
        )
        return await self._page(
            query, limit, _connection_record, lambda row: (row.connected_at, row.connection_id)
        )

    async def sessions(
        self,
        client_id: str | None = None,
        *,
        role: str | None = None,
        state: SessionState | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[SessionRecord]:
        """Sessions created in ``[since, until)``, newest first; with ``client_id``, those it
        owned or executed (``role`` ``"owner"`` or ``"executor"`` narrows to one); with
        ``state``, those in that state."""
        _text("client_id", client_id, optional=True)
        s = models.sessions.c
        conditions = _window(s.created_at, since, until)
        if role not in (None, "owner", "executor"):
            raise InvalidArgumentError("role", f"must be 'owner' or 'executor', not {role!r}")
        if role is not None and client_id is None:
            raise InvalidArgumentError("role", "needs a client to filter by")
        if role == "owner":
            conditions.append(s.owner_id == client_id)
        elif role == "executor":
            conditions.append(s.executor_id == client_id)
        elif client_id is not None:
            conditions.append(or_(s.owner_id == client_id, s.executor_id == client_id))
        if state is not None:
            try:
                conditions.append(s.state == SessionState(state).value)
            except ValueError:
                raise InvalidArgumentError("state", f"unknown session state {state!r}") from None
        if cursor is not None:
            at, session_id = decode_cursor(cursor, datetime, str)
            conditions.extend(_before(s.created_at, at, s.session_id, session_id))
        query = (
            select(models.sessions)
            .where(*conditions)
            .order_by(s.created_at.desc(), s.session_id.desc())
        )
        return await self._page(
            query, limit, _session_record, lambda row: (row.created_at, row.session_id)
        )

    async def device_info(
        self,
        device_id: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[DeviceInfoSnapshot]:
        """Snapshots of a device's info captured in ``[since, until)``, newest first."""
        _text("device_id", device_id)
        d = models.device_info_snapshots.c
        conditions = [d.device_id == device_id, *_window(d.captured_at, since, until)]
        if cursor is not None:
            (snapshot_id,) = decode_cursor(cursor, int)
            conditions.append(d.snapshot_id < snapshot_id)
        query = (
            select(d.snapshot_id, d.device_id, d.captured_at, d.info)
            .where(*conditions)
            .order_by(d.snapshot_id.desc())
        )
        return await self._page(
            query,
            limit,
            lambda row: DeviceInfoSnapshot(row.device_id, row.captured_at, row.info),
            lambda row: (row.snapshot_id,),
        )

    async def audit(
        self,
        *,
        kind: str | None = None,
        client_id: str | None = None,
        session_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        newest_first: bool = False,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[AuditEvent]:
        """The audit trail in event order (or newest first), filtered by any of the fields."""
        a = models.audit_events.c
        conditions = _window(a.at, since, until)
        for column, value in ((a.kind, kind), (a.client_id, client_id), (a.session_id, session_id)):
            _text(column.name, value, optional=True)
            if value is not None:
                conditions.append(column == value)
        if cursor is not None:
            (event_id,) = decode_cursor(cursor, int)
            conditions.append(a.event_id < event_id if newest_first else a.event_id > event_id)
        query = (
            select(models.audit_events)
            .where(*conditions)
            .order_by(a.event_id.desc() if newest_first else a.event_id)
        )
        return await self._page(
            query,
            limit,
            _audit_event,
            lambda row: (row.event_id,),
        )

    async def client(self, client_id: str) -> ClientSummary | None:
        """What the store knows of ``client_id``, or None if it was never seen.

        ``last_seen`` is derived, not stored per heartbeat: now while a connection of the
        client is open (on any node), else when its last connection closed (by its server, or
        by recovery at the lost run's last heartbeat)."""
        _text("client_id", client_id)
        cl, c = models.clients.c, models.connections.c
        with store_errors("client query failed"):
            async with self._engine.connect() as connection:
                row = (
                    await connection.execute(
                        select(models.clients).where(cl.client_id == client_id)
                    )
                ).first()
                if row is None:
                    return None
                count, last_closed = (
                    await connection.execute(
                        select(func.count(), func.max(c.disconnected_at)).where(
                            c.client_id == client_id
                        )
                    )
                ).one()
                live = (
                    await connection.execute(
                        select(c.connected_at, c.node_id)
                        .where(c.client_id == client_id, c.disconnected_at.is_(None))
                        .order_by(c.connected_at.desc())
                        .limit(1)
                    )
                ).first()
        if live is not None:
            last_seen = datetime.now(UTC)
        else:  # the clients row keeps the time of a close whose connection row was pruned
            last_seen = row.last_seen if last_closed is None else max(row.last_seen, last_closed)
        return ClientSummary(
            client_id=row.client_id,
            client_type=row.client_type,
            platform=row.platform,
            metadata=row.metadata,
            first_seen=row.first_seen,
            last_seen=last_seen,
            connection_count=count,
            online=live is not None,
            connected_at=live.connected_at if live else None,
            node_id=live.node_id if live else None,
        )

    async def session(self, session_id: str) -> SessionDetail | None:
        """A session with its links and its audit events, or None if never seen."""
        _text("session_id", session_id)
        s, link, a = models.sessions.c, models.session_links.c, models.audit_events.c
        with store_errors("session query failed"):
            async with self._engine.connect() as connection:
                row = (
                    await connection.execute(
                        select(models.sessions).where(s.session_id == session_id)
                    )
                ).first()
                if row is None:
                    return None
                links = await connection.execute(
                    select(link.client_id, link.role, link.bound_at, link.unbound_at)
                    .where(link.session_id == session_id)
                    .order_by(link.bound_at, link.link_id)
                )
                events = await connection.execute(
                    select(models.audit_events)
                    .where(a.session_id == session_id)
                    .order_by(a.event_id)
                    .limit(MAX_LIMIT)
                )
                return SessionDetail(
                    session=_session_record(row),
                    links=[
                        SessionLinkRecord(r.client_id, LinkRole(r.role), r.bound_at, r.unbound_at)
                        for r in links
                    ],
                    events=[_audit_event(r) for r in events],
                )

    async def latest_device_info(self, device_id: str) -> DeviceInfoSnapshot | None:
        """The newest info snapshot of a device, or None."""
        page = await self.device_info(device_id, limit=1)
        return page.items[0] if page.items else None

    async def statistics(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        availability: bool = True,
    ) -> Statistics:
        """Open connections now by type and platform (platforms lower-cased, as the live
        lookups compare them), and figures for connections opened in ``[since, until)``
        (default: the last 24 hours); see :class:`~registry.types.Statistics`. Read from the
        rollups, so the cost hardly grows with the window; ``availability=False`` leaves out
        the per-device figures, which cost a pass over every device (see
        :meth:`availability` for them a page at a time)."""
        since, until = _statistics_window(since, until)
        with store_errors("statistics query failed"):
            async with self._engine.connect() as connection:
                figures = await rollup_statistics.statistics(connection, since, until, None)
        if not availability:
            return figures
        devices: dict[str, float] = {}
        cursor: str | None = None
        while True:
            page = await self.availability(since=since, until=until, limit=MAX_LIMIT, cursor=cursor)
            devices.update((item.device_id, item.availability) for item in page.items)
            if page.next_cursor is None:
                return replace(figures, availability=devices)
            cursor = page.next_cursor

    async def availability(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[DeviceAvailability]:
        """Per device with a connection in ``[since, until)`` (default: the last 24 hours),
        by device id, the fraction of the window it was connected (until now at most, for
        connections still open): the meaning of :attr:`Statistics.availability`."""
        since, until = _statistics_window(since, until)
        after = None if cursor is None else decode_cursor(cursor, str)[0]
        with store_errors("availability query failed"):
            async with self._engine.connect() as connection:
                items, more = await rollup_statistics.availability_page(
                    connection, since, until, after, _limit(limit)
                )
        return Page(items=items, next_cursor=encode_cursor(items[-1].device_id) if more else None)

    async def hourly(
        self, *, since: datetime | None = None, until: datetime | None = None
    ) -> HourlyStatistics:
        """Figures of every UTC hour that overlaps ``[since, until)`` (see
        :class:`~registry.types.HourFigures`), zeros included, oldest first. The window is
        widened to whole hours (the answer's ``since`` and ``until``); by default it is the 24
        hours that end with the current one. At most :data:`MAX_HOURLY_WINDOW`."""
        until = _aware("until", until) or datetime.now(UTC)
        end = _hour_ceiling(until)
        since = _aware("since", since)
        if since is None:  # a day back, or from the first hour there is
            since = max(end, _FIRST_HOUR + timedelta(days=1)) - timedelta(days=1)
        start = _hour_floor(since)
        if start > end:
            raise InvalidArgumentError("since", "must not be after until")
        if end - start > MAX_HOURLY_WINDOW:
            raise InvalidArgumentError(
                "since", f"the window is at most {MAX_HOURLY_WINDOW.days} days of whole hours"
            )
        with store_errors("hourly statistics failed"):
            async with self._engine.connect() as connection:
                items = await rollup_statistics.hourly(connection, start, end)
        return HourlyStatistics(items=items, since=start, until=end)

    async def nodes(self, *, running_only: bool = False) -> list[NodeRecord]:
        """Server runs, newest first (only those not stopped with ``running_only``), each
        with the number of connections open on it now."""
        n, c = models.nodes.c, models.connections.c
        online = (
            select(c.node_id, func.count().label("online"))
            .where(c.disconnected_at.is_(None))
            .group_by(c.node_id)
            .subquery()
        )
        query = (
            select(models.nodes, func.coalesce(online.c.online, 0).label("online"))
            .outerjoin(online, online.c.node_id == n.node_id)
            .order_by(n.started_at.desc(), n.node_id)
            .limit(MAX_LIMIT)
        )
        if running_only:
            query = query.where(n.stopped_at.is_(None))
        rows = await self._rows(query)
        return [
            NodeRecord(
                node_id=row.node_id,
                name=row.name,
                hostname=row.hostname,
                pid=row.pid,
                started_at=row.started_at,
                heartbeat_at=row.heartbeat_at,
                stopped_at=row.stopped_at,
                stop_reason=row.stop_reason,
                online=row.online,
            )
            for row in rows
        ]

    async def disconnects(
        self,
        *,
        abnormal: bool = False,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> Page[ConnectionRecord]:
        """Connections closed in ``[since, until)``, newest close first; with ``abnormal``,
        only those whose reason is not one of :data:`NORMAL_CLOSE_REASONS`."""
        c = models.connections.c
        conditions = [c.disconnected_at.is_not(None), *_window(c.disconnected_at, since, until)]
        if abnormal:
            conditions.append(
                or_(c.close_reason.is_(None), c.close_reason.not_in(NORMAL_CLOSE_REASONS))
            )
        if cursor is not None:
            at, connection_id = decode_cursor(cursor, datetime, str)
            conditions.extend(_before(c.disconnected_at, at, c.connection_id, connection_id))
        query = (
            select(models.connections)
            .where(*conditions)
            .order_by(c.disconnected_at.desc(), c.connection_id.desc())
        )
        return await self._page(
            query, limit, _connection_record, lambda row: (row.disconnected_at, row.connection_id)
        )


_FIRST_HOUR = datetime.min.replace(tzinfo=UTC)


def _statistics_window(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    """The window of the statistics: ``until`` defaults to now, ``since`` to a day before."""
    until = _aware("until", until) or datetime.now(UTC)
    since = _aware("since", since) or until - timedelta(days=1)
    if since > until:
        raise InvalidArgumentError("since", "must not be after until")
    return since, until


def _hour_floor(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _hour_ceiling(at: datetime) -> datetime:
    floor = _hour_floor(at)
    if floor == at:
        return floor
    try:
        return floor + HOUR
    except OverflowError:
        raise InvalidArgumentError("until", "is later than the last whole hour") from None


def _connection_record(row: Any) -> ConnectionRecord:
    return ConnectionRecord(
        connection_id=row.connection_id,
        client_id=row.client_id,
        node_id=row.node_id,
        client_type=ClientType(row.client_type),
        platform=row.platform,
        metadata=row.metadata,
        remote_address=row.remote_address,
        connected_at=row.connected_at,
        disconnected_at=row.disconnected_at,
        close_code=row.close_code,
        close_reason=row.close_reason,
        duration_seconds=(
            None
            if row.disconnected_at is None
            else (row.disconnected_at - row.connected_at).total_seconds()
        ),
    )


def _session_record(row: Any) -> SessionRecord:
    return SessionRecord(
        session_id=row.session_id,
        owner_id=row.owner_id,
        executor_id=row.executor_id,
        task_name=row.task_name,
        state=SessionState(row.state),
        node_id=row.node_id,
        created_at=row.created_at,
        ended_at=row.ended_at,
        end_reason=row.end_reason,
    )


def _audit_event(row: Any) -> AuditEvent:
    return AuditEvent(
        row.event_id, row.at, row.node_id, row.kind, row.client_id, row.session_id, row.details
    )
