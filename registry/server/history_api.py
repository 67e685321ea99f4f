"""Operator routes under ``/api``: history, sessions, device info, statistics and the audit
trail, answered from the store (cluster-wide), with cursor paging and capped page sizes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from registry.history import DEFAULT_LIMIT, MAX_LIMIT, History
from registry.server.api import API_ERRORS, NOT_FOUND, STORE_DOWN, Text, require_api_key
from registry.types import (
    AuditEvent,
    ClientSummary,
    ConnectionRecord,
    DeviceAvailability,
    DeviceInfoSnapshot,
    HourlyStatistics,
    Page,
    SessionDetail,
    SessionRecord,
    SessionState,
    Statistics,
)


def _history(request: Request) -> History:
    history: History = request.app.state.registry.history
    return history


HistoryDep = Annotated[History, Depends(_history)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"Page size, at most {MAX_LIMIT}.")]
Cursor = Annotated[Text | None, Query(description="next_cursor of the previous page.")]
Since = Annotated[datetime | None, Query(description="ISO 8601; naive times are UTC.")]
Until = Annotated[datetime | None, Query(description="ISO 8601, exclusive; naive is UTC.")]


_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)
#: The statistics window when only ``until`` is given (as History.statistics has it).
_STATS_WINDOW = timedelta(days=1)


def _utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC (naive times are UTC). An instant that UTC cannot hold as a datetime
    (year 1 with a positive offset, year 9999 with a negative one) becomes the first or last
    one it can: as the bound of a window it selects the same rows, where converting it
    later, to query the store, would fail."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return _EARLIEST if value.year == datetime.min.year else _LATEST


def _stats_window(since: datetime | None, until: datetime | None) -> dict[str, datetime | None]:
    """The statistics' window in UTC, starting at the first instant when the default day
    before ``until`` would begin before it."""
    start, end = _utc(since), _utc(until)
    if start is None and end is not None and end < _EARLIEST + _STATS_WINDOW:
        start = _EARLIEST
    return {"since": start, "until": end}


def _not_found(what: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"{what} not found")


def create_history_router() -> APIRouter:
    router = APIRouter(
        prefix="/api",
        dependencies=[Depends(require_api_key)],
        responses=API_ERRORS | STORE_DOWN,
    )

    @router.get("/clients/{client_id}", responses=NOT_FOUND)
    async def client(client_id: Text, request: Request, history: HistoryDep) -> ClientSummary:
        """Live info if the client is on this node, else what the store last knew;
        ``last_seen`` is now while the client is online, else when its last connection
        closed."""
        summary = await history.client(client_id)
        if summary is None:
            raise _not_found(f"Client '{client_id}'")
        live = request.app.state.registry.get_client_info(client_id)
        return summary.with_live(live)

    @router.get("/clients/{client_id}/connections")
    async def connections(
        client_id: Text,
        history: HistoryDep,
        since: Since = None,
        until: Until = None,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[ConnectionRecord]:
        """Connection history, newest first, with each connection's duration in seconds."""
        return await history.connections(
            client_id, since=_utc(since), until=_utc(until), limit=limit, cursor=cursor
        )

    @router.get("/sessions")
    async def sessions(
        history: HistoryDep,
        client: Text | None = None,
        role: Literal["owner", "executor"] | None = None,
        state: SessionState | None = None,
        since: Since = None,
        until: Until = None,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[SessionRecord]:
        """Sessions, newest first; ``client`` with ``role`` narrows to owned or executed."""
        return await history.sessions(
            client,
            role=role,
            state=state,
            since=_utc(since),
            until=_utc(until),
            limit=limit,
            cursor=cursor,
        )

    @router.get("/sessions/{session_id}", responses=NOT_FOUND)
    async def session(session_id: Text, history: HistoryDep) -> SessionDetail:
        """A session with its links and its audit events."""
        detail = await history.session(session_id)
        if detail is None:
            raise _not_found(f"Session '{session_id}'")
        return detail

    @router.get("/devices/{device_id}/info", responses=NOT_FOUND)
    async def device_info(device_id: Text, history: HistoryDep) -> DeviceInfoSnapshot:
        """The latest info snapshot, also while the device is offline."""
        snapshot = await history.latest_device_info(device_id)
        if snapshot is None:
            raise _not_found(f"Device info for '{device_id}'")
        return snapshot

    @router.get("/devices/{device_id}/info/history")
    async def device_info_history(
        device_id: Text,
        history: HistoryDep,
        since: Since = None,
        until: Until = None,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[DeviceInfoSnapshot]:
        """Info snapshots over time, newest first."""
        return await history.device_info(
            device_id, since=_utc(since), until=_utc(until), limit=limit, cursor=cursor
        )

    @router.get("/stats")
    async def stats(history: HistoryDep, since: Since = None, until: Until = None) -> Statistics:
        """Online now, and figures over a window (default: the last 24 hours). Per-device
        availability is paged at ``/api/stats/availability`` (``availability`` is null)."""
        return await history.statistics(**_stats_window(since, until), availability=False)

    @router.get("/stats/availability")
    async def stats_availability(
        history: HistoryDep,
        since: Since = None,
        until: Until = None,
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[DeviceAvailability]:
        """Per device with a connection in the window (default: the last 24 hours), by
        device id, the fraction of the window it was connected."""
        window = _stats_window(since, until)
        return await history.availability(**window, limit=limit, cursor=cursor)

    @router.get("/stats/hourly")
    async def stats_hourly(
        history: HistoryDep, since: Since = None, until: Until = None
    ) -> HourlyStatistics:
        """Per UTC hour of the window (whole hours, at most 31 days; default: the 24 hours
        ending with the current one): connections opened and closed, closes by reason, and
        connected seconds."""
        return await history.hourly(since=_utc(since), until=_utc(until))

    @router.get("/audit")
    async def audit(
        history: HistoryDep,
        kind: Text | None = None,
        client: Text | None = None,
        session: Text | None = None,
        since: Since = None,
        until: Until = None,
        order: Literal["asc", "desc"] = "asc",
        limit: Limit = DEFAULT_LIMIT,
        cursor: Cursor = None,
    ) -> Page[AuditEvent]:
        """The audit trail in event order (``order=desc`` for newest first)."""
        return await history.audit(
            kind=kind,
            client_id=client,
            session_id=session,
            since=_utc(since),
            until=_utc(until),
            newest_first=order == "desc",
            limit=limit,
            cursor=cursor,
        )

    return router
