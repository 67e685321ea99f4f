"""What this node knows in memory: its live clients and their sockets, the session maps and the
device info cache. Every lookup is a dict or set operation; nothing here does I/O.

The live map stores private copies; :meth:`LiveMap.copy_info` builds the copies handed out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Generic

from typing_extensions import TypeVar

from registry.types import ClientInfo, ClientType, LinkRole, SessionInfo


@dataclass(slots=True)
class LiveClient:
    """A live client: the private :class:`ClientInfo` and its metadata as canonical JSON.

    ``flat`` is true when no metadata value is a container, so a shallow copy is a full one.
    """

    info: ClientInfo
    metadata_json: str
    flat: bool = False

    @classmethod
    def of(cls, info: ClientInfo, metadata_json: str) -> LiveClient:
        flat = not any(isinstance(value, dict | list) for value in info.metadata.values())
        return cls(info, metadata_json, flat)


@dataclass(slots=True)
class DeviceInfoEntry:
    """A cached device info document, kept as canonical JSON with its digest."""

    document: str
    digest: str


#: The type of a live client's socket (the server's ``Peer``; anything, for the library).
S = TypeVar("S", default=Any)


@dataclass(slots=True)
class LiveMap(Generic[S]):
    """This node's registry state. Indexes are kept in step by the methods below."""

    clients: dict[str, LiveClient] = field(default_factory=dict)
    #: client id -> its websocket: ``get_client`` in one lookup.
    sockets: dict[str, S] = field(default_factory=dict)
    by_type: dict[ClientType, dict[str, LiveClient]] = field(
        default_factory=lambda: {kind: {} for kind in ClientType}
    )
    by_platform: dict[str, dict[str, LiveClient]] = field(default_factory=dict)
    #: role -> client id -> session ids: the reference's two session maps.
    session_maps: dict[LinkRole, dict[str, set[str]]] = field(
        default_factory=lambda: {role: {} for role in LinkRole}
    )
    #: session id -> (role, client id) -> link id: the reverse of ``session_maps``.
    links: dict[str, dict[tuple[LinkRole, str], str]] = field(default_factory=dict)
    #: Sessions that are active or interrupted and still known to this node.
    sessions: dict[str, SessionInfo] = field(default_factory=dict)
    device_info: dict[str, DeviceInfoEntry] = field(default_factory=dict)

    def clear(self) -> None:
        """Forget everything (the registry closed)."""
        self.clients.clear()
        self.sockets.clear()
        self.by_platform.clear()
        self.links.clear()
        self.sessions.clear()
        self.device_info.clear()
        for by_type in self.by_type.values():
            by_type.clear()
        for session_map in self.session_maps.values():
            session_map.clear()

    # -- clients ---------------------------------------------------------------------------

    def add(self, live: LiveClient) -> None:
        info = live.info
        self.clients[info.client_id] = live
        self.sockets[info.client_id] = info.websocket
        self.by_type[info.client_type][info.client_id] = live
        self.by_platform.setdefault(info.platform.lower(), {})[info.client_id] = live

    def pop(self, client_id: str) -> LiveClient | None:
        live = self.clients.pop(client_id, None)
        if live is None:
            return None
        del self.sockets[client_id]
        info = live.info
        del self.by_type[info.client_type][client_id]
        platform_key = info.platform.lower()
        same_platform = self.by_platform[platform_key]
        del same_platform[client_id]
        if not same_platform:
            del self.by_platform[platform_key]
        return live

    def infos_of_type(self, client_type: ClientType) -> list[ClientInfo]:
        """Copies of the live clients of one type (O(size of the answer); none for a bad
        type)."""
        try:
            kind = ClientType(client_type)
        except ValueError:
            return []
        return [self.copy_info(live) for live in self.by_type[kind].values()]

    def infos_on_platform(self, platform: str) -> list[ClientInfo]:
        """Copies of the live clients on ``platform`` (case-insensitive)."""
        if not isinstance(platform, str):
            return []
        same = self.by_platform.get(platform.lower(), {})
        return [self.copy_info(live) for live in same.values()]

    @staticmethod
    def copy_info(live: LiveClient) -> ClientInfo:
        """A copy of a live client's info that shares nothing mutable with the registry."""
        info = live.info
        return ClientInfo(
            info.client_id,
            info.platform,
            info.websocket,
            info.client_type,
            dict(info.metadata) if live.flat else json.loads(live.metadata_json),
            info.connect_time,
            info.connection_id,
            info.remote_address,
        )

    # -- session maps ----------------------------------------------------------------------

    def bind(self, role: LinkRole, client_id: str, session_id: str, link_id: str) -> bool:
        """Link ``session_id`` to ``client_id`` in ``role``'s map; False if already linked."""
        session_links = self.links.setdefault(session_id, {})
        key = (role, client_id)
        if key in session_links:
            return False
        session_links[key] = link_id
        self.session_maps[role].setdefault(client_id, set()).add(session_id)
        return True

    def unbind_client(self, role: LinkRole, client_id: str) -> list[tuple[str, str]]:
        """Drop every link of ``client_id`` in ``role``'s map; returns (session id, link id)."""
        session_ids = self.session_maps[role].pop(client_id, set())
        removed = []
        for session_id in session_ids:
            session_links = self.links[session_id]
            removed.append((session_id, session_links.pop((role, client_id))))
            if not session_links:
                del self.links[session_id]
        return removed

    def unbind_session(self, session_id: str) -> list[tuple[LinkRole, str, str]]:
        """Drop every link of ``session_id``; returns (role, client id, link id). O(its links)."""
        removed = []
        for (role, client_id), link_id in self.links.pop(session_id, {}).items():
            by_client = self.session_maps[role]
            sessions = by_client[client_id]
            sessions.discard(session_id)
            if not sessions:
                del by_client[client_id]
            removed.append((role, client_id, link_id))
        return removed

    def sessions_of(self, client_id: str) -> set[str]:
        """Session ids linked to ``client_id`` in either role."""
        found: set[str] = set()
        for by_client in self.session_maps.values():
            found.update(by_client.get(client_id, ()))
        return found
