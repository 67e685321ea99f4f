"""The registry: the reference ``WSManager`` API over this node's live map, made durable.

Every method of the reference keeps its name, arguments and meaning and stays synchronous:
reads answer from memory with no I/O; mutations update memory and append to the journal,
whose writer task commits them in the background (group commit). ``await flush()`` returns once
everything before it is durable, and the ``*_durable`` variants (and the session lifecycle
methods) return only once their own change is. Use a registry from one event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from sqlalchemy import insert, update
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from registry.audit import AuditKind
from registry.errors import (
    DuplicateClientError,
    InvalidArgumentError,
    RegistryClosedError,
    SessionFinishedError,
    SessionOwnershipError,
    StoreUnavailableError,
    describe,
)
from registry.history import History
from registry.journal import DEFAULT_LIMIT, DEFAULT_STALL_SECONDS, Journal
from registry.livemap import DeviceInfoEntry, LiveClient, LiveMap
from registry.recovery import close_gone_runs, load_state
from registry.store import models
from registry.store.dialect import (
    DEFAULT_URL,
    checkpoint_deferred,
    create_engine,
    is_sqlite,
    parse_url,
)
from registry.store.schema import ensure_schema
from registry.store.writes import Op, Row
from registry.types import (
    ClientInfo,
    ClientType,
    DuplicatePolicy,
    LinkRole,
    SessionInfo,
    SessionState,
)
from registry.validation import (
    MAX_ID_LENGTH,
    client_type_of,
    close_code,
    free_text,
    optional_text,
    require_document,
    require_id,
    require_positive,
    require_text,
)

logger = logging.getLogger(__name__)

REASON_REMOVED = "removed"
REASON_REPLACED = "replaced"
#: The close code recorded for a replaced registration: the one the server closes it with.
CODE_REPLACED = 4411
REASON_SHUTDOWN = "server_shutdown"
REASON_UNLINKED = "unlinked"
REASON_NOT_DURABLE = "store_unavailable"

#: The reference's name for the client argument of each session map's methods.
_ROLE_ARGUMENT = {LinkRole.CONSTELLATION: "constellation_id", LinkRole.DEVICE: "device_id"}


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class Registry:
    """Durable registry of this node's clients, sessions and device info.

    ``database_url`` defaults to the SQLite file ``./registry.db``; a ``postgresql+asyncpg://``
    URL works the same. ``on_duplicate`` is ``"refuse"`` (raise :class:`DuplicateClientError`)
    or ``"replace"`` (close the old connection record with reason ``replaced``).
    ``auto_migrate`` defaults to on for SQLite and off for PostgreSQL, where several nodes
    share the database and an operator runs ``registry db upgrade``.

    ``node_name`` names this node across restarts: a new run closes what an earlier run of the
    same name left open (``server_restart``). By default each run is named by its own node id,
    so no other run is ever taken for it; the server passes ``host:port``, so a restarted
    server recognises its earlier run while two servers on one host stay apart. Runs of other
    names are closed (``node_lost``) once their heartbeat is ``node_timeout`` seconds old.
    SQLite has one node: every earlier run that did not stop is taken as gone.

    While the store fails, the journal keeps what the live map did and the writer retries.
    ``journal_limit`` bounds it: once that many operations wait for the store, registrations
    and new sessions are refused with :class:`JournalFullError` (nothing changes); ends
    (disconnects, session ends) are still accepted, so what happened is never dropped. A
    commit still running after ``stall_timeout`` seconds (a database that hangs instead of
    failing) is logged and reported by ``journal.fault()`` like a failed one.
    """

    def __init__(
        self,
        database_url: str | URL | None = None,
        *,
        on_duplicate: DuplicatePolicy | str = DuplicatePolicy.REFUSE,
        node_name: str | None = None,
        auto_migrate: bool | None = None,
        heartbeat_interval: float = 5.0,
        node_timeout: float = 30.0,
        close_timeout: float | None = 30.0,
        journal_limit: int = DEFAULT_LIMIT,
        stall_timeout: float = DEFAULT_STALL_SECONDS,
    ) -> None:
        self._url = parse_url(database_url or DEFAULT_URL)
        try:
            self._on_duplicate = DuplicatePolicy(on_duplicate)
        except ValueError:
            raise InvalidArgumentError(
                "on_duplicate", f"must be 'refuse' or 'replace', not {on_duplicate!r}"
            ) from None
        self._node_name = None if node_name is None else require_id("node_name", node_name)
        require_positive("heartbeat_interval", heartbeat_interval)
        require_positive("node_timeout", node_timeout)
        require_positive("close_timeout", close_timeout, allow_none=True)
        require_positive("journal_limit", journal_limit)
        require_positive("stall_timeout", stall_timeout)
        self._auto_migrate = is_sqlite(self._url) if auto_migrate is None else auto_migrate
        self._heartbeat_interval = heartbeat_interval
        self._node_timeout = timedelta(seconds=node_timeout)
        self._close_timeout = close_timeout
        self._journal_limit = journal_limit
        self._stall_timeout = stall_timeout
        self._live = LiveMap()
        self._engine: AsyncEngine | None = None
        self._journal: Journal | None = None
        self._history: History | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._runs = 0
        #: This server run's row in ``nodes``; a registry started again gets a new one.
        self.node_id = str(uuid.uuid4())

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        """The database URL with any password hidden."""
        return self._url.render_as_string(hide_password=True)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RegistryClosedError("the registry is not started; await registry.start()")
        return self._engine

    @property
    def history(self) -> History:
        """History and statistics queries on the store (cluster-wide)."""
        if self._history is None:
            raise RegistryClosedError("the registry is not started; await registry.start()")
        return self._history

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise RegistryClosedError("the registry is not started; await registry.start()")
        return self._journal

    async def start(self) -> None:
        """Migrate (or refuse), register this node run, recover from earlier runs, load state.

        Raises :class:`StoreUnavailableError` when the database cannot be reached or written
        and :class:`SchemaError` when its schema is behind or unknown; nothing is left open.
        """
        if self._engine is not None:
            raise RegistryClosedError("the registry is already started")
        if self._runs:
            self.node_id = str(uuid.uuid4())  # each run is its own row in ``nodes``
        engine = create_engine(self._url)
        try:
            await ensure_schema(engine, auto_migrate=self._auto_migrate)
            await self._recover(engine)
        except BaseException as exc:
            await engine.dispose()
            if isinstance(exc, SQLAlchemyError | OSError):
                raise StoreUnavailableError(
                    f"cannot open the registry database {self.database_url}: {describe(exc)}"
                ) from exc
            raise
        self._runs += 1
        self._engine = engine
        self._journal = Journal(engine, limit=self._journal_limit, stall_after=self._stall_timeout)
        self._journal.start()
        self._history = History(engine)
        self._heartbeat_task = asyncio.get_running_loop().create_task(
            self._heartbeat(), name="registry-node-heartbeat"
        )

    async def _recover(self, engine: AsyncEngine) -> None:
        now = datetime.now(UTC)
        name = self._node_name or self.node_id
        async with engine.connect() as outer, checkpoint_deferred(outer) as connection:
            await connection.execute(
                insert(models.nodes).values(
                    node_id=self.node_id,
                    name=name,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=now,
                    heartbeat_at=now,
                )
            )
            await connection.execute(
                insert(models.audit_events).values(
                    at=now,
                    node_id=self.node_id,
                    kind=AuditKind.NODE_STARTED,
                    details={"name": name, "pid": os.getpid()},
                )
            )
            await close_gone_runs(
                connection,
                node_id=self.node_id,
                node_name=name,
                now=now,
                node_timeout=self._node_timeout,
                single_node=is_sqlite(self._url),
            )
            state = await load_state(connection)
        self._live.sessions.update(state.sessions)
        for session_id, role, client_id, link_id in state.links:
            self._live.bind(role, client_id, session_id, link_id)
        for device_id, (document, digest) in state.device_info.items():
            self._live.device_info[device_id] = DeviceInfoEntry(document, digest)

    async def _heartbeat(self) -> None:
        """Beat every ``heartbeat_interval``. While a beat waits for the store (an outage) no
        other is queued behind it: its time is brought up to date instead, so an outage does
        not grow the journal here and the beat written when the store is back is fresh."""
        journal = self.journal
        sequence, row = 0, {"b_id": self.node_id, "b_at": datetime.now(UTC)}
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            now = datetime.now(UTC)
            if journal.is_committed(sequence):
                row = {"b_id": self.node_id, "b_at": now}
                sequence = journal.append(Op.NODE_BEAT, row)
            else:
                row["b_at"] = now  # still queued (the writer reads rows as it builds a commit)

    async def close(self) -> None:
        """Close every live connection record (reason ``server_shutdown``), mark active sessions
        ``interrupted``, drain the journal and mark this node run stopped.

        Raises :class:`StoreUnavailableError` if the journal cannot be drained within
        ``close_timeout`` seconds.
        """
        if self._engine is None or self._journal is None:
            return
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
            self._heartbeat_task = None
        for client_id in list(self._live.clients):
            self.remove_client(client_id, reason=REASON_SHUTDOWN)
        for session in list(self._live.sessions.values()):
            if session.state is SessionState.ACTIVE:
                self._set_session(
                    session,
                    state=SessionState.INTERRUPTED,
                    end_reason=REASON_SHUTDOWN,
                    kind=AuditKind.SESSION_INTERRUPTED,
                    at=datetime.now(UTC),
                )
        self._audit(AuditKind.NODE_STOPPED, datetime.now(UTC))
        engine, journal = self._engine, self._journal
        try:
            await journal.close(self._close_timeout)
            async with engine.begin() as connection:
                now = datetime.now(UTC)
                await connection.execute(
                    update(models.nodes)
                    .where(models.nodes.c.node_id == self.node_id)
                    .values(heartbeat_at=now, stopped_at=now, stop_reason="shutdown")
                )
        except SQLAlchemyError as exc:
            raise StoreUnavailableError(f"cannot mark the node stopped: {describe(exc)}") from exc
        finally:
            self._engine = self._journal = self._history = None
            self._live = LiveMap()
            await engine.dispose()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._journal is None:
            raise RegistryClosedError("the registry is not started; await registry.start()")

    def _check_removable(self) -> None:
        """Removals raise on a registry never started; once it has been closed they find
        nothing live (close removed everything), so a late removal is a harmless no-op."""
        if self._journal is None and not self._runs:
            raise RegistryClosedError("the registry is not started; await registry.start()")

    async def _durable(self, sequence: int | None) -> None:
        """Wait for ``sequence``, or, when the call appended nothing, for everything queued
        so far: what made it a no-op (an earlier call) may not be durable yet."""
        if sequence is not None:
            await self.journal.wait(sequence)
        elif self._journal is not None:
            await self._journal.flush()

    async def flush(self) -> None:
        """Return once every mutation made before this call is committed."""
        await self.journal.flush()

    # -- journalling helpers ---------------------------------------------------------------

    def _append(self, op: Op, row: Row) -> int:
        return self.journal.append(op, row)

    def _audit(
        self,
        kind: AuditKind,
        at: datetime,
        *,
        client_id: str | None = None,
        session_id: str | None = None,
        **details: Any,
    ) -> int:
        return self._append(
            Op.AUDIT,
            {
                "at": at,
                "node_id": self.node_id,
                "kind": kind.value,
                "client_id": client_id,
                "session_id": session_id,
                "details": details,
            },
        )

    def _client_row(self, live: LiveClient, at: datetime) -> int:
        info = live.info
        return self._append(
            Op.CLIENT,
            {
                "client_id": info.client_id,
                "client_type": info.client_type.value,
                "platform": info.platform,
                "first_seen": at,
                "last_seen": at,
                "metadata": info.metadata,
            },
        )

    # -- clients ---------------------------------------------------------------------------

    def add_client(
        self,
        client_id: str,
        platform: str,
        websocket: Any,
        client_type: ClientType | str,
        metadata: dict[str, Any] | None = None,
        *,
        remote_address: str | None = None,
        replacing: Any = None,
    ) -> None:
        """Register a new client connection on this node.

        Raises :class:`InvalidArgumentError` for bad arguments,
        :class:`DuplicateClientError` when ``client_id`` is live and the policy is ``refuse``,
        and :class:`JournalFullError` when the journal is at its limit; in each case nothing
        changes (a refused duplicate is audited). ``replacing`` names the websocket of a live
        registration of ``client_id`` to replace whatever the policy (the server passes one
        that did not answer a ping); a live registration on any other websocket still counts
        as a duplicate. A replaced registration's record is closed with code
        :data:`CODE_REPLACED` and reason ``replaced``; closing its websocket is the caller's.
        """
        self._add_client(
            client_id, platform, websocket, client_type, metadata, remote_address, replacing
        )

    async def add_client_durable(
        self,
        client_id: str,
        platform: str,
        websocket: Any,
        client_type: ClientType | str,
        metadata: dict[str, Any] | None = None,
        *,
        remote_address: str | None = None,
        replacing: Any = None,
    ) -> ClientInfo:
        """:meth:`add_client`, returning (a copy of) the new info once it is durable."""
        live, sequence = self._add_client(
            client_id, platform, websocket, client_type, metadata, remote_address, replacing
        )
        await self.journal.wait(sequence)
        return LiveMap.copy_info(live)

    def _add_client(
        self,
        client_id: str,
        platform: str,
        websocket: Any,
        client_type: ClientType | str,
        metadata: dict[str, Any] | None,
        remote_address: str | None,
        replacing: Any = None,
    ) -> tuple[LiveClient, int]:
        client_id = require_id("client_id", client_id)
        platform = require_text("platform", platform, max_length=MAX_ID_LENGTH)
        kind = client_type_of(client_type)
        metadata_json = require_document("metadata", {} if metadata is None else metadata)
        remote_address = optional_text("remote_address", remote_address, max_length=MAX_ID_LENGTH)
        journal = self.journal
        journal.admit("registration")
        now = time.time()
        at = _utc(now)
        existing = self._live.clients.get(client_id)
        if existing is not None:
            if self._on_duplicate is DuplicatePolicy.REFUSE and (
                replacing is None or existing.info.websocket is not replacing
            ):
                self._audit(
                    AuditKind.CLIENT_DUPLICATE_REFUSED,
                    at,
                    client_id=client_id,
                    live_connection_id=existing.info.connection_id,
                    remote_address=remote_address,
                )
                raise DuplicateClientError(client_id)
            self._close(existing, at, CODE_REPLACED, REASON_REPLACED, AuditKind.CLIENT_REPLACED)
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
        self._client_row(live, at)
        journal.append(
            Op.CONNECTION_OPEN,
            {
                "connection_id": info.connection_id,
                "client_id": client_id,
                "node_id": self.node_id,
                "client_type": kind.value,
                "platform": platform,
                "metadata": info.metadata,
                "remote_address": remote_address,
                "connected_at": at,
            },
        )
        sequence = self._audit(
            AuditKind.CLIENT_REGISTERED,
            at,
            client_id=client_id,
            connection_id=info.connection_id,
            client_type=kind.value,
            platform=platform,
            remote_address=remote_address,
        )
        return live, sequence

    def remove_client(
        self, client_id: str, *, code: int | None = None, reason: str | None = None
    ) -> None:
        """Remove a client from this node and close its connection record.

        ``code`` and ``reason`` (default ``removed``) are recorded with the disconnect. The id
        is free again at once. Session maps are left alone, as in the reference.
        """
        self._remove_client(client_id, code, reason)

    async def remove_client_durable(
        self, client_id: str, *, code: int | None = None, reason: str | None = None
    ) -> None:
        """:meth:`remove_client`, returning once the disconnect is durable."""
        await self._durable(self._remove_client(client_id, code, reason))

    def _remove_client(self, client_id: str, code: int | None, reason: str | None) -> int | None:
        client_id = require_id("client_id", client_id)
        code = close_code(code)
        reason = free_text("reason", reason)
        self._check_removable()
        live = self._live.clients.get(client_id)
        if live is None:
            return None
        self._check_open()
        return self._close(
            live, _utc(time.time()), code, reason or REASON_REMOVED, AuditKind.CLIENT_REMOVED
        )

    def _close(
        self, live: LiveClient, at: datetime, code: int | None, reason: str, kind: AuditKind
    ) -> int:
        info = live.info
        self._live.pop(info.client_id)
        self._append(
            Op.CONNECTION_CLOSE,
            {"b_id": info.connection_id, "b_at": at, "b_code": code, "b_reason": reason},
        )
        self._client_row(live, at)
        return self._audit(
            kind,
            at,
            client_id=info.client_id,
            connection_id=info.connection_id,
            code=code,
            reason=reason,
            seconds=round(at.timestamp() - info.connect_time, 6),
        )

    def get_client(self, client_id: str) -> Any | None:
        """The WebSocket of a live client, or None."""
        return self._live.sockets.get(client_id)

    def get_client_info(self, client_id: str) -> ClientInfo | None:
        """A copy of a live client's info, or None."""
        live = self._live.clients.get(client_id)
        return LiveMap.copy_info(live) if live else None

    def get_all_clients(self) -> list[ClientInfo]:
        """Copies of the info of every client live on this node."""
        return [LiveMap.copy_info(live) for live in self._live.clients.values()]

    def is_device_connected(self, device_id: str) -> bool:
        """True when ``device_id`` is live on this node as a device."""
        live = self._live.clients.get(device_id)
        return live is not None and live.info.client_type is ClientType.DEVICE

    def is_online(self, client_id: str) -> bool:
        """True when ``client_id`` is live on this node."""
        return client_id in self._live.clients

    def get_online_count(self) -> int:
        """Number of clients live on this node."""
        return len(self._live.clients)

    def get_clients_by_type(self, client_type: ClientType) -> list[ClientInfo]:
        """Copies of this node's live clients of one type (O(size of the answer))."""
        try:
            kind = ClientType(client_type)
        except ValueError:
            return []
        return [LiveMap.copy_info(live) for live in self._live.by_type[kind].values()]

    def get_clients_by_platform(self, platform: str) -> list[ClientInfo]:
        """Copies of this node's live clients on ``platform`` (case-insensitive)."""
        if not isinstance(platform, str):
            return []
        same = self._live.by_platform.get(platform.lower(), {})
        return [LiveMap.copy_info(live) for live in same.values()]

    # -- session maps (reference) ----------------------------------------------------------

    def add_constellation_session(self, constellation_id: str, session_id: str) -> None:
        """Map a session to its constellation orchestrator."""
        self._bind(LinkRole.CONSTELLATION, constellation_id, session_id)

    def add_device_session(self, device_id: str, session_id: str) -> None:
        """Map a session to the device executing it."""
        self._bind(LinkRole.DEVICE, device_id, session_id)

    def get_constellation_sessions(self, constellation_id: str) -> set[str]:
        """A copy of the sessions mapped to a constellation."""
        return set(self._live.session_maps[LinkRole.CONSTELLATION].get(constellation_id, ()))

    def get_device_sessions(self, device_id: str) -> set[str]:
        """A copy of the sessions mapped to a device."""
        return set(self._live.session_maps[LinkRole.DEVICE].get(device_id, ()))

    def remove_constellation_sessions(self, constellation_id: str) -> None:
        """Remove all session mappings of a constellation (O(its links))."""
        self._unbind_client(LinkRole.CONSTELLATION, constellation_id)

    def remove_device_sessions(self, device_id: str) -> None:
        """Remove all session mappings of a device (O(its links))."""
        self._unbind_client(LinkRole.DEVICE, device_id)

    def remove_session(
        self,
        session_id: str,
        *,
        state: SessionState | str = SessionState.COMPLETED,
        reason: str | None = None,
    ) -> None:
        """Remove a session from all mappings (O(its links)).

        A session still live (active, or interrupted by a server restart) ends in ``state``:
        ``completed`` (the default), ``failed`` or ``cancelled``, with ``reason``. Any other
        ``state`` (``active``, and ``interrupted``, which only the registry sets when its run
        stops) raises :class:`InvalidArgumentError` and changes nothing.
        """
        self._end(session_id, state, reason)

    def _bind(self, role: LinkRole, client_id: str, session_id: str) -> int | None:
        client_id = require_id(_ROLE_ARGUMENT[role], client_id)
        session_id = require_id("session_id", session_id)
        self._check_open()
        at = datetime.now(UTC)
        session = self._live.sessions.get(session_id)
        if session is None:
            session = SessionInfo(
                session_id=session_id,
                owner_id=client_id,
                executor_id=client_id if role is LinkRole.DEVICE else None,
                task_name=None,
                state=SessionState.ACTIVE,
                created_at=at,
            )
            self._set_session(session, kind=None, at=at)
        elif role is LinkRole.DEVICE and session.executor_id is None:
            self._set_session(session, executor_id=client_id, kind=None, at=at)
        link_id = str(uuid.uuid4())
        if not self._live.bind(role, client_id, session_id, link_id):
            return None
        self._append(
            Op.LINK_OPEN,
            {
                "link_id": link_id,
                "session_id": session_id,
                "client_id": client_id,
                "role": role.value,
                "bound_at": at,
            },
        )
        return self._audit(
            AuditKind.SESSION_BOUND, at, client_id=client_id, session_id=session_id, role=role
        )

    def _unbind_client(self, role: LinkRole, client_id: str) -> None:
        client_id = require_id(_ROLE_ARGUMENT[role], client_id)
        self._check_removable()
        if client_id not in self._live.session_maps[role]:
            return
        self._check_open()
        at = datetime.now(UTC)
        for session_id, link_id in self._live.unbind_client(role, client_id):
            self._append(Op.LINK_CLOSE, {"b_id": link_id, "b_at": at})
            self._audit(
                AuditKind.SESSION_UNBOUND, at, client_id=client_id, session_id=session_id, role=role
            )
            if session_id not in self._live.links:
                self._forget(session_id, at)

    def _forget(self, session_id: str, at: datetime) -> None:
        """Drop a session left without links; a live one ends ``cancelled``: an interrupted
        one too, since its owner finds it only through its links."""
        session = self._live.sessions.pop(session_id, None)
        if session is not None:
            self._set_session(
                session,
                state=SessionState.CANCELLED,
                ended_at=at,
                end_reason=REASON_UNLINKED,
                kind=AuditKind.SESSION_ENDED,
                at=at,
            )

    def _end(self, session_id: str, state: SessionState | str, reason: str | None) -> int | None:
        try:
            final = SessionState(state)
        except ValueError:
            final = SessionState.ACTIVE
        if not final.is_final:
            raise InvalidArgumentError(
                "state",
                f"must be completed, failed or cancelled, not {state!r} "
                "(a session is interrupted only by its server run stopping)",
            )
        reason = free_text("reason", reason)
        session_id = require_id("session_id", session_id)
        self._check_removable()
        session = self._live.sessions.get(session_id)
        if session is None:
            return None
        self._check_open()
        at = datetime.now(UTC)
        sequence = None
        for role, client_id, link_id in self._live.unbind_session(session_id):
            self._append(Op.LINK_CLOSE, {"b_id": link_id, "b_at": at})
            sequence = self._audit(
                AuditKind.SESSION_UNBOUND, at, client_id=client_id, session_id=session_id, role=role
            )
        del self._live.sessions[session_id]
        if not session.state.is_final:
            sequence = self._set_session(
                session,
                state=final,
                ended_at=at,
                end_reason=reason,
                kind=AuditKind.SESSION_ENDED,
                at=at,
            )
        return sequence

    def _set_session(
        self, session: SessionInfo, *, kind: AuditKind | None, at: datetime, **changes: Any
    ) -> int:
        """Record ``session`` with ``changes`` in memory (while not final) and in the journal."""
        if changes:
            session = dataclasses.replace(session, **changes)
        if not session.state.is_final:
            self._live.sessions[session.session_id] = session
        sequence = self._append(
            Op.SESSION,
            {
                "session_id": session.session_id,
                "owner_id": session.owner_id,
                "executor_id": session.executor_id,
                "task_name": session.task_name,
                "state": session.state.value,
                "node_id": self.node_id,
                "created_at": session.created_at,
                "ended_at": session.ended_at,
                "end_reason": session.end_reason,
            },
        )
        if kind is not None:
            sequence = self._audit(
                kind,
                at,
                client_id=session.owner_id,
                session_id=session.session_id,
                state=session.state.value,
                reason=session.end_reason,
            )
        return sequence

    # -- session lifecycle (server) --------------------------------------------------------

    def online_counts(self) -> dict[ClientType, int]:
        """How many clients of each type are live on this node (O(1), no copies)."""
        return {kind: len(clients) for kind, clients in self._live.by_type.items()}

    def session_counts(self) -> dict[SessionState, int]:
        """How many live sessions this node holds in each state: ``active`` ones, and
        ``interrupted`` ones waiting for their owner to resume or end them. A session leaves
        the count when it ends."""
        return dict(Counter(session.state for session in self._live.sessions.values()))

    def get_session(self, session_id: str) -> SessionInfo | None:
        """The session if it is live on this node (active or interrupted), else None."""
        return self._live.sessions.get(session_id)

    def get_interrupted_sessions(self, client_id: str) -> list[SessionInfo]:
        """Sessions owned by ``client_id`` that were active when a server run stopped (O(its
        links)). Each stays until its owner re-opens it (:meth:`open_session`) or ends it."""
        found = []
        for session_id in self._live.sessions_of(client_id):
            session = self._live.sessions.get(session_id)
            if (
                session is not None
                and session.owner_id == client_id
                and session.state is SessionState.INTERRUPTED
            ):
                found.append(session)
        return found

    async def open_session(
        self,
        session_id: str,
        *,
        owner_id: str,
        executor_id: str,
        task_name: str | None = None,
    ) -> SessionInfo:
        """Start a session owned by ``owner_id`` and run by ``executor_id``; return once it is
        durable.

        When owner and executor differ the owner is mapped as the constellation and the
        executor as the device; otherwise the owner is mapped as the device running its own
        task. A session id belongs to the client that first created it, also across restarts:
        another client gets :class:`SessionOwnershipError` and nothing changes.

        The owner may open a live session again: an ``active`` one, or an ``interrupted`` one
        (resumed after a server restart); it keeps its ``created_at``. A session that has
        ended (``completed``, ``failed``, ``cancelled``) keeps its record: opening it again
        raises :class:`SessionFinishedError` and nothing changes, also after a restart.
        """
        session_id = require_id("session_id", session_id)
        owner_id = require_id("owner_id", owner_id)
        executor_id = require_id("executor_id", executor_id)
        if task_name is not None:
            task_name = require_id("task_name", task_name)
        self.journal.admit("session")
        if session_id not in self._live.sessions:
            # The session's earlier rows may still be queued: read them once they are in.
            await self.journal.flush()
            stored = await self.history.session_status(session_id)
            if stored is not None:
                stored_owner, stored_state = stored
                if stored_owner is not None and stored_owner != owner_id:
                    raise SessionOwnershipError(session_id, stored_owner)
                if stored_state.is_final:
                    raise SessionFinishedError(session_id, stored_state.value)
        existing = self._live.sessions.get(session_id)  # again: the await may have let one in
        if existing is not None and existing.owner_id != owner_id:
            raise SessionOwnershipError(session_id, existing.owner_id)
        at = datetime.now(UTC)
        session = SessionInfo(
            session_id=session_id,
            owner_id=owner_id,
            executor_id=executor_id,
            task_name=task_name,
            state=SessionState.ACTIVE,
            created_at=existing.created_at if existing else at,
        )
        sequence = self._set_session(session, kind=AuditKind.SESSION_OPENED, at=at)
        if owner_id != executor_id:
            sequence = self._bind(LinkRole.CONSTELLATION, owner_id, session_id) or sequence
        sequence = self._bind(LinkRole.DEVICE, executor_id, session_id) or sequence
        try:
            await self.journal.wait(sequence)
        except BaseException:
            # Not durable in time (the caller timed out or was cancelled): the session will
            # not run, so it ends here, unless it has been taken over meanwhile.
            if self._live.sessions.get(session_id) is session:
                self._end(session_id, SessionState.FAILED, REASON_NOT_DURABLE)
            raise
        return session

    async def end_session(
        self, session_id: str, state: SessionState | str, reason: str | None = None
    ) -> None:
        """:meth:`remove_session` with an explicit final state, returning once durable."""
        await self._durable(self._end(session_id, state, reason))

    # -- device info -----------------------------------------------------------------------

    def set_device_info(self, device_id: str, device_info: dict[str, Any]) -> None:
        """Cache a device's system information; a snapshot is stored when it changed."""
        self._set_device_info(device_id, device_info)

    async def set_device_info_durable(self, device_id: str, device_info: dict[str, Any]) -> None:
        """:meth:`set_device_info`, returning once the snapshot (if any) is durable."""
        await self._durable(self._set_device_info(device_id, device_info))

    def _set_device_info(self, device_id: str, device_info: dict[str, Any]) -> int | None:
        device_id = require_id("device_id", device_id)
        document = require_document("device_info", device_info)
        self._check_open()
        digest = hashlib.sha256(document.encode()).hexdigest()
        cached = self._live.device_info.get(device_id)
        if cached is not None and cached.digest == digest:
            return None
        self._live.device_info[device_id] = DeviceInfoEntry(document, digest)
        at = datetime.now(UTC)
        self._append(
            Op.DEVICE_INFO,
            {
                "device_id": device_id,
                "captured_at": at,
                "digest": digest,
                "info": json.loads(document),
            },
        )
        return self._audit(AuditKind.DEVICE_INFO_CHANGED, at, client_id=device_id, digest=digest)

    def get_device_info(self, device_id: str) -> dict[str, Any] | None:
        """A copy of a device's cached information, or None."""
        cached = self._live.device_info.get(device_id)
        if cached is None:
            return None
        info: dict[str, Any] = json.loads(cached.document)
        return info


WSManager = Registry
"""The reference's name for the registry."""
