"""Rollups for statistics: connection hours, tallies, device days, online counts, client
activity; filled from the existing history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from registry.store import rollups

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Clustered on their keys on SQLite: statistics read ranges of them.
WITHOUT_ROWID = {"sqlite_with_rowid": False}


def upgrade() -> None:
    op.create_table(
        "connection_hours",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client_type", sa.String(length=32), nullable=False),
        sa.Column("platform", sa.String(length=255), nullable=False),
        sa.Column("node_id", sa.String(length=36), nullable=False),
        sa.Column("connects", sa.BigInteger(), nullable=False),
        sa.Column("disconnects", sa.BigInteger(), nullable=False),
        sa.Column("connected_us", sa.BigInteger(), nullable=False),
        sa.Column("closed", sa.BigInteger(), nullable=False),
        sa.Column("closed_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "hour", "client_type", "platform", "node_id", name=op.f("pk_connection_hours")
        ),
        **WITHOUT_ROWID,
    )
    op.create_table(
        "tallies",
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "start", "label", name=op.f("pk_tallies")),
        **WITHOUT_ROWID,
    )
    op.create_table(
        "device_days",
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("day", sa.DateTime(timezone=True), nullable=False),
        sa.Column("connections", sa.BigInteger(), nullable=False),
        sa.Column("connected_us", sa.BigInteger(), nullable=False),
        sa.Column("first_connected_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("client_id", "day", name=op.f("pk_device_days")),
        **WITHOUT_ROWID,
    )
    op.create_table(
        "online_counts",
        sa.Column("client_type", sa.String(length=32), nullable=False),
        sa.Column("platform", sa.String(length=255), nullable=False),
        sa.Column("node_id", sa.String(length=36), nullable=False),
        sa.Column("connections", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "client_type", "platform", "node_id", name=op.f("pk_online_counts")
        ),
        **WITHOUT_ROWID,
    )
    op.create_table(
        "client_activity",
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("last_connected_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_client_activity")),
    )
    with op.batch_alter_table("client_activity", schema=None) as batch_op:
        batch_op.create_index(
            "ix_client_activity_last_connected_at", ["last_connected_at"], unique=False
        )
    if not context.is_offline_mode():  # the backfill reads the history: nothing to read offline
        rollups.rebuild(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("client_activity", schema=None) as batch_op:
        batch_op.drop_index("ix_client_activity_last_connected_at")
    for table in ("client_activity", "online_counts", "device_days", "tallies", "connection_hours"):
        op.drop_table(table)
