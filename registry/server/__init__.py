"""The AIP server: ``/ws`` for device and constellation clients, ``/api`` for tools."""

from registry.server.app import create_app
from registry.server.sessions import (
    RelayRunner,
    SessionContext,
    SessionOutcome,
    SessionRunner,
)

__all__ = ["RelayRunner", "SessionContext", "SessionOutcome", "SessionRunner", "create_app"]
