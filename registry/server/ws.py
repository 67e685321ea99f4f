"""The ``/ws`` endpoint: docs/protocol.md's handshake, identity pinning and message handling.

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
import json
import logging
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from registry.errors import (
    DuplicateClientError,
    InvalidArgumentError,
    JournalFullError,
    RegistryClosedError,
    SessionFinishedError,
    SessionOwnershipError,
    StoreUnavailableError,
)
from registry.registry import REASON_REPLACED, Registry
from registry.server import closecodes
from registry.server.durability import settle
from registry.server.peer import Peer
from registry.server.protocol import (
    ClientMessage,
    ClientMessageType,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
    ack,
    error,
    registration_ack,
)
from registry.server.sessions import SessionManager
from registry.settings import Settings
from registry.types import ClientType, DuplicatePolicy

logger = logging.getLogger(__name__)

#: The error frame of a registration or task refused because the store is not keeping up
#: (the details, which may name the database, go to the log, not to the client).
STORE_BEHIND = (
    "Refused: the server cannot record this now (its store is not keeping up); try again later"
)
_UNSAFE_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]")
_MESSAGE_TYPES = {kind.value for kind in ClientMessageType}


def sanitise_task_name(name: str | None) -> str:
    """``[A-Za-z0-9._-]`` only (others become ``_``), no leading dots; a uuid4 when empty."""
    if not name:
        return str(uuid.uuid4())
    cleaned = _UNSAFE_NAME_CHARACTERS.sub("_", name).lstrip(".")
    return cleaned or str(uuid.uuid4())


def presented_key(websocket: WebSocket) -> str | None:
    """The key a client presents at the handshake: its ``X-API-Key`` header, else its
    ``Authorization: Bearer`` header, else the ``token`` query parameter (UFO's clients)."""
    headers = websocket.headers
    key = headers.get("x-api-key")
    if key is not None:
        return key
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    return websocket.query_params.get("token")


def token_matches(given: str | None, expected: str | None) -> bool:
    """Constant-time check of a presented key; anything goes when no key is configured."""
    if expected is None:
        return True
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


class _Closed(Exception):
    """The server closed the connection on purpose; ``code``/``reason`` are recorded."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _ServerShutdown(WebSocketDisconnect):
    """The server (uvicorn) is shutting down and closed the connection itself."""

    def __init__(self) -> None:
        super().__init__(closecodes.SERVICE_RESTART, "server_shutdown")


@dataclass(slots=True)
class _Connection:
    peer: Peer
    client_id: str
    client_type: ClientType
    target_id: str | None
    #: The sessions it executes and owns, taken when it was replaced: all that its end ends.
    left_behind: tuple[list[str], list[str]] | None = None


def _parse(text: str) -> ClientMessage | str:
    """A client frame, or the text of the error frame to answer it with."""
    try:
        return ClientMessage.model_validate_json(text)  # the fast path: one pass, in Rust
    except ValidationError:
        pass  # parse again, step by step, to say what is wrong
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:
        return f"Invalid message: not valid JSON ({exc.args[0] if exc.args else exc})"
    except RecursionError:
        return "Invalid message: nested too deeply"
    if not isinstance(raw, dict):
        return "Invalid message: expected a JSON object"
    kind = raw.get("type")
    if isinstance(kind, str) and kind not in _MESSAGE_TYPES:
        return f"Unknown message type: {kind}"
    try:
        return ClientMessage.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'message'}: {problem['msg']}"
            for problem in exc.errors()[:5]
        )
        return f"Invalid message: {problems}"


class Endpoint:
    """The WebSocket handler, one instance per app."""

    def __init__(self, settings: Settings, registry: Registry, sessions: SessionManager) -> None:
        self._settings = settings
        self._registry = registry
        self._sessions = sessions
        #: Every open peer, with its connection once registered.
        self._peers: dict[Peer, _Connection | None] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._frame_rate = settings.max_frames_per_second
        self._frame_burst = float(settings.frame_burst)

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
                await asyncio.gather(
                    *(peer.close(closecodes.IDLE_TIMEOUT, "idle_timeout") for peer in stale)
                )

    async def __call__(self, websocket: WebSocket) -> None:
        if not token_matches(presented_key(websocket), self._settings.api_key):
            await websocket.close(code=closecodes.POLICY_VIOLATION)  # before accept: HTTP 403
            return
        await websocket.accept()
        peer = Peer(websocket, self._settings.send_timeout)
        peer.frame_allowance = float(self._settings.frame_burst)
        self._peers[peer] = None
        connection: _Connection | None = None
        code: int | None = None
        reason = "closed"
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
            code = exc.code
            reason = exc.reason or closecodes.REASONS.get(exc.code, "closed")
            shutdown = isinstance(exc, _ServerShutdown)
        except _Closed as exc:
            code, reason = exc.code, exc.reason
            await peer.close(exc.code, exc.reason)
        except Exception:
            logger.exception("connection handler failed")
            code, reason = closecodes.INTERNAL_ERROR, "internal_error"
            await peer.close(code, reason)
        except asyncio.CancelledError:
            # Given up as a slow consumer (Peer cancelled this task): clean up below. Any
            # other cancellation (or one more besides) goes on.
            task = asyncio.current_task()
            if not peer.abandoned or task is None or task.uncancel() > 0:
                raise
        finally:
            self._peers.pop(peer, None)
            peer.open_gate()  # senders waiting for the handshake find the socket closed
            if peer.closed_by_server is not None:
                code, reason = peer.closed_by_server
            if connection is not None:
                await self._disconnected(connection, code, reason, keep_sessions=shutdown)

    async def _disconnected(
        self, connection: _Connection, code: int | None, reason: str, *, keep_sessions: bool
    ) -> None:
        """Free the client id and end the sessions the connection leaves behind, unless the
        server is shutting down (``keep_sessions``): then closing the registry marks them
        ``interrupted``, and their owners hear of them when they reconnect after the restart
        (as after a crash), instead of never."""
        client_id = connection.client_id
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
            self._registry.remove_client(client_id, code=code, reason=reason)
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
            logger.info("client %s disconnected (%s, %s)", client_id, code, reason)

    def _left_behind(self, connection: _Connection) -> tuple[list[str], list[str]]:
        """The running sessions a connection would leave behind if it ended now: those it
        executes (a device) and those it owns."""
        client_id = connection.client_id
        executing = (
            self._sessions.executing(client_id)
            if connection.client_type is ClientType.DEVICE
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
        await peer.close(
            closecodes.REPLACED, REASON_REPLACED, within=self._settings.twin_ping_timeout
        )

    async def _receive(self, peer: Peer) -> str | None:
        """The next text frame (None for a binary one); raises on disconnect. Idle peers are
        closed by the sweeper, which makes this raise too.

        Flood control: a token bucket per connection, refilled at ``max_frames_per_second``
        up to ``frame_burst`` and charged one token per frame; a frame that finds it empty
        closes the connection with 4429 ``rate_limited``."""
        if peer.abandoned:  # given up by a send of this very task (Peer): do not wait on
            raise _Closed(closecodes.SLOW_CONSUMER, "slow_consumer")
        message = await peer.websocket.receive()
        now = asyncio.get_running_loop().time()
        allowance = peer.frame_allowance + (now - peer.last_heard) * self._frame_rate
        peer.frame_allowance = (
            allowance if allowance < self._frame_burst else self._frame_burst
        ) - 1.0
        peer.last_heard = now
        if message["type"] == "websocket.disconnect":
            code: int = message.get("code", 1000)
            # uvicorn's own disconnect events carry no "reason" key; a client's close frame
            # always does (possibly ""). Without one, 1005 is a connection lost without a
            # close frame (recorded as 1006), and 1012 is uvicorn closing it on shutdown.
            if "reason" not in message:
                if code == 1005:
                    raise WebSocketDisconnect(1006, "connection_lost")
                if code == closecodes.SERVICE_RESTART:
                    raise _ServerShutdown()
            reason: str | None = message.get("reason")
            # The reason is the client's text: keep it storable (PostgreSQL refuses NUL).
            raise WebSocketDisconnect(code, reason.replace("\x00", "\ufffd") if reason else None)
        if peer.closed_by_server is not None:
            # Closed by the server meanwhile (replaced, idle): what the peer still sent is moot.
            raise _Closed(*peer.closed_by_server)
        if peer.frame_allowance < 0.0:
            raise _Closed(closecodes.RATE_LIMITED, "rate_limited")
        text: str | None = message.get("text")
        return text

    async def _handshake(self, peer: Peer) -> _Connection:
        try:
            async with asyncio.timeout(self._settings.handshake_timeout):
                text = await self._receive(peer)
        except TimeoutError:
            raise _Closed(closecodes.IDLE_TIMEOUT, "idle_timeout") from None
        if text is None:
            raise _Closed(closecodes.INVALID_REGISTRATION, "binary_registration")
        parsed = _parse(text)
        if isinstance(parsed, str):
            await peer.send_first(error(parsed))
            raise _Closed(closecodes.INVALID_REGISTRATION, "invalid_registration")
        if parsed.type is not ClientMessageType.REGISTER:
            await peer.send_first(error("First message must be a register message"))
            raise _Closed(closecodes.INVALID_REGISTRATION, "invalid_registration")
        if not parsed.client_id:
            await peer.send_first(error("Client ID is required for WebSocket registration"))
            raise _Closed(closecodes.INVALID_REGISTRATION, "invalid_registration")
        client_id, client_type = parsed.client_id, parsed.client_type
        metadata = parsed.metadata or {}
        platform = metadata.get("platform") or "windows"
        target = parsed.target_id
        if (
            client_type is ClientType.CONSTELLATION
            and target
            and not self._registry.is_device_connected(target)
        ):
            await peer.send_first(error(f"Target device '{target}' is not connected"))
            raise _Closed(closecodes.TARGET_NOT_CONNECTED, "target_not_connected")
        client = peer.websocket.client
        replacing = await self._unresponsive_holder(client_id)
        try:
            holder = self._registry.get_client(client_id)  # replaced if add_client succeeds
            self._registry.add_client(
                client_id,
                platform if isinstance(platform, str) else str(platform),
                peer,
                client_type,
                metadata,
                remote_address=f"{client.host}:{client.port}" if client else None,
                replacing=replacing,
            )
            system_info = metadata.get("system_info")
            if client_type is ClientType.DEVICE and isinstance(system_info, dict):
                self._registry.set_device_info(client_id, system_info)
            if isinstance(holder, Peer):
                logger.warning(
                    "client %s registered again: its earlier connection is replaced (%s)",
                    client_id,
                    "on_duplicate=replace" if replacing is None else "it did not answer a ping",
                )
                await self._displace(holder)
            # One wait for both writes: the registration is durable before it is acknowledged.
            async with asyncio.timeout(self._settings.store_timeout):
                await self._registry.flush()
        except TimeoutError:
            logger.warning(
                "registration of %s refused: not durable within %gs",
                client_id,
                self._settings.store_timeout,
            )
            if self._registry.get_client(client_id) is peer:
                self._registry.remove_client(client_id, reason="store_unavailable")
            await peer.send_first(error(STORE_BEHIND))
            raise _Closed(closecodes.STORE_UNAVAILABLE, "store_unavailable") from None
        except JournalFullError as exc:
            logger.warning("client %s: %s", client_id, exc)
            await peer.send_first(error(STORE_BEHIND))
            raise _Closed(closecodes.STORE_UNAVAILABLE, "journal_full") from None
        except DuplicateClientError as exc:
            await peer.send_first(error(str(exc)))
            raise _Closed(closecodes.DUPLICATE_CLIENT, "duplicate_client") from None
        except InvalidArgumentError as exc:
            if self._registry.get_client(client_id) is peer:
                self._registry.remove_client(client_id, reason="invalid_registration")
                await settle(
                    self._registry,
                    self._settings.store_timeout,
                    f"the refused registration of {client_id}",
                )
            await peer.send_first(error(f"Invalid registration: {exc}"))
            raise _Closed(closecodes.INVALID_REGISTRATION, "invalid_registration") from None
        if peer.closed_by_server is not None:
            # Replaced by a newer registration while this one was committed: it never starts.
            raise _Closed(*peer.closed_by_server)
        return _Connection(peer, client_id, client_type, parsed.target_id)

    async def _unresponsive_holder(self, client_id: str) -> Peer | None:
        """The connection holding ``client_id`` if it does not answer a ping within
        ``twin_ping_timeout`` (policy ``refuse``; ``replace`` replaces it anyway). A client
        frozen or cut off without a FIN would otherwise keep its id until the keepalive pings
        give up (``ping_interval`` + ``ping_timeout``) and lock its own reconnects out."""
        holder = self._registry.get_client(client_id)
        if not isinstance(holder, Peer) or self._settings.on_duplicate is DuplicatePolicy.REPLACE:
            return None
        return None if await holder.alive(within=self._settings.twin_ping_timeout) else holder

    async def _welcome(self, connection: _Connection) -> None:
        """Acknowledge a registration (the first frame the client gets after ``register``),
        then hand the client's interrupted sessions to the runner."""
        if not await connection.peer.send_first(registration_ack(), open_gate=True):
            raise WebSocketDisconnect(1006, "connection_lost")
        logger.info(
            "client %s registered as %s", connection.client_id, connection.client_type.value
        )
        await self._sessions.resume_interrupted(connection.client_id)

    async def _serve(self, connection: _Connection) -> None:
        peer = connection.peer
        while True:
            text = await self._receive(peer)
            if text is None:
                await peer.send(error("Binary frames are not supported; send JSON text frames"))
                continue
            parsed = _parse(text)
            if isinstance(parsed, str):
                await peer.send(error(parsed))
                continue
            await self._handle(connection, parsed)

    async def _handle(self, connection: _Connection, message: ClientMessage) -> None:
        peer = connection.peer
        if message.client_id is not None and message.client_id != connection.client_id:
            await peer.send(error("client_id does not match the registered connection"))
            return
        kind = message.type
        claimed = message.client_type
        if kind is not ClientMessageType.HEARTBEAT and (
            (connection.client_type is ClientType.DEVICE and claimed is ClientType.CONSTELLATION)
            or (
                connection.client_type is ClientType.CONSTELLATION
                and claimed is ClientType.DEVICE
                and kind is ClientMessageType.TASK
            )
        ):
            await peer.send(error("client_type does not match the registered connection"))
            return
        match kind:
            case ClientMessageType.HEARTBEAT:
                await peer.send(ack(response_id=str(uuid.uuid4())))
            case ClientMessageType.TASK:
                await self._task(connection, message)
            case ClientMessageType.COMMAND_RESULTS:
                if not self._sessions.deliver(connection.client_id, message):
                    logger.info("dropped command_results from %s", connection.client_id)
            case ClientMessageType.DEVICE_INFO_REQUEST:
                await self._device_info(connection, message)
            case ClientMessageType.ERROR:
                await peer.send(error(message.error or "Unknown error"))
            case ClientMessageType.REGISTER:
                await peer.send(error("Already registered on this connection"))
            case ClientMessageType.TASK_END | ClientMessageType.DEVICE_INFO_RESPONSE:
                # The server never asks for these; accepted and ignored, as by UFO's server.
                logger.info("%s from %s ignored", kind.value, connection.client_id)

    async def _device_info(self, connection: _Connection, message: ClientMessage) -> None:
        peer = connection.peer
        if connection.client_type is not ClientType.CONSTELLATION:
            await peer.send(
                error("DEVICE_INFO_REQUEST is permitted only for constellation clients")
            )
            return
        device_id = message.target_id or ""
        if connection.target_id is not None and device_id != connection.target_id:
            await peer.send(error("Not authorized to request device info for this device"))
            return
        info = self._registry.get_device_info(device_id)
        await peer.send(
            ServerMessage(
                type=ServerMessageType.DEVICE_INFO_RESPONSE,
                status=TaskStatus.OK,
                response_id=message.request_id,
                result=info
                or {"error": f"Device {device_id} not found or no system info available"},
            )
        )

    async def _task(self, connection: _Connection, message: ClientMessage) -> None:
        peer = connection.peer
        requester = connection.client_id
        if connection.client_type is ClientType.CONSTELLATION:
            target = message.target_id
            if not target:
                await peer.send(error("Constellation task requests require target_id"))
                return
            if not self._registry.is_online(target):
                await peer.send(error(f"Device '{target}' is not connected"))
                return
            if not self._registry.is_device_connected(target):
                await peer.send(error("Constellation tasks may only target device clients"))
                return
            if connection.target_id is not None and target != connection.target_id:
                await peer.send(error("Not authorized to send tasks to this device"))
                return
            executor = target
        else:
            if message.target_id and message.target_id != requester:
                await peer.send(error("Device clients may not target other devices"))
                return
            executor = requester
        task_name = sanitise_task_name(message.task_name)
        if connection.client_type is ClientType.DEVICE:
            # A device taking up a task dispatched to it (UFO's device client answers the
            # dispatch's task frame with a task request of its own).
            dispatched = self._sessions.dispatched_to(requester, message.session_id, task_name)
            if dispatched is not None:
                await peer.send(ack(session_id=dispatched))
                self._sessions.take_up(dispatched)
                return
        limit = self._settings.max_sessions_per_client
        if self._sessions.active_count(requester) >= limit:
            await peer.send(error(f"Too many active sessions (limit {limit})"))
            return
        session_id = message.session_id or str(uuid.uuid4())
        known = self._registry.get_session(session_id)
        if known is not None and known.owner_id != requester:
            # Ownership first: another client must not learn more than that (docs/protocol.md).
            refusal = SessionOwnershipError(session_id, known.owner_id)
            await peer.send(error(str(refusal), session_id=session_id))
            return
        if self._sessions.is_running(session_id):
            await peer.send(error(f"session_id '{session_id}' is already running"))
            return
        try:
            async with asyncio.timeout(self._settings.store_timeout):
                await self._registry.open_session(
                    session_id, owner_id=requester, executor_id=executor, task_name=task_name
                )
        except (SessionOwnershipError, SessionFinishedError) as exc:
            await peer.send(error(str(exc), session_id=session_id))
            return
        except InvalidArgumentError as exc:
            await peer.send(error(f"Invalid task: {exc}", session_id=session_id))
            return
        except (TimeoutError, StoreUnavailableError) as exc:
            # Refused, not started (open_session has ended a session it could not record).
            logger.warning("task %s of %s refused: %r", session_id, requester, exc)
            await peer.send(error(STORE_BEHIND, session_id=session_id))
            return
        await peer.send(ack(session_id=session_id))
        self._sessions.start(
            self._sessions.context(session_id, task_name, message.request, requester, executor)
        )
