"""The kinds of audit events the registry writes. The audit trail is append-only."""

from __future__ import annotations

import enum


class AuditKind(enum.StrEnum):
    NODE_STARTED = "node_started"
    NODE_STOPPED = "node_stopped"
    NODE_RECOVERED = "node_recovered"  # an earlier run's leftovers were closed by this run
    CLIENT_REGISTERED = "client_registered"
    CLIENT_DUPLICATE_REFUSED = "client_duplicate_refused"
    CLIENT_REPLACED = "client_replaced"
    CLIENT_REMOVED = "client_removed"
    CONNECTION_RECOVERED = "connection_recovered"  # closed by recovery, not by its server
    SESSION_OPENED = "session_opened"
    SESSION_BOUND = "session_bound"
    SESSION_UNBOUND = "session_unbound"
    SESSION_ENDED = "session_ended"
    SESSION_INTERRUPTED = "session_interrupted"
    DEVICE_INFO_CHANGED = "device_info_changed"
    PRUNED = "pruned"  # retention deleted history older than a cutoff
