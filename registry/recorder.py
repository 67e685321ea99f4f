"""The recorder: turns the registry's changes into journal rows and audit events.

Every row the registry journals is built here, stamped with this node run's id; the journal's
writer commits them (see :mod:`registry.store.writes` for how each operation becomes SQL).
Each method returns the journal sequence of its last row, for callers that wait on it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from registry.audit import AuditKind
from registry.journal import Journal
from registry.livemap import LiveClient
from registry.store.writes import (
    AuditRow,
    ClientRow,
    ConnectionCloseRow,
    ConnectionOpenRow,
    DeviceInfoRow,
    LinkOpenRow,
    Op,
    SessionRow,
    Stamp,
)
from registry.types import ClientInfo, LinkRole, SessionInfo


class Recorder:
    """Row building for one node run (``node_id``) over its journal."""

    __slots__ = ("journal", "node_id")

    def __init__(self, journal: Journal, node_id: str) -> None:
        self.journal = journal
        self.node_id = node_id

    def audit(
        self,
        kind: AuditKind,
        at: datetime,
        *,
        client_id: str | None = None,
        session_id: str | None = None,
        **details: Any,
    ) -> int:
        row: AuditRow = {
            "at": at,
            "node_id": self.node_id,
            "kind": kind.value,
            "client_id": client_id,
            "session_id": session_id,
            "details": details,
        }
        return self.journal.append(Op.AUDIT, row)

    def client(self, live: LiveClient, at: datetime) -> int:
        """The client's row as of ``at`` (an upsert: its first ``first_seen`` is kept)."""
        info = live.info
        row: ClientRow = {
            "client_id": info.client_id,
            "client_type": info.client_type.value,
            "platform": info.platform,
            "first_seen": at,
            "last_seen": at,
            "metadata": info.metadata,
        }
        return self.journal.append(Op.CLIENT, row, len(live.metadata_json))

    def connection_open(self, live: LiveClient, at: datetime) -> int:
        info = live.info
        row: ConnectionOpenRow = {
            "connection_id": info.connection_id,
            "client_id": info.client_id,
            "node_id": self.node_id,
            "client_type": info.client_type.value,
            "platform": info.platform,
            "metadata": info.metadata,
            "remote_address": info.remote_address,
            "connected_at": at,
        }
        return self.journal.append(Op.CONNECTION_OPEN, row, len(live.metadata_json))

    def connection_close(
        self, info: ClientInfo, at: datetime, code: int | None, reason: str
    ) -> int:
        row: ConnectionCloseRow = {
            "b_id": info.connection_id,
            "b_at": at,
            "b_code": code,
            "b_reason": reason,
        }
        return self.journal.append(Op.CONNECTION_CLOSE, row)

    def session(self, session: SessionInfo) -> int:
        """The session's row as it is now (an upsert: owner, executor and creation kept)."""
        row: SessionRow = {
            "session_id": session.session_id,
            "owner_id": session.owner_id,
            "executor_id": session.executor_id,
            "task_name": session.task_name,
            "state": session.state.value,
            "node_id": self.node_id,
            "created_at": session.created_at,
            "ended_at": session.ended_at,
            "end_reason": session.end_reason,
        }
        return self.journal.append(Op.SESSION, row)

    def link_open(
        self, link_id: str, session_id: str, client_id: str, role: LinkRole, at: datetime
    ) -> int:
        row: LinkOpenRow = {
            "link_id": link_id,
            "session_id": session_id,
            "client_id": client_id,
            "role": role.value,
            "bound_at": at,
        }
        return self.journal.append(Op.LINK_OPEN, row)

    def link_close(self, link_id: str, at: datetime) -> int:
        row: Stamp = {"b_id": link_id, "b_at": at}
        return self.journal.append(Op.LINK_CLOSE, row)

    def beat(self, row: Stamp) -> int:
        """This run's heartbeat at ``row["b_at"]``; the writer reads the row when it builds
        a commit, so the caller may bring a queued beat's time up to date in place."""
        return self.journal.append(Op.NODE_BEAT, row)

    def device_info(self, device_id: str, at: datetime, digest: str, document: str) -> int:
        """A snapshot of a device's info (``document``, canonical JSON)."""
        row: DeviceInfoRow = {
            "device_id": device_id,
            "captured_at": at,
            "digest": digest,
            "info": json.loads(document),
        }
        return self.journal.append(Op.DEVICE_INFO, row, len(document))
