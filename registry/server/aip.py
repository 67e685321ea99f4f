"""The AIP rules (docs/protocol.md): what the server answers to a client's frame.

Plain functions of a parsed frame and the state they need (the registration's identity, what
the registry says is connected), with no socket and no store: each returns the frames to send,
or for the handshake a :class:`Refusal` (an error frame, then a close with a
:class:`~registry.closes.Close`). The endpoint (:mod:`registry.server.ws`) does the I/O.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from registry import closes
from registry.closes import Close
from registry.errors import (
    DuplicateClientError,
    InvalidArgumentError,
    JournalFullError,
    SessionFinishedError,
    SessionOwnershipError,
)
from registry.server.protocol import (
    ClientMessage,
    ClientMessageType,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
    ack,
    error,
)
from registry.types import ClientType

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


def parse(text: str) -> ClientMessage | str:
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


@dataclass(frozen=True, slots=True)
class Refusal:
    """A handshake refused: the error frame to send first (if any), then the close."""

    close: Close
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a registered connection is: what its later frames are checked against."""

    client_id: str
    client_type: ClientType
    #: The one device a constellation registered for (None: any device).
    target_id: str | None


@dataclass(frozen=True, slots=True)
class Registration:
    """A register frame the rules accept: what the registry is to record."""

    identity: Identity
    platform: str
    metadata: dict[str, Any]
    #: A device's ``metadata.system_info``, recorded as its device info.
    system_info: dict[str, Any] | None


def registration(
    text: str | None, is_device_connected: Callable[[str], bool]
) -> Registration | Refusal:
    """The first frame of a connection: a register frame with a client id (and, for a
    constellation that names a target, a connected target device), or refused."""
    if text is None:
        return Refusal(closes.BINARY_REGISTRATION)
    parsed = parse(text)
    if isinstance(parsed, str):
        return Refusal(closes.INVALID_REGISTRATION, parsed)
    if parsed.type is not ClientMessageType.REGISTER:
        return Refusal(closes.INVALID_REGISTRATION, "First message must be a register message")
    if not parsed.client_id:
        return Refusal(
            closes.INVALID_REGISTRATION, "Client ID is required for WebSocket registration"
        )
    client_type, target = parsed.client_type, parsed.target_id
    if client_type is ClientType.CONSTELLATION and target and not is_device_connected(target):
        return Refusal(closes.TARGET_NOT_CONNECTED, f"Target device '{target}' is not connected")
    metadata = parsed.metadata or {}
    platform = metadata.get("platform") or "windows"
    system_info = metadata.get("system_info")
    return Registration(
        Identity(parsed.client_id, client_type, target),
        platform if isinstance(platform, str) else str(platform),
        metadata,
        system_info if client_type is ClientType.DEVICE and isinstance(system_info, dict) else None,
    )


def registration_refused(exc: Exception) -> Refusal | None:
    """The answer to a registration the registry (or its store) refused with ``exc``; None if
    ``exc`` is no refusal of a registration."""
    if isinstance(exc, TimeoutError):
        return Refusal(closes.STORE_UNAVAILABLE, STORE_BEHIND)
    if isinstance(exc, JournalFullError):
        return Refusal(closes.JOURNAL_FULL, STORE_BEHIND)
    if isinstance(exc, DuplicateClientError):
        return Refusal(closes.DUPLICATE_CLIENT, str(exc))
    if isinstance(exc, InvalidArgumentError):
        return Refusal(closes.INVALID_REGISTRATION, f"Invalid registration: {exc}")
    return None


def misdirected(identity: Identity, message: ClientMessage) -> ServerMessage | None:
    """The error frame for a frame that claims another client id, or a client type the
    connection did not register as (heartbeats excepted; a constellation may say it is a
    device except in a task request), else None."""
    if message.client_id is not None and message.client_id != identity.client_id:
        return error("client_id does not match the registered connection")
    kind, registered, claimed = message.type, identity.client_type, message.client_type
    if kind is not ClientMessageType.HEARTBEAT and (
        (registered is ClientType.DEVICE and claimed is ClientType.CONSTELLATION)
        or (
            registered is ClientType.CONSTELLATION
            and claimed is ClientType.DEVICE
            and kind is ClientMessageType.TASK
        )
    ):
        return error("client_type does not match the registered connection")
    return None


def direct_reply(message: ClientMessage) -> ServerMessage | None:
    """The answer to a frame that needs nothing but itself (a heartbeat, an error, a second
    register), else None."""
    match message.type:
        case ClientMessageType.HEARTBEAT:
            return ack(response_id=str(uuid.uuid4()))
        case ClientMessageType.ERROR:
            return error(message.error or "Unknown error")
        case ClientMessageType.REGISTER:
            return error("Already registered on this connection")
    return None


def device_info(
    identity: Identity,
    message: ClientMessage,
    lookup: Callable[[str], dict[str, Any] | None],
) -> ServerMessage:
    """The answer to a device info request: only a constellation may ask, and one registered
    for a target only about that device; ``lookup`` gives a device's info."""
    if identity.client_type is not ClientType.CONSTELLATION:
        return error("DEVICE_INFO_REQUEST is permitted only for constellation clients")
    device_id = message.target_id or ""
    if identity.target_id is not None and device_id != identity.target_id:
        return error("Not authorized to request device info for this device")
    info = lookup(device_id)
    return ServerMessage(
        type=ServerMessageType.DEVICE_INFO_RESPONSE,
        status=TaskStatus.OK,
        response_id=message.request_id,
        result=info or {"error": f"Device {device_id} not found or no system info available"},
    )


def task_executor(
    identity: Identity,
    message: ClientMessage,
    is_online: Callable[[str], bool],
    is_device_connected: Callable[[str], bool],
) -> str | ServerMessage:
    """Who runs a task request: the connected device a constellation targets (its own target
    if it registered with one), or the device itself; else the error frame."""
    target = message.target_id
    if identity.client_type is ClientType.CONSTELLATION:
        if not target:
            return error("Constellation task requests require target_id")
        if not is_online(target):
            return error(f"Device '{target}' is not connected")
        if not is_device_connected(target):
            return error("Constellation tasks may only target device clients")
        if identity.target_id is not None and target != identity.target_id:
            return error("Not authorized to send tasks to this device")
        return target
    if target and target != identity.client_id:
        return error("Device clients may not target other devices")
    return identity.client_id


def session_refused(
    requester: str,
    session_id: str,
    *,
    active: int,
    limit: int,
    owner_id: str | None,
    running: bool,
) -> ServerMessage | None:
    """The error frame refusing a new session of ``requester`` (``active`` sessions running,
    of ``limit``; the session id owned by ``owner_id`` if known, already ``running``), else
    None. Ownership is checked first: another client must not learn more than that."""
    if active >= limit:
        return error(f"Too many active sessions (limit {limit})")
    if owner_id is not None and owner_id != requester:
        return error(str(SessionOwnershipError(session_id, owner_id)), session_id=session_id)
    if running:
        return error(f"session_id '{session_id}' is already running")
    return None


def task_refused(exc: Exception, session_id: str) -> ServerMessage:
    """The error frame for a session whose opening the registry refused with ``exc``: its
    ownership or end, an invalid field, or a store that does not keep up (the details of
    which go to the log, not to the client)."""
    if isinstance(exc, SessionOwnershipError | SessionFinishedError):
        return error(str(exc), session_id=session_id)
    if isinstance(exc, InvalidArgumentError):
        return error(f"Invalid task: {exc}", session_id=session_id)
    return error(STORE_BEHIND, session_id=session_id)
