"""The ``/ws`` endpoint: the loop that ties a connection's transport (:mod:`.peer`) to the AIP
rules (:mod:`.aip`) and the registry — receive, apply the rules, send or close, and clean up.

Frames of one connection are handled in order, in its own receive loop; sessions run as tasks
of the :class:`~registry.server.sessions.SessionManager`, at most ``max_sessions_per_client``
per requester. Whatever way the loop ends, ``finally`` records the disconnect with its close
code and reason and frees the client id.

A client id claimed while a connection holds it: with ``on_duplicate=refuse`` the holder is
pinged at once and keeps its id if it answers within ``twin_ping_timeout`` (the newcomer gets
4409); otherwise, and always with ``on_duplicate=replace``, the holder is *replaced*: closed
with 4411 ``replaced``, its sessions ended as at a disconnect, and nothing it sends or does
afterwards touches the new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from typing import NoReturn

from starlette.websockets import WebSocket, WebSocketDisconnect

from registry import closes
from registry.closes import Disconnect
from registry.errors import (
    DuplicateClientError,
    InvalidArgumentError,
    JournalFullError,
    RegistryClosedError,
    SessionFinishedError,
    SessionOwnershipError,
    StoreUnavailableError,
)
from registry.registry import Registry
from registry.server import aip, closecodes
from registry.server.apikey import presented_key, token_matches
from registry.server.durability import settle
from registry.server.peer import Closed, Peer, PeerState, ServerShutdown
from registry.server.protocol import (
    ClientMessage,
    ClientMessageType,
    ack,
    error,
    registration_ack,
)
from registry.server.sessions import SessionManager
from registry.settings import Settings
from registry.types import ClientType, DuplicatePolicy

logger = logging.getLogger(__name__)

#: What a registration the registry refuses may raise (:func:`aip.registration_refused`).
_REGISTRATION_REFUSALS = (
    TimeoutError,
    JournalFullError,
    DuplicateClientError,
    InvalidArgumentError,
)
#: What opening a session may raise besides a bug (:func:`aip.task_refused`).
_TASK_REFUSALS = (
    SessionOwnershipError,
    SessionFinishedError,
    InvalidArgumentError,
    TimeoutError,
    StoreUnavailableError,
)


@dataclass(slots=True)
class _Connection:
    peer: Peer
    identity: aip.Identity
    #: The sessions it executes and owns, taken when it was replaced: all that its end ends.
    left_behind: tuple[list[str], list[str]] | None = None


class Endpoint:
    """The WebSocket handler, one instance per app."""

    def __init__(
        self, settings: Settings, registry: Registry[Peer], sessions: SessionManager
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._sessions = sessions
        #: Every open peer, with its connection once registered.
        self._peers: dict[Peer, _Connection | None] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the idle sweeper (one task for every connection, instead of a timer per
        frame): it closes peers that sent nothing for ``idle_timeout`` seconds."""
        self._sweeper = asyncio.get_running_loop().create_task(
            self._sweep(), name="registry-idle-sweeper"
        )

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def _sweep(self) -> None:
        idle = self._settings.idle_timeout
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(idle / 4, 5.0))
            deadline = loop.time() - idle
            stale = [peer for peer in self._peers if peer.last_heard < deadline]
            if stale:
                await asyncio.gather(*(peer.close(closes.IDLE_TIMEOUT) for peer in stale))

    async def __call__(self, websocket: WebSocket) -> None:
        settings = self._settings
        if not token_matches(presented_key(websocket), settings.api_key):
            await websocket.close(code=closecodes.POLICY_VIOLATION)  # before accept: HTTP 403
            return
        await websocket.accept()
        peer = Peer(
            websocket,
            settings.send_timeout,
            settings.max_frames_per_second,
            float(settings.frame_burst),
        )
        self._peers[peer] = None
        connection: _Connection | None = None
        ended = Disconnect(None, "closed")
        shutdown = False
        try:
            try:
                connection = await self._handshake(peer)
                self._peers[peer] = connection
                await self._welcome(connection)
                await self._serve(connection)
            finally:
                peer.finished()  # from here on nothing cancels this task for being slow
        except WebSocketDisconnect as exc:
            ended = Disconnect(exc.code, exc.reason or closes.REASONS.get(exc.code, "closed"))
            shutdown = isinstance(exc, ServerShutdown)
        except Closed as exc:
            ended = exc.close
            await peer.close(ended)
        except Exception:
            logger.exception("connection handler failed")
            ended = closes.INTERNAL_ERROR
            await peer.close(ended)
        except asyncio.CancelledError:
            # Given up as a slow consumer (Peer cancelled this task): clean up below. Any
            # other cancellation (or one more besides) goes on.
            task = asyncio.current_task()
            if peer.state is not PeerState.ABANDONED or task is None or task.uncancel() > 0:
                raise
        finally:
            self._peers.pop(peer, None)
            peer.open_gate()  # senders waiting for the handshake find the socket closed
            if peer.closed_by_server is not None:
                ended = peer.closed_by_server
            if connection is not None:
                await self._disconnected(connection, ended, keep_sessions=shutdown)

    async def _disconnected(
        self, connection: _Connection, ended: Disconnect, *, keep_sessions: bool
    ) -> None:
        """Free the client id and end the sessions the connection leaves behind, unless the
        server is shutting down (``keep_sessions``): then closing the registry marks them
        ``interrupted``, and their owners hear of them when they reconnect after the restart
        (as after a crash), instead of never."""
        client_id = connection.identity.client_id
        # The sessions this connection leaves behind, taken before anything awaits (or when it
        # was replaced): a client reconnecting meanwhile starts sessions that are not this
        # connection's to end.
        if keep_sessions:
            executing: list[str] = []
            owned: list[str] = []
        else:
            executing, owned = connection.left_behind or self._left_behind(connection)
        # Free the id at once (docs/protocol.md: a quick reconnect is not refused); the disconnect
        # is made durable below, after the sessions have been ended.
        if self._registry.get_client(client_id) is connection.peer:
            self._registry.remove_client(client_id, code=ended.code, reason=ended.reason)
        try:
            await self._sessions.executor_left(client_id, executing)
            await self._sessions.owner_left(client_id, owned)
        finally:
            with contextlib.suppress(RegistryClosedError):  # closed: its close drained it all
                await settle(
                    self._registry,
                    self._settings.store_timeout,
                    f"the disconnect of {client_id}",
                )
            logger.info("client %s disconnected (%s, %s)", client_id, ended.code, ended.reason)

    def _left_behind(self, connection: _Connection) -> tuple[list[str], list[str]]:
        """The running sessions a connection would leave behind if it ended now: those it
        executes (a device) and those it owns."""
        client_id = connection.identity.client_id
        executing = (
            self._sessions.executing(client_id)
            if connection.identity.client_type is ClientType.DEVICE
            else []
        )
        return executing, self._sessions.owned(client_id)

    async def _displace(self, peer: Peer) -> None:
        """Close a connection that a newer registration of its client id replaced (4411). Its
        sessions are taken now, before anything awaits, so that its end (whenever its handler
        sees it) ends those and nothing the new connection starts."""
        connection = self._peers.get(peer)
        if connection is not None:
            connection.left_behind = self._left_behind(connection)
        # Not answering pings, it may not take a close frame either: do not wait long for it.
        await peer.close(closes.REPLACED, within=self._settings.twin_ping_timeout)

    async def _handshake(self, peer: Peer) -> _Connection:
        """The registration: its first frame checked by the rules, then recorded (durable
        before it is acknowledged); raises :class:`Closed` when refused."""
        try:
            async with asyncio.timeout(self._settings.handshake_timeout):
                text = await peer.receive()
        except TimeoutError:
            raise Closed(closes.IDLE_TIMEOUT) from None
        registration = aip.registration(text, self._registry.is_device_connected)
        if isinstance(registration, aip.Refusal):
            await _refuse(peer, registration)
        refusal = await self._register(peer, registration)
        if refusal is not None:
            await _refuse(peer, refusal)
        if peer.closed_by_server is not None:
            # Replaced by a newer registration while this one was committed: it never starts.
            raise Closed(peer.closed_by_server)
        return _Connection(peer, registration.identity)

    async def _register(self, peer: Peer, registration: aip.Registration) -> aip.Refusal | None:
        """Record ``registration`` on ``peer`` and wait until it is durable, replacing the
        holder of its client id if the policy says so; the refusal if the registry refused."""
        identity = registration.identity
        client_id = identity.client_id
        client = peer.websocket.client
        replacing = await self._unresponsive_holder(client_id)
        try:
            holder = self._registry.get_client(client_id)  # replaced if add_client succeeds
            self._registry.add_client(
                client_id,
                registration.platform,
                peer,
                identity.client_type,
                registration.metadata,
                remote_address=f"{client.host}:{client.port}" if client else None,
                replacing=replacing,
            )
            if registration.system_info is not None:
                self._registry.set_device_info(client_id, registration.system_info)
            if holder is not None:
                logger.warning(
                    "client %s registered again: its earlier connection is replaced (%s)",
                    client_id,
                    "on_duplicate=replace" if replacing is None else "it did not answer a ping",
                )
                await self._displace(holder)
            # One wait for both writes: the registration is durable before it is acknowledged.
            async with asyncio.timeout(self._settings.store_timeout):
                await self._registry.flush()
        except _REGISTRATION_REFUSALS as exc:
            self._withdraw(peer, client_id, exc)
            return aip.registration_refused(exc)
        return None

    def _withdraw(self, peer: Peer, client_id: str, refused: Exception) -> None:
        """Undo what a refused registration left (never written) and log why it was refused."""
        if isinstance(refused, TimeoutError):
            logger.warning(
                "registration of %s refused: not durable within %gs",
                client_id,
                self._settings.store_timeout,
            )
            self._registry.withdraw_client(client_id, peer)  # refused: never written
        elif isinstance(refused, JournalFullError):
            logger.warning("client %s: %s", client_id, refused)
        elif isinstance(refused, InvalidArgumentError):
            # Added, then its device info refused: neither is ever written.
            self._registry.withdraw_client(
                client_id, peer, reason=closes.INVALID_REGISTRATION.reason
            )

    async def _unresponsive_holder(self, client_id: str) -> Peer | None:
        """The connection holding ``client_id`` if it does not answer a ping within
        ``twin_ping_timeout`` (policy ``refuse``; ``replace`` replaces it anyway). A client
        frozen or cut off without a FIN would otherwise keep its id until the keepalive pings
        give up (``ping_interval`` + ``ping_timeout``) and lock its own reconnects out."""
        holder = self._registry.get_client(client_id)
        if holder is None or self._settings.on_duplicate is DuplicatePolicy.REPLACE:
            return None
        return None if await holder.alive(within=self._settings.twin_ping_timeout) else holder

    async def _welcome(self, connection: _Connection) -> None:
        """Acknowledge a registration (the first frame the client gets after ``register``),
        then hand the client's interrupted sessions to the runner."""
        if not await connection.peer.send_first(registration_ack(), open_gate=True):
            lost = closes.CONNECTION_LOST
            raise WebSocketDisconnect(lost.code, lost.reason)
        identity = connection.identity
        logger.info("client %s registered as %s", identity.client_id, identity.client_type.value)
        await self._sessions.resume_interrupted(identity.client_id)

    async def _serve(self, connection: _Connection) -> None:
        peer = connection.peer
        while True:
            text = await peer.receive()
            if text is None:
                await peer.send(error("Binary frames are not supported; send JSON text frames"))
                continue
            parsed = aip.parse(text)
            if isinstance(parsed, str):
                await peer.send(error(parsed))
                continue
            await self._handle(connection, parsed)

    async def _handle(self, connection: _Connection, message: ClientMessage) -> None:
        peer, identity = connection.peer, connection.identity
        reply = aip.misdirected(identity, message) or aip.direct_reply(message)
        if reply is not None:
            await peer.send(reply)
            return
        match message.type:
            case ClientMessageType.TASK:
                await self._task(connection, message)
            case ClientMessageType.COMMAND_RESULTS:
                if not self._sessions.deliver(identity.client_id, message):
                    logger.info("dropped command_results from %s", identity.client_id)
            case ClientMessageType.DEVICE_INFO_REQUEST:
                lookup = self._registry.get_device_info
                await peer.send(aip.device_info(identity, message, lookup))
            case ClientMessageType.TASK_END | ClientMessageType.DEVICE_INFO_RESPONSE:
                # The server never asks for these; accepted and ignored, as by UFO's server.
                logger.info("%s from %s ignored", message.type.value, identity.client_id)

    async def _task(self, connection: _Connection, message: ClientMessage) -> None:
        peer, identity = connection.peer, connection.identity
        requester = identity.client_id
        registry = self._registry
        executor = aip.task_executor(
            identity, message, registry.is_online, registry.is_device_connected
        )
        if not isinstance(executor, str):
            await peer.send(executor)
            return
        task_name = aip.sanitise_task_name(message.task_name)
        if identity.client_type is ClientType.DEVICE:
            # A device taking up a task dispatched to it (UFO's device client answers the
            # dispatch's task frame with a task request of its own).
            dispatched = self._sessions.dispatched_to(requester, message.session_id, task_name)
            if dispatched is not None:
                await peer.send(ack(session_id=dispatched))
                self._sessions.take_up(dispatched)
                return
        session_id = message.session_id or str(uuid.uuid4())
        known = registry.get_session(session_id)
        refusal = aip.session_refused(
            requester,
            session_id,
            active=self._sessions.active_count(requester),
            limit=self._settings.max_sessions_per_client,
            owner_id=None if known is None else known.owner_id,
            running=self._sessions.is_running(session_id),
        )
        if refusal is not None:
            await peer.send(refusal)
            return
        try:
            async with asyncio.timeout(self._settings.store_timeout):
                await registry.open_session(
                    session_id, owner_id=requester, executor_id=executor, task_name=task_name
                )
        except _TASK_REFUSALS as exc:
            if isinstance(exc, TimeoutError | StoreUnavailableError):
                # Refused, not started (open_session has ended a session it could not record).
                logger.warning("task %s of %s refused: %r", session_id, requester, exc)
            await peer.send(aip.task_refused(exc, session_id))
            return
        await peer.send(ack(session_id=session_id))
        self._sessions.start(
            self._sessions.context(session_id, task_name, message.request, requester, executor)
        )


async def _refuse(peer: Peer, refusal: aip.Refusal) -> NoReturn:
    """Send a refused handshake its error frame (if any), then close it as the rules say."""
    if refusal.error is not None:
        await peer.send_first(error(refusal.error))
    raise Closed(refusal.close)
