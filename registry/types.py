"""Value types shared by the live map, the store and the API.

Records returned by queries are frozen dataclasses; ORM objects never leave the store.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar


class ClientType(enum.StrEnum):
    """Role of a connected client (same values as the AIP ``client_type``)."""

    DEVICE = "device"
    CONSTELLATION = "constellation"


class SessionState(enum.StrEnum):
    """Lifecycle state of a session.

    ``active`` and ``interrupted`` are live: ``interrupted`` is set by the registry alone, on a
    session that was active when its server run stopped (shut down or lost); it keeps its links
    so that its owner learns of it, and it stays until the owner re-opens (resumes) it or ends
    it. ``completed``, ``failed`` and ``cancelled`` are final: what a caller ends a session
    with, and the session's record from then on (its id cannot be opened again).
    """

    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def is_final(self) -> bool:
        """True for the states a session ends in (completed, failed, cancelled)."""
        return self not in (SessionState.ACTIVE, SessionState.INTERRUPTED)


class LinkRole(enum.StrEnum):
    """Which of the reference's two session maps a link belongs to."""

    CONSTELLATION = "constellation"
    DEVICE = "device"


class DuplicatePolicy(enum.StrEnum):
    """What ``add_client`` does with a client id that is already live on this node."""

    REFUSE = "refuse"
    REPLACE = "replace"


@dataclass(slots=True)
class ClientInfo:
    """One live client of this node, as in the reference ``WSManager``.

    The registry hands out copies: mutating one (or its ``metadata``) changes nothing inside.
    ``connect_time`` is a ``time.time()`` float like the reference's; ``connection_id`` names the
    row of the ``connections`` table that records this connection.
    """

    client_id: str
    platform: str
    websocket: Any
    client_type: ClientType
    metadata: dict[str, Any]
    connect_time: float
    connection_id: str = ""
    remote_address: str | None = None


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session this node knows: who asked for it (owner) and who runs it (executor)."""

    session_id: str
    owner_id: str | None
    executor_id: str | None
    task_name: str | None
    state: SessionState
    created_at: datetime
    ended_at: datetime | None = None
    end_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """One row of the connection history."""

    connection_id: str
    client_id: str
    node_id: str
    client_type: ClientType
    platform: str
    metadata: dict[str, Any]
    remote_address: str | None
    connected_at: datetime
    disconnected_at: datetime | None
    close_code: int | None
    close_reason: str | None
    #: Seconds connected, ``None`` while the connection is open.
    duration_seconds: float | None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One row of the session history."""

    session_id: str
    owner_id: str | None
    executor_id: str | None
    task_name: str | None
    state: SessionState
    node_id: str | None
    created_at: datetime
    ended_at: datetime | None
    end_reason: str | None


@dataclass(frozen=True, slots=True)
class DeviceInfoSnapshot:
    """A device's system information as captured at one time."""

    device_id: str
    captured_at: datetime
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One entry of the append-only audit trail; ``event_id`` orders the trail."""

    event_id: int
    at: datetime
    node_id: str | None
    kind: str
    client_id: str | None
    session_id: str | None
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Statistics:
    """Cluster-wide figures from the store.

    ``online_by_type`` and ``online_by_platform`` count open connections now. The window
    figures cover connections opened in ``[since, until)``: their count, distinct clients,
    closes by reason, and mean and 95th-percentile duration of the closed ones;
    ``sessions_by_state`` counts sessions created in the window; ``availability`` is, per
    device, the fraction of the window it was connected (``None`` when not asked for: see
    :class:`DeviceAvailability`). ``p95_duration_seconds`` comes from a sketch: within 2% of
    the exact 95th percentile.
    """

    since: datetime
    until: datetime
    online_by_type: dict[str, int]
    online_by_platform: dict[str, int]
    connections: int
    distinct_clients: int
    mean_duration_seconds: float | None
    p95_duration_seconds: float | None = None
    disconnects_by_reason: dict[str, int] = field(default_factory=dict)
    sessions_by_state: dict[str, int] = field(default_factory=dict)
    availability: dict[str, float] | None = None


@dataclass(frozen=True, slots=True)
class DeviceAvailability:
    """The fraction of a window a device had a connection open (until now at most, for
    connections still open), for each device with a connection in the window."""

    device_id: str
    availability: float


@dataclass(frozen=True, slots=True)
class HourFigures:
    """What happened in one UTC hour ``[hour, hour + 1 h)``, cluster-wide: connections opened
    (``connects``) and closed (``disconnects``, and by close reason, ``""`` for none), and the
    seconds of connection time inside the hour summed over all connections (open ones count
    up to now)."""

    hour: datetime
    connects: int = 0
    disconnects: int = 0
    disconnects_by_reason: dict[str, int] = field(default_factory=dict)
    connected_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class HourlyStatistics:
    """One :class:`HourFigures` per hour of ``[since, until)`` (whole hours), oldest first."""

    items: list[HourFigures]
    since: datetime
    until: datetime


@dataclass(frozen=True, slots=True)
class ClientSummary:
    """What is known of one client id: its last registration, first/last seen, how many
    connections it made, and whether one is open now (on any node, or on this one).

    ``last_seen`` is the time of the answer while the client is online, else when its last
    connection closed."""

    client_id: str
    client_type: str
    platform: str
    metadata: dict[str, Any]
    first_seen: datetime
    last_seen: datetime
    connection_count: int
    online: bool
    connected_at: datetime | None
    node_id: str | None
    on_this_node: bool = False

    def with_live(self, info: ClientInfo | None) -> ClientSummary:
        """This summary updated with the live info of this node, if the client is here."""
        if info is None:
            return self
        return replace(
            self,
            client_type=info.client_type.value,
            platform=info.platform,
            metadata=info.metadata,
            online=True,
            last_seen=datetime.now(UTC),
            connected_at=datetime.fromtimestamp(info.connect_time, UTC),
            on_this_node=True,
        )


@dataclass(frozen=True, slots=True)
class SessionLinkRecord:
    """One link of a session to a client in one of the two session maps."""

    client_id: str
    role: LinkRole
    bound_at: datetime
    unbound_at: datetime | None


@dataclass(frozen=True, slots=True)
class SessionDetail:
    """A session with its links and its audit events (in event order)."""

    session: SessionRecord
    links: list[SessionLinkRecord]
    events: list[AuditEvent]


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a query. Pass ``next_cursor`` back to get the next; ``None`` means last."""

    items: list[T] = field(default_factory=list)
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One server run (a row of ``nodes``) and how many connections are open on it now."""

    node_id: str
    name: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    stop_reason: str | None
    online: int
