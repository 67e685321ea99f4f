"""The client book: registrations of this node's clients and their device info, kept in the
live map and journalled through the node run's recorder.

It applies the duplicate policy and the size caps, and remembers what each registration not
yet durable journalled, so that a registration the server gives up on can be withdrawn
(:meth:`Registry.withdraw_client`) as if it had never been made.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic

from registry import closes
from registry.audit import AuditKind
from registry.errors import DuplicateClientError
from registry.livemap import DeviceInfoEntry, LiveClient, LiveMap, S
from registry.noderun import NodeRun
from registry.types import ClientInfo, ClientType, DuplicatePolicy
from registry.validation import (
    MAX_ID_LENGTH,
    client_type_of,
    close_code,
    free_text,
    optional_text,
    require_document,
    require_id,
    require_text,
)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


@dataclass(slots=True)
class _Registration:
    """What a live client's registration journalled, for :meth:`ClientBook.withdraw`: its
    operations (and those of device info set before it was committed), and the cached device
    info that this device info replaced."""

    sequences: list[int]
    device_info: DeviceInfoEntry | None = None
    replaced_device_info: DeviceInfoEntry | None = None


class ClientBook(Generic[S]):
    """Client registrations over ``live`` (shared with the registry) for ``run``."""

    __slots__ = (
        "_device_info_cap",
        "_live",
        "_metadata_cap",
        "_on_duplicate",
        "_registrations",
        "_run",
    )

    def __init__(
        self,
        live: LiveMap[S],
        run: NodeRun,
        *,
        on_duplicate: DuplicatePolicy,
        metadata_cap: tuple[str, int],
        device_info_cap: tuple[str, int],
    ) -> None:
        self._live = live
        self._run = run
        self._on_duplicate = on_duplicate
        self._metadata_cap = metadata_cap
        self._device_info_cap = device_info_cap
        #: client id -> what its registration journalled (see :meth:`withdraw`).
        self._registrations: dict[str, _Registration] = {}

    def add(
        self,
        client_id: str,
        platform: str,
        websocket: S,
        client_type: ClientType | str,
        metadata: dict[str, Any] | None,
        remote_address: str | None,
        replacing: S | None,
    ) -> tuple[LiveClient, int]:
        """:meth:`Registry.add_client` (its docstring states the contract); the new live client
        and the sequence of its last row."""
        client_id = require_id("client_id", client_id)
        platform = require_text("platform", platform, max_length=MAX_ID_LENGTH)
        kind = client_type_of(client_type)
        metadata_json = require_document(
            "metadata", {} if metadata is None else metadata, cap=self._metadata_cap
        )
        remote_address = optional_text("remote_address", remote_address, max_length=MAX_ID_LENGTH)
        self._run.journal.admit("registration")
        recorder = self._run.recorder
        now = time.time()
        at = _utc(now)
        existing = self._live.clients.get(client_id)
        if existing is not None:
            self._displace(existing, at, replacing, remote_address)
        info = ClientInfo(
            client_id=client_id,
            platform=platform,
            websocket=websocket,
            client_type=kind,
            metadata=json.loads(metadata_json),
            connect_time=now,
            connection_id=str(uuid.uuid4()),
            remote_address=remote_address,
        )
        live = LiveClient.of(info, metadata_json)
        self._live.add(live)
        first = recorder.client(live, at)
        recorder.connection_open(live, at)
        sequence = recorder.audit(
            AuditKind.CLIENT_REGISTERED,
            at,
            client_id=client_id,
            connection_id=info.connection_id,
            client_type=kind.value,
            platform=platform,
            remote_address=remote_address,
        )
        self._registrations[client_id] = _Registration(list(range(first, sequence + 1)))
        return live, sequence

    def _displace(
        self, existing: LiveClient, at: datetime, replacing: S | None, remote_address: str | None
    ) -> None:
        """Close ``existing`` as replaced, or refuse the newcomer (audited) when the policy is
        ``refuse`` and ``replacing`` is not its websocket."""
        if self._on_duplicate is DuplicatePolicy.REFUSE and (
            replacing is None or existing.info.websocket is not replacing
        ):
            self._run.recorder.audit(
                AuditKind.CLIENT_DUPLICATE_REFUSED,
                at,
                client_id=existing.info.client_id,
                live_connection_id=existing.info.connection_id,
                remote_address=remote_address,
            )
            raise DuplicateClientError(existing.info.client_id)
        self._close(existing, at, closes.REPLACED, AuditKind.CLIENT_REPLACED)

    def withdraw(self, client_id: str, websocket: S, reason: str) -> None:
        """:meth:`Registry.withdraw_client` (its docstring states the contract)."""
        live = self._live.clients.get(client_id)
        if live is None or live.info.websocket is not websocket:
            return
        registration = self._registrations.pop(client_id)
        self._live.pop(client_id)
        at = _utc(time.time())

        def committed() -> None:
            self._record_close(live, at, closes.Disconnect(None, reason), AuditKind.CLIENT_REMOVED)

        def dropped() -> None:
            cache = self._live.device_info
            if registration.device_info is not None and (
                cache.get(client_id) is registration.device_info
            ):
                if registration.replaced_device_info is None:
                    del cache[client_id]
                else:
                    cache[client_id] = registration.replaced_device_info

        self._run.journal.retract(registration.sequences, committed=committed, dropped=dropped)

    def remove(self, client_id: str, code: int | None, reason: str | None) -> int | None:
        """Remove a live client, recording ``code`` and ``reason`` (default ``removed``); the
        sequence of its last row, or None if it was not live."""
        client_id = require_id("client_id", client_id)
        code = close_code(code)
        reason = free_text("reason", reason)
        self._run.check_removable()
        live = self._live.clients.get(client_id)
        if live is None:
            return None
        self._run.check_open()
        ending = closes.Disconnect(code, reason or closes.REMOVED.reason)
        return self._close(live, _utc(time.time()), ending, AuditKind.CLIENT_REMOVED)

    def remove_all(self, reason: str) -> None:
        """Remove every live client with ``reason`` (the run is stopping)."""
        for client_id in list(self._live.clients):
            self.remove(client_id, None, reason)
        self._registrations.clear()

    def _close(
        self, live: LiveClient, at: datetime, ending: closes.Disconnect, kind: AuditKind
    ) -> int:
        self._live.pop(live.info.client_id)
        self._registrations.pop(live.info.client_id, None)
        return self._record_close(live, at, ending, kind)

    def _record_close(
        self, live: LiveClient, at: datetime, ending: closes.Disconnect, kind: AuditKind
    ) -> int:
        """Journal the end of ``live``'s connection (no longer in the live map)."""
        info = live.info
        recorder = self._run.recorder
        recorder.connection_close(info, at, ending.code, ending.reason)
        recorder.client(live, at)
        return recorder.audit(
            kind,
            at,
            client_id=info.client_id,
            connection_id=info.connection_id,
            code=ending.code,
            reason=ending.reason,
            seconds=round(at.timestamp() - info.connect_time, 6),
        )

    # -- device info -----------------------------------------------------------------------

    def set_device_info(self, device_id: str, device_info: dict[str, Any]) -> int | None:
        """Cache a device's info and journal a snapshot when it changed (else None)."""
        device_id = require_id("device_id", device_id)
        document = require_document("device_info", device_info, cap=self._device_info_cap)
        self._run.check_open()
        digest = hashlib.sha256(document.encode()).hexdigest()
        cached = self._live.device_info.get(device_id)
        if cached is not None and cached.digest == digest:
            return None
        entry = self._live.device_info[device_id] = DeviceInfoEntry(document, digest)
        at = datetime.now(UTC)
        recorder = self._run.recorder
        first = recorder.device_info(device_id, at, digest, document)
        sequence = recorder.audit(
            AuditKind.DEVICE_INFO_CHANGED, at, client_id=device_id, digest=digest
        )
        registration = self._registrations.get(device_id)
        if registration is not None and not self._run.journal.is_committed(
            registration.sequences[-1]
        ):
            # Set along with a registration not yet durable: withdrawn with it, if it is.
            registration.sequences.extend((first, sequence))
            if registration.device_info is None:
                registration.replaced_device_info = cached
            registration.device_info = entry
        return sequence
