"""registry: a durable, queryable client registry for agent device fleets.

The :class:`Registry` (alias :data:`WSManager`) keeps the reference ``WSManager`` API over an
in-memory live map and records everything in a SQL store (SQLite by default, PostgreSQL for
several nodes).
"""

from registry.errors import (
    DuplicateClientError,
    InvalidArgumentError,
    JournalFullError,
    RegistryClosedError,
    RegistryError,
    SchemaError,
    SessionFinishedError,
    SessionOwnershipError,
    StoreError,
    StoreUnavailableError,
)
from registry.history import History
from registry.registry import Registry, WSManager
from registry.types import (
    AuditEvent,
    ClientInfo,
    ClientType,
    ConnectionRecord,
    DeviceInfoSnapshot,
    DuplicatePolicy,
    Page,
    SessionInfo,
    SessionRecord,
    SessionState,
    Statistics,
)

__all__ = [
    "AuditEvent",
    "ClientInfo",
    "ClientType",
    "ConnectionRecord",
    "DeviceInfoSnapshot",
    "DuplicateClientError",
    "DuplicatePolicy",
    "History",
    "InvalidArgumentError",
    "JournalFullError",
    "Page",
    "Registry",
    "RegistryClosedError",
    "RegistryError",
    "SchemaError",
    "SessionFinishedError",
    "SessionInfo",
    "SessionOwnershipError",
    "SessionRecord",
    "SessionState",
    "Statistics",
    "StoreError",
    "StoreUnavailableError",
    "WSManager",
]
