"""What travels on the bus: one message, its wire format, and the window of ids a receiver has
already seen.

A message is one JSON object, UTF-8, on a channel of the bus::

    {"id": "<32 hex digits, unique>", "sender": "<node id>",
     "type": "event" | "request" | "reply", "kind": "<what it is about>", "payload": <JSON>,
     "timeout": <seconds the requester waits: requests only>,
     "reply_to": "<the request's id: replies only>",
     "error": {"type": "<exception class>", "message": "<text>"} | null   (replies only)}

Anything else on a channel (not UTF-8, not JSON, a missing or mistyped field) is not a message:
:func:`decode` refuses it with :class:`ValueError`, and the bus logs and drops it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from registry.errors import InvalidArgumentError
from registry.validation import canonical_json

MessageType = Literal["event", "request", "reply"]
_TYPES: tuple[str, ...] = get_args(MessageType)


@dataclass(frozen=True, slots=True)
class Message:
    """One message as a handler receives it (and as the bus sends it)."""

    #: Unique over the cluster; a receiver drops a second message with an id it has seen.
    id: str
    #: The node id of the node that sent it.
    sender: str
    type: MessageType
    #: Which handler takes it (see :meth:`registry.cluster.Bus.on`).
    kind: str
    payload: Any
    #: Seconds the requester waits for the answer (requests only).
    timeout: float | None = None
    #: The id of the request this answers (replies only).
    reply_to: str | None = None
    #: Why the handler failed: ``{"type": ..., "message": ...}`` (replies only; None if it
    #: answered).
    error: dict[str, str] | None = None


def new_id() -> str:
    return uuid.uuid4().hex


def encode(message: Message) -> bytes:
    """The wire form of ``message``; :class:`~registry.errors.InvalidArgumentError` naming
    ``payload`` if the payload is not JSON (nothing is sent then)."""
    fields: dict[str, Any] = {
        "id": message.id,
        "sender": message.sender,
        "type": message.type,
        "kind": message.kind,
        "payload": message.payload,
    }
    if message.type == "request":
        fields["timeout"] = message.timeout
    if message.type == "reply":
        fields["reply_to"] = message.reply_to
        fields["error"] = message.error
    try:
        return canonical_json(fields, "payload").encode()
    except RecursionError:
        raise InvalidArgumentError("payload", "is nested too deeply") from None


def decode(data: bytes | str) -> Message:
    """The message ``data`` holds; :class:`ValueError` saying why if it holds none."""
    try:
        fields = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"a JSON {type(fields).__name__}, not an object")
    for name in ("id", "sender", "type", "kind"):
        if not isinstance(fields.get(name), str) or not fields[name]:
            raise ValueError(f"field {name!r} is missing or not a non-empty string")
    kind = fields["type"]
    if kind not in _TYPES:
        raise ValueError(f"type {kind!r} is not one of {', '.join(_TYPES)}")
    message_type = cast(MessageType, kind)
    timeout: Any = fields.get("timeout")
    if kind == "request" and (
        not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0
    ):
        raise ValueError("a request without a positive timeout")
    reply_to, error = fields.get("reply_to"), fields.get("error")
    if kind == "reply":
        if not isinstance(reply_to, str):
            raise ValueError("a reply without reply_to")
        if error is not None and not (
            isinstance(error, dict)
            and all(isinstance(error.get(name), str) for name in ("type", "message"))
        ):
            raise ValueError("a reply whose error is not {type, message}")
    return Message(
        id=fields["id"],
        sender=fields["sender"],
        type=message_type,
        kind=fields["kind"],
        payload=fields.get("payload"),
        timeout=float(timeout) if kind == "request" else None,
        reply_to=reply_to if kind == "reply" else None,
        error=error if kind == "reply" else None,
    )


class RecentIds:
    """The last ``size`` message ids seen, the oldest forgotten first.

    A duplicate comes from a publish repeated soon after the first (a retry after a lost
    answer from the server), so a window of recent ids is enough, and memory stays bounded.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._ids: dict[str, None] = {}  # insertion-ordered: the oldest first

    def add(self, message_id: str) -> bool:
        """Remember ``message_id``; False if it is remembered already (a duplicate)."""
        if message_id in self._ids:
            return False
        self._ids[message_id] = None
        if len(self._ids) > self._size:
            del self._ids[next(iter(self._ids))]
        return True
