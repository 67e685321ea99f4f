"""Initial schema: nodes, clients, connections, sessions, session links, device info, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-26 00:19:16.396336
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column(
            "event_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("node_id", sa.String(length=36), nullable=True),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("client_id", sa.String(length=255), nullable=True),
        sa.Column("session_id", sa.String(length=255), nullable=True),
        sa.Column("details", JSON_DOCUMENT, nullable=False),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_audit_events")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index("ix_audit_events_at", ["at"], unique=False)
        batch_op.create_index(
            "ix_audit_events_client_id_event_id", ["client_id", "event_id"], unique=False
        )
        batch_op.create_index("ix_audit_events_kind_event_id", ["kind", "event_id"], unique=False)
        batch_op.create_index(
            "ix_audit_events_session_id_event_id", ["session_id", "event_id"], unique=False
        )

    op.create_table(
        "clients",
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("client_type", sa.String(length=32), nullable=False),
        sa.Column("platform", sa.String(length=255), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metadata", JSON_DOCUMENT, nullable=False),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_clients")),
    )
    op.create_table(
        "device_info_snapshots",
        sa.Column(
            "snapshot_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("device_id", sa.String(length=255), nullable=False),
        sa.Column("captured_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("info", JSON_DOCUMENT, nullable=False),
        sa.PrimaryKeyConstraint("snapshot_id", name=op.f("pk_device_info_snapshots")),
    )
    with op.batch_alter_table("device_info_snapshots", schema=None) as batch_op:
        batch_op.create_index(
            "ix_device_info_snapshots_device_id_snapshot_id",
            ["device_id", "snapshot_id"],
            unique=False,
        )

    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stop_reason", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_nodes")),
    )
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.create_index(
            "ix_nodes_running",
            ["name"],
            unique=False,
            sqlite_where=sa.text("stopped_at IS NULL"),
            postgresql_where=sa.text("stopped_at IS NULL"),
        )

    op.create_table(
        "sessions",
        sa.Column("session_id", sa.String(length=255), nullable=False),
        sa.Column("owner_id", sa.String(length=255), nullable=True),
        sa.Column("executor_id", sa.String(length=255), nullable=True),
        sa.Column("task_name", sa.String(length=255), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("node_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_sessions")),
    )
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_sessions_active",
            ["node_id"],
            unique=False,
            sqlite_where=sa.text("state = 'active'"),
            postgresql_where=sa.text("state = 'active'"),
        )
        batch_op.create_index("ix_sessions_created_at", ["created_at"], unique=False)
        batch_op.create_index(
            "ix_sessions_executor_id_created_at", ["executor_id", "created_at"], unique=False
        )
        batch_op.create_index(
            "ix_sessions_owner_id_created_at", ["owner_id", "created_at"], unique=False
        )

    op.create_table(
        "connections",
        sa.Column("connection_id", sa.String(length=36), nullable=False),
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("node_id", sa.String(length=36), nullable=False),
        sa.Column("client_type", sa.String(length=32), nullable=False),
        sa.Column("platform", sa.String(length=255), nullable=False),
        sa.Column("metadata", JSON_DOCUMENT, nullable=False),
        sa.Column("remote_address", sa.String(length=255), nullable=True),
        sa.Column("connected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disconnected_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("close_code", sa.Integer(), nullable=True),
        sa.Column("close_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["client_id"], ["clients.client_id"], name=op.f("fk_connections_client_id_clients")
        ),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.node_id"], name=op.f("fk_connections_node_id_nodes")
        ),
        sa.PrimaryKeyConstraint("connection_id", name=op.f("pk_connections")),
    )
    with op.batch_alter_table("connections", schema=None) as batch_op:
        batch_op.create_index(
            "ix_connections_client_id_connected_at", ["client_id", "connected_at"], unique=False
        )
        batch_op.create_index("ix_connections_connected_at", ["connected_at"], unique=False)
        batch_op.create_index("ix_connections_disconnected_at", ["disconnected_at"], unique=False)
        batch_op.create_index(
            "ix_connections_open",
            ["node_id"],
            unique=False,
            sqlite_where=sa.text("disconnected_at IS NULL"),
            postgresql_where=sa.text("disconnected_at IS NULL"),
        )

    op.create_table(
        "session_links",
        sa.Column("link_id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=255), nullable=False),
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("bound_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("unbound_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.session_id"],
            name=op.f("fk_session_links_session_id_sessions"),
        ),
        sa.PrimaryKeyConstraint("link_id", name=op.f("pk_session_links")),
    )
    with op.batch_alter_table("session_links", schema=None) as batch_op:
        batch_op.create_index(
            "ix_session_links_client_id_bound_at", ["client_id", "bound_at"], unique=False
        )
        batch_op.create_index(
            "ix_session_links_open",
            ["session_id"],
            unique=False,
            sqlite_where=sa.text("unbound_at IS NULL"),
            postgresql_where=sa.text("unbound_at IS NULL"),
        )
        batch_op.create_index("ix_session_links_session_id", ["session_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("session_links", schema=None) as batch_op:
        batch_op.drop_index("ix_session_links_session_id")
        batch_op.drop_index(
            "ix_session_links_open",
            sqlite_where=sa.text("unbound_at IS NULL"),
            postgresql_where=sa.text("unbound_at IS NULL"),
        )
        batch_op.drop_index("ix_session_links_client_id_bound_at")

    op.drop_table("session_links")
    with op.batch_alter_table("connections", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_connections_open",
            sqlite_where=sa.text("disconnected_at IS NULL"),
            postgresql_where=sa.text("disconnected_at IS NULL"),
        )
        batch_op.drop_index("ix_connections_disconnected_at")
        batch_op.drop_index("ix_connections_connected_at")
        batch_op.drop_index("ix_connections_client_id_connected_at")

    op.drop_table("connections")
    with op.batch_alter_table("sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_sessions_owner_id_created_at")
        batch_op.drop_index("ix_sessions_executor_id_created_at")
        batch_op.drop_index("ix_sessions_created_at")
        batch_op.drop_index(
            "ix_sessions_active",
            sqlite_where=sa.text("state = 'active'"),
            postgresql_where=sa.text("state = 'active'"),
        )

    op.drop_table("sessions")
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_nodes_running",
            sqlite_where=sa.text("stopped_at IS NULL"),
            postgresql_where=sa.text("stopped_at IS NULL"),
        )

    op.drop_table("nodes")
    with op.batch_alter_table("device_info_snapshots", schema=None) as batch_op:
        batch_op.drop_index("ix_device_info_snapshots_device_id_snapshot_id")

    op.drop_table("device_info_snapshots")
    op.drop_table("clients")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_session_id_event_id")
        batch_op.drop_index("ix_audit_events_kind_event_id")
        batch_op.drop_index("ix_audit_events_client_id_event_id")
        batch_op.drop_index("ix_audit_events_at")

    op.drop_table("audit_events")
