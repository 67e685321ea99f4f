"""Table definitions: the single source of the schema (Alembic migrations must match them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    Refuses naive datetimes on the way in; on the way out attaches UTC where the backend
    (SQLite) does not keep the zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: registry timestamps must be aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONDocument = JSON().with_variant(JSONB(), "postgresql")
ID = String(255)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Node(Base):
    """One row per server process run."""

    __tablename__ = "nodes"

    node_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(ID)
    hostname: Mapped[str] = mapped_column(ID)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    stop_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (
        Index(
            "ix_nodes_running",
            "name",
            sqlite_where=text("stopped_at IS NULL"),
            postgresql_where=text("stopped_at IS NULL"),
        ),
    )


class Client(Base):
    """One row per client id ever seen."""

    __tablename__ = "clients"

    client_id: Mapped[str] = mapped_column(ID, primary_key=True)
    client_type: Mapped[str] = mapped_column(String(32))
    platform: Mapped[str] = mapped_column(ID)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONDocument)


class Connection(Base):
    """One row per connection, open while ``disconnected_at`` is NULL."""

    __tablename__ = "connections"

    connection_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.client_id"))
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.node_id"))
    client_type: Mapped[str] = mapped_column(String(32))
    platform: Mapped[str] = mapped_column(ID)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONDocument)
    remote_address: Mapped[str | None] = mapped_column(ID, nullable=True)
    connected_at: Mapped[datetime] = mapped_column(UTCDateTime)
    disconnected_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    close_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    close_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ix_connections_client_id_connected_at", "client_id", "connected_at"),
        Index("ix_connections_connected_at", "connected_at"),
        Index("ix_connections_disconnected_at", "disconnected_at"),
        Index(
            "ix_connections_open",
            "node_id",
            sqlite_where=text("disconnected_at IS NULL"),
            postgresql_where=text("disconnected_at IS NULL"),
        ),
    )


class Session(Base):
    """One row per session id: who asked (owner), who ran it (executor), how it ended."""

    __tablename__ = "sessions"

    session_id: Mapped[str] = mapped_column(ID, primary_key=True)
    owner_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    executor_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    task_name: Mapped[str | None] = mapped_column(ID, nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    node_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    end_reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ix_sessions_owner_id_created_at", "owner_id", "created_at"),
        Index("ix_sessions_executor_id_created_at", "executor_id", "created_at"),
        Index("ix_sessions_created_at", "created_at"),
        Index(
            "ix_sessions_active",
            "node_id",
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )


class SessionLink(Base):
    """The reference's constellation→sessions and device→sessions maps, with bound times."""

    __tablename__ = "session_links"

    link_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.session_id"))
    client_id: Mapped[str] = mapped_column(ID)
    role: Mapped[str] = mapped_column(String(16))
    bound_at: Mapped[datetime] = mapped_column(UTCDateTime)
    unbound_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        Index("ix_session_links_session_id", "session_id"),
        Index("ix_session_links_client_id_bound_at", "client_id", "bound_at"),
        Index(
            "ix_session_links_open",
            "session_id",
            sqlite_where=text("unbound_at IS NULL"),
            postgresql_where=text("unbound_at IS NULL"),
        ),
    )


class DeviceInfoSnapshot(Base):
    """A device's info document; a new row only when the document changes."""

    __tablename__ = "device_info_snapshots"

    snapshot_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    device_id: Mapped[str] = mapped_column(ID)
    captured_at: Mapped[datetime] = mapped_column(UTCDateTime)
    digest: Mapped[str] = mapped_column(String(64))
    info: Mapped[dict[str, Any]] = mapped_column(JSONDocument)

    __table_args__ = (
        Index("ix_device_info_snapshots_device_id_snapshot_id", "device_id", "snapshot_id"),
    )


class AuditEvent(Base):
    """Append-only audit trail; ``event_id`` is the order of events."""

    __tablename__ = "audit_events"

    event_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    node_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    kind: Mapped[str] = mapped_column(String(64))
    client_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    session_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSONDocument)

    __table_args__ = (
        Index("ix_audit_events_at", "at"),
        Index("ix_audit_events_kind_event_id", "kind", "event_id"),
        Index("ix_audit_events_client_id_event_id", "client_id", "event_id"),
        Index("ix_audit_events_session_id_event_id", "session_id", "event_id"),
    )


# -- rollups: kept by the writer beside the rows they summarise (see registry.store.rollups) --
# Clustered on their keys on SQLite (WITHOUT ROWID): the statistics read ranges of them.


class ConnectionHour(Base):
    """Per UTC hour and client type, platform and node: connections opened in the hour, closed
    in the hour, microseconds of closed connections inside it, and of the connections opened in
    it those closed since, with their total duration."""

    __tablename__ = "connection_hours"

    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    client_type: Mapped[str] = mapped_column(String(32), primary_key=True)
    platform: Mapped[str] = mapped_column(ID, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    connects: Mapped[int] = mapped_column(BigInteger)
    disconnects: Mapped[int] = mapped_column(BigInteger)
    connected_us: Mapped[int] = mapped_column(BigInteger)
    closed: Mapped[int] = mapped_column(BigInteger)
    closed_us: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = ({"sqlite_with_rowid": False},)


class Tally(Base):
    """A count per kind, period start and label: closes by reason (per hour of the close, and
    per hour of the opening), sessions by state (per hour of creation), connection durations
    by sketch bucket (per hour, six hours and day of the opening)."""

    __tablename__ = "tallies"

    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    start: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    label: Mapped[str] = mapped_column(Text, primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = ({"sqlite_with_rowid": False},)


class DeviceDay(Base):
    """Per device and UTC day: how many closed connections overlap the day, the microseconds
    they cover in it, and the earliest opening among them (a lower bound once pruned)."""

    __tablename__ = "device_days"

    client_id: Mapped[str] = mapped_column(ID, primary_key=True)
    day: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    connections: Mapped[int] = mapped_column(BigInteger)
    connected_us: Mapped[int] = mapped_column(BigInteger)
    first_connected_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = ({"sqlite_with_rowid": False},)


class OnlineCount(Base):
    """Connections open now per client type, platform and node."""

    __tablename__ = "online_counts"

    client_type: Mapped[str] = mapped_column(String(32), primary_key=True)
    platform: Mapped[str] = mapped_column(ID, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    connections: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = ({"sqlite_with_rowid": False},)


class ClientActivity(Base):
    """Per client, the opening time of its newest connection."""

    __tablename__ = "client_activity"

    client_id: Mapped[str] = mapped_column(ID, primary_key=True)
    last_connected_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_client_activity_last_connected_at", "last_connected_at"),)


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)  # a declarative model's __table__ is always a Table


nodes = _table(Node)
clients = _table(Client)
connections = _table(Connection)
sessions = _table(Session)
session_links = _table(SessionLink)
device_info_snapshots = _table(DeviceInfoSnapshot)
audit_events = _table(AuditEvent)
connection_hours = _table(ConnectionHour)
tallies = _table(Tally)
device_days = _table(DeviceDay)
online_counts = _table(OnlineCount)
client_activity = _table(ClientActivity)
