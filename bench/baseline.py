"""The reference ``WSManager``, copied verbatim as the benchmark baseline.

Method bodies are the reference's, verbatim, ``logger.info`` calls included (the benchmark sets
this module's logger to WARNING so they run, f-strings and all, without printing). Only the
signatures are completed for ``mypy --strict`` (``-> None``, ``dict[str, Any]``), ``WebSocket``
is ``Any``, and the emoji in the log messages are the ones the page's mis-decoded bytes
(``âœ…``, ``ðŸ”Œ``) stand for. The page shows no full ``__init__``; this one creates the five
maps the methods use. It is a plain in-memory class: no I/O, no durability.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from registry.types import ClientType

logger = logging.getLogger(__name__)

WebSocket = Any


@dataclass
class ClientInfo:
    """Information about a connected client."""

    client_id: str  # Unique client identifier
    platform: str  # OS platform (windows, linux)
    websocket: WebSocket  # WebSocket connection
    client_type: ClientType  # DEVICE or CONSTELLATION
    metadata: dict[str, Any]  # Additional client metadata
    connect_time: float  # Connection timestamp


class WSManager:
    def __init__(self) -> None:
        self.clients: dict[str, ClientInfo] = {}
        self.online_clients: set[str] = set()
        self.constellation_sessions: dict[str, set[str]] = {}
        self.device_sessions: dict[str, set[str]] = {}
        self.device_info_cache: dict[str, dict[str, Any]] = {}

    def add_client(
        self,
        client_id: str,
        platform: str,
        websocket: WebSocket,
        client_type: ClientType,
        metadata: dict[str, Any],
    ) -> None:
        """Register a new client connection."""

        # Create client info
        client_info = ClientInfo(
            client_id=client_id,
            platform=platform,
            websocket=websocket,
            client_type=client_type,
            metadata=metadata,
            connect_time=time.time(),
        )

        # Add to registry
        self.clients[client_id] = client_info
        self.online_clients.add(client_id)

        logger.info(f"[WS] ✅ Registered {client_type} client: {client_id}")

    def get_client(self, client_id: str) -> WebSocket | None:
        """Get WebSocket connection for a client."""
        client_info = self.clients.get(client_id)
        return client_info.websocket if client_info else None

    def get_client_info(self, client_id: str) -> ClientInfo | None:
        """Get complete information about a client."""
        return self.clients.get(client_id)

    def get_all_clients(self) -> list[ClientInfo]:
        """Get information about all connected clients."""
        return list(self.clients.values())

    def remove_client(self, client_id: str) -> None:
        """Remove a client from the registry."""

        # Remove from registry
        if client_id in self.clients:
            del self.clients[client_id]

        # Remove from online set
        self.online_clients.discard(client_id)

        logger.info(f"[WS] 🔌 Removed client: {client_id}")

    def is_device_connected(self, device_id: str) -> bool:
        """Check if a device client is currently connected."""

        client_info = self.clients.get(device_id)

        if not client_info:
            return False

        # Verify it's a device client (not constellation)
        return client_info.client_type == ClientType.DEVICE

    def is_online(self, client_id: str) -> bool:
        """Check if a client is currently online."""
        return client_id in self.online_clients

    def add_constellation_session(self, constellation_id: str, session_id: str) -> None:
        """Map a session to its constellation orchestrator."""

        if constellation_id not in self.constellation_sessions:
            self.constellation_sessions[constellation_id] = set()

        self.constellation_sessions[constellation_id].add(session_id)

    def get_constellation_sessions(self, constellation_id: str) -> set[str]:
        """Get all sessions for a constellation client."""
        return self.constellation_sessions.get(constellation_id, set())

    def remove_constellation_sessions(self, constellation_id: str) -> None:
        """Remove all session mappings for a constellation."""
        self.constellation_sessions.pop(constellation_id, None)

    def add_device_session(self, device_id: str, session_id: str) -> None:
        """Map a session to the device executing it."""

        if device_id not in self.device_sessions:
            self.device_sessions[device_id] = set()

        self.device_sessions[device_id].add(session_id)

    def get_device_sessions(self, device_id: str) -> set[str]:
        """Get all sessions running on a device."""
        return self.device_sessions.get(device_id, set())

    def remove_device_sessions(self, device_id: str) -> None:
        """Remove all session mappings for a device."""
        self.device_sessions.pop(device_id, None)

    def remove_session(self, session_id: str) -> None:
        """Remove a specific session from all mappings."""

        # Remove from constellation mappings
        for constellation_id in self.constellation_sessions:
            self.constellation_sessions[constellation_id].discard(session_id)

        # Remove from device mappings
        for device_id in self.device_sessions:
            self.device_sessions[device_id].discard(session_id)

    def set_device_info(self, device_id: str, device_info: dict[str, Any]) -> None:
        """Store device information for a client."""
        self.device_info_cache[device_id] = device_info

    def get_device_info(self, device_id: str) -> dict[str, Any] | None:
        """Get cached device information."""
        return self.device_info_cache.get(device_id)

    def get_online_count(self) -> int:
        """Get number of currently connected clients."""
        return len(self.online_clients)

    def get_clients_by_type(self, client_type: ClientType) -> list[ClientInfo]:
        """Get all clients of a specific type."""
        return [info for info in self.clients.values() if info.client_type == client_type]

    def get_clients_by_platform(self, platform: str) -> list[ClientInfo]:
        """Get all clients on a specific platform."""
        return [info for info in self.clients.values() if info.platform.lower() == platform.lower()]
