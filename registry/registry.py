"""The registry: the reference ``WSManager`` API over this node's live map, made durable.

Every method of the reference keeps its name, arguments and meaning and stays synchronous:
reads answer from memory with no I/O; mutations update memory and append to the journal,
whose writer task commits them in the background (group commit). ``await flush()`` returns once
everything before it is durable, and the ``*_durable`` variants (and the session lifecycle
methods) return only once their own change is. Use a registry from one event loop.

:class:`Registry` is a facade over the parts that hold the work: the live map
(:mod:`registry.livemap`), the client book (:mod:`registry.clientbook`), the session book
(:mod:`registry.sessionbook`), the node run (:mod:`registry.noderun`: lock, engine, journal,
heartbeat, recovery) and its recorder (:mod:`registry.recorder`: changes into rows).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from registry import closes
from registry.clientbook import ClientBook
from registry.errors import InvalidArgumentError
from registry.history import History
from registry.journal import DEFAULT_LIMIT, DEFAULT_LIMIT_BYTES, DEFAULT_STALL_SECONDS, Journal
from registry.livemap import LiveMap, S
from registry.noderun import NodeRun
from registry.sessionbook import SessionBook
from registry.store.dialect import DEFAULT_URL, is_sqlite, parse_url
from registry.types import (
    ClientInfo,
    ClientType,
    DuplicatePolicy,
    LinkRole,
    SessionInfo,
    SessionState,
)
from registry.validation import (
    DEFAULT_MAX_DEVICE_INFO_BYTES,
    DEFAULT_MAX_METADATA_BYTES,
    require_id,
    require_positive,
)


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """Whether the store keeps up, and the journal's figures (:meth:`Registry.store_status`)."""

    #: Why the store is not keeping up (a failing or stalled commit, a full journal), or None.
    fault: str | None
    #: Operations queued and not yet committed, and the depth at which new work is refused.
    depth: int
    limit: int
    #: Bytes the queued operations hold, and the bytes at which new work is refused.
    depth_bytes: int
    limit_bytes: int
    #: Registrations and sessions refused because the journal was full, by what was refused.
    refused: Mapping[str, int]


class Registry(Generic[S]):
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
    ``journal_limit`` (operations) and ``journal_limit_bytes`` (the JSON size of the documents
    they carry, plus 600 bytes each) bound it: at either, registrations and new sessions are
    refused with :class:`JournalFullError` (nothing changes); ends (disconnects, session ends)
    are still accepted, so what happened is never dropped. A commit still running after
    ``stall_timeout`` seconds (a database that hangs instead of failing) is logged and
    reported by ``journal.fault()`` like a failed one. A bulk load awaits :meth:`room`
    between calls to keep pace with the writer. A client's metadata and a device's info are
    at most ``max_metadata_bytes`` and ``max_device_info_bytes`` as JSON
    (:class:`InvalidArgumentError` otherwise).

    A SQLite database has one registry: :meth:`start` locks it (``<database>.lock``, released
    by :meth:`close` or when the process ends) and raises :class:`DatabaseInUseError` naming
    the holder if another registry has it. A SQLite file deleted or replaced while the
    registry runs is a store fault: nothing more is committed (or acknowledged as durable).
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
        journal_limit_bytes: int = DEFAULT_LIMIT_BYTES,
        stall_timeout: float = DEFAULT_STALL_SECONDS,
        max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
        max_device_info_bytes: int = DEFAULT_MAX_DEVICE_INFO_BYTES,
    ) -> None:
        url = parse_url(database_url or DEFAULT_URL)
        try:
            policy = DuplicatePolicy(on_duplicate)
        except ValueError:
            raise InvalidArgumentError(
                "on_duplicate", f"must be 'refuse' or 'replace', not {on_duplicate!r}"
            ) from None
        node_name = None if node_name is None else require_id("node_name", node_name)
        require_positive("heartbeat_interval", heartbeat_interval)
        require_positive("node_timeout", node_timeout)
        require_positive("close_timeout", close_timeout, allow_none=True)
        require_positive("journal_limit", journal_limit)
        require_positive("journal_limit_bytes", journal_limit_bytes)
        require_positive("stall_timeout", stall_timeout)
        require_positive("max_metadata_bytes", max_metadata_bytes)
        require_positive("max_device_info_bytes", max_device_info_bytes)
        self._run = NodeRun(
            url,
            node_name=node_name,
            auto_migrate=is_sqlite(url) if auto_migrate is None else auto_migrate,
            heartbeat_interval=heartbeat_interval,
            node_timeout=node_timeout,
            close_timeout=close_timeout,
            journal_limit=journal_limit,
            journal_limit_bytes=journal_limit_bytes,
            stall_timeout=stall_timeout,
        )
        self._live: LiveMap[S] = LiveMap()
        self._clients = ClientBook(
            self._live,
            self._run,
            on_duplicate=policy,
            metadata_cap=("max_metadata_bytes", max_metadata_bytes),
            device_info_cap=("max_device_info_bytes", max_device_info_bytes),
        )
        self._sessions = SessionBook(self._live, self._run)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This server run's row in ``nodes``; a registry started again gets a new one."""
        return self._run.node_id

    @property
    def database_url(self) -> str:
        """The database URL with any password hidden."""
        return self._run.database_url

    @property
    def engine(self) -> AsyncEngine:
        return self._run.engine

    @property
    def history(self) -> History:
        """History and statistics queries on the store (cluster-wide)."""
        return self._run.history

    @property
    def journal(self) -> Journal:
        return self._run.journal

    def store_status(self) -> StoreStatus:
        """How the store keeps up now (for health checks and metrics)."""
        journal = self._run.journal
        return StoreStatus(
            journal.fault(),
            journal.depth,
            journal.limit,
            journal.depth_bytes,
            journal.limit_bytes,
            dict(journal.refused),
        )

    def ensure_free(self) -> None:
        """Raise :class:`DatabaseInUseError` if another registry has this SQLite database now
        (a no-op for other databases): a check that can come ahead of :meth:`start`, which
        decides."""
        if self._run.file is not None:
            self._run.file.ensure_free()

    async def start(self) -> None:
        """Lock a SQLite database, migrate (or refuse), register this node run, recover from
        earlier runs, load state.

        Raises :class:`DatabaseInUseError` when another registry has the SQLite database,
        :class:`StoreUnavailableError` when the database cannot be reached or written and
        :class:`SchemaError` when its schema is behind or unknown; nothing is left open.
        """
        self._sessions.load(await self._run.start())

    async def close(self) -> None:
        """Close every live connection record (reason ``server_shutdown``), mark active sessions
        ``interrupted``, drain the journal and mark this node run stopped.

        Raises :class:`StoreUnavailableError` if the journal cannot be drained: the writer
        committed nothing for ``close_timeout`` seconds.
        """
        if not self._run.started:
            return
        await self._run.stop_heartbeat()
        self._clients.remove_all(closes.SERVER_SHUTDOWN.reason)
        self._sessions.interrupt_all()
        try:
            await self._run.stop()
        finally:
            self._live.clear()

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

    async def flush(self) -> None:
        """Return once every mutation made before this call is committed."""
        await self.journal.flush()

    async def room(self) -> None:
        """Keep pace with the writer: return at once while the journal is at most half full
        (by operations and by bytes), otherwise once the writer has caught up that far.

        Await it before each call of a bulk load (a loop of mutations), which then never
        outruns the store into :class:`JournalFullError`. Raises
        :class:`StoreUnavailableError` instead of waiting while the store is failing.
        """
        await self.journal.room()

    # -- clients ---------------------------------------------------------------------------

    def add_client(
        self,
        client_id: str,
        platform: str,
        websocket: S,
        client_type: ClientType | str,
        metadata: dict[str, Any] | None = None,
        *,
        remote_address: str | None = None,
        replacing: S | None = None,
    ) -> None:
        """Register a new client connection on this node.

        Raises :class:`InvalidArgumentError` for bad arguments (also metadata over
        ``max_metadata_bytes`` as JSON), :class:`DuplicateClientError` when ``client_id`` is
        live and the policy is ``refuse``, and :class:`JournalFullError` when the journal is
        at its limit; in each case nothing changes (a refused duplicate is audited).
        ``replacing`` names the websocket of a live registration of ``client_id`` to replace
        whatever the policy (the server passes one that did not answer a ping); a live
        registration on any other websocket still counts as a duplicate. A replaced
        registration's record is closed with :data:`registry.closes.REPLACED` (4411,
        ``replaced``); closing its websocket is the caller's.
        """
        self._clients.add(
            client_id, platform, websocket, client_type, metadata, remote_address, replacing
        )

    async def add_client_durable(
        self,
        client_id: str,
        platform: str,
        websocket: S,
        client_type: ClientType | str,
        metadata: dict[str, Any] | None = None,
        *,
        remote_address: str | None = None,
        replacing: S | None = None,
    ) -> ClientInfo:
        """:meth:`add_client`, returning (a copy of) the new info once it is durable."""
        live, sequence = self._clients.add(
            client_id, platform, websocket, client_type, metadata, remote_address, replacing
        )
        await self.journal.wait(sequence)
        return LiveMap.copy_info(live)

    def withdraw_client(
        self, client_id: str, websocket: S, *, reason: str = closes.STORE_UNAVAILABLE.reason
    ) -> None:
        """Undo a registration of ``client_id`` on ``websocket`` that the caller refused after
        making it (its commit did not come in time, or its device info was refused).

        The id is free at once. Nothing of the registration is ever written, nor device info
        set before it was committed, unless its rows were committed meanwhile (or are in the
        commit running now, which then succeeds): then its disconnect is recorded with
        ``reason``, as :meth:`remove_client` would. A no-op unless ``client_id`` is live on
        ``websocket``.
        """
        self._clients.withdraw(client_id, websocket, reason)

    def remove_client(
        self, client_id: str, *, code: int | None = None, reason: str | None = None
    ) -> None:
        """Remove a client from this node and close its connection record.

        ``code`` and ``reason`` (default ``removed``) are recorded with the disconnect. The id
        is free again at once. Session maps are left alone, as in the reference.
        """
        self._clients.remove(client_id, code, reason)

    async def remove_client_durable(
        self, client_id: str, *, code: int | None = None, reason: str | None = None
    ) -> None:
        """:meth:`remove_client`, returning once the disconnect is durable."""
        await self._run.durable(self._clients.remove(client_id, code, reason))

    def get_client(self, client_id: str) -> S | None:
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
        return self._live.infos_of_type(client_type)

    def get_clients_by_platform(self, platform: str) -> list[ClientInfo]:
        """Copies of this node's live clients on ``platform`` (case-insensitive)."""
        return self._live.infos_on_platform(platform)

    # -- session maps (reference) ----------------------------------------------------------

    def add_constellation_session(self, constellation_id: str, session_id: str) -> None:
        """Map a session to its constellation orchestrator."""
        self._sessions.bind(LinkRole.CONSTELLATION, constellation_id, session_id)

    def add_device_session(self, device_id: str, session_id: str) -> None:
        """Map a session to the device executing it."""
        self._sessions.bind(LinkRole.DEVICE, device_id, session_id)

    def get_constellation_sessions(self, constellation_id: str) -> set[str]:
        """A copy of the sessions mapped to a constellation."""
        return set(self._live.session_maps[LinkRole.CONSTELLATION].get(constellation_id, ()))

    def get_device_sessions(self, device_id: str) -> set[str]:
        """A copy of the sessions mapped to a device."""
        return set(self._live.session_maps[LinkRole.DEVICE].get(device_id, ()))

    def remove_constellation_sessions(self, constellation_id: str) -> None:
        """Remove all session mappings of a constellation (O(its links))."""
        self._sessions.unbind_client(LinkRole.CONSTELLATION, constellation_id)

    def remove_device_sessions(self, device_id: str) -> None:
        """Remove all session mappings of a device (O(its links))."""
        self._sessions.unbind_client(LinkRole.DEVICE, device_id)

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
        self._sessions.end(session_id, state, reason)

    # -- session lifecycle (server) --------------------------------------------------------

    def online_counts(self) -> dict[ClientType, int]:
        """How many clients of each type are live on this node (O(1), no copies)."""
        return {kind: len(clients) for kind, clients in self._live.by_type.items()}

    def session_counts(self) -> dict[SessionState, int]:
        """How many live sessions this node holds in each state: ``active`` ones, and
        ``interrupted`` ones waiting for their owner to resume or end them. A session leaves
        the count when it ends."""
        return self._sessions.counts()

    def get_session(self, session_id: str) -> SessionInfo | None:
        """The session if it is live on this node (active or interrupted), else None."""
        return self._live.sessions.get(session_id)

    def get_interrupted_sessions(self, client_id: str) -> list[SessionInfo]:
        """Sessions owned by ``client_id`` that were active when a server run stopped (O(its
        links)). Each stays until its owner re-opens it (:meth:`open_session`) or ends it."""
        return self._sessions.interrupted_of(client_id)

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
        return await self._sessions.open(session_id, owner_id, executor_id, task_name)

    async def end_session(
        self, session_id: str, state: SessionState | str, reason: str | None = None
    ) -> None:
        """:meth:`remove_session` with an explicit final state, returning once durable."""
        await self._run.durable(self._sessions.end(session_id, state, reason))

    # -- device info -----------------------------------------------------------------------

    def set_device_info(self, device_id: str, device_info: dict[str, Any]) -> None:
        """Cache a device's system information; a snapshot is stored when it changed."""
        self._clients.set_device_info(device_id, device_info)

    async def set_device_info_durable(self, device_id: str, device_info: dict[str, Any]) -> None:
        """:meth:`set_device_info`, returning once the snapshot (if any) is durable."""
        await self._run.durable(self._clients.set_device_info(device_id, device_info))

    def get_device_info(self, device_id: str) -> dict[str, Any] | None:
        """A copy of a device's cached information, or None."""
        cached = self._live.device_info.get(device_id)
        info: dict[str, Any] | None = None if cached is None else json.loads(cached.document)
        return info


WSManager = Registry
"""The reference's name for the registry."""
