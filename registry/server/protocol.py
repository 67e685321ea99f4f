"""The AIP wire contract (docs/protocol.md): the two envelopes as pydantic models.

Client frames ignore unknown keys; server frames always carry every field, ``null`` where
unset, in the order the clients expect.
"""

from __future__ import annotations

import enum
import json
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticSerializationError

from registry.types import ClientType


class ClientMessageType(enum.StrEnum):
    TASK = "task"
    HEARTBEAT = "heartbeat"
    COMMAND_RESULTS = "command_results"
    ERROR = "error"
    REGISTER = "register"
    TASK_END = "task_end"
    DEVICE_INFO_REQUEST = "device_info_request"
    DEVICE_INFO_RESPONSE = "device_info_response"


class ServerMessageType(enum.StrEnum):
    TASK = "task"
    HEARTBEAT = "heartbeat"
    TASK_END = "task_end"
    COMMAND = "command"
    ERROR = "error"
    DEVICE_INFO_REQUEST = "device_info_request"
    DEVICE_INFO_RESPONSE = "device_info_response"


class TaskStatus(enum.StrEnum):
    CONTINUE = "continue"
    COMPLETED = "completed"
    FAILED = "failed"
    OK = "ok"
    ERROR = "error"


class ResultStatus(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    SKIPPED = "skipped"
    NONE = "none"


class Result(BaseModel):
    """The outcome of one command, as a device reports it."""

    model_config = ConfigDict(extra="ignore")

    status: ResultStatus
    error: str | None = None
    result: Any = None
    namespace: str | None = None
    call_id: str | None = None


class Command(BaseModel):
    """One tool call the server asks a device to run."""

    tool_name: str
    parameters: dict[str, Any] | None = None
    tool_type: Literal["data_collection", "action"]
    call_id: str | None = None


class ClientMessage(BaseModel):
    """A frame from a device or constellation client."""

    model_config = ConfigDict(extra="ignore")

    type: ClientMessageType
    status: TaskStatus
    client_type: ClientType = ClientType.DEVICE
    session_id: str | None = None
    task_name: str | None = None
    client_id: str | None = None
    target_id: str | None = None
    request: str | None = None
    action_results: list[Result] | None = None
    timestamp: str | None = None
    request_id: str | None = None
    prev_response_id: str | None = None
    error: str | None = None
    metadata: dict[str, Any] | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat()


class ServerMessage(BaseModel):
    """A frame from the server; :meth:`frame` renders every field."""

    type: ServerMessageType
    status: TaskStatus
    user_request: str | None = None
    agent_name: str | None = None
    process_name: str | None = None
    root_name: str | None = None
    actions: list[Command] | None = None
    messages: list[str] | None = None
    error: str | None = None
    session_id: str | None = None
    task_name: str | None = None
    timestamp: str = Field(default_factory=_now)
    response_id: str | None = None
    result: Any = None

    def frame(self) -> str:
        """The frame's JSON text. Text a client sent may come back in a frame (an echoed
        error, an id); a lone surrogate in it cannot be encoded as UTF-8, so such a frame is
        rendered with ``\\u`` escapes (ASCII) instead of failing."""
        try:
            return self.model_dump_json()
        except PydanticSerializationError:
            return json.dumps(self.model_dump(mode="json"))


def ack(**fields: Any) -> ServerMessage:
    """``heartbeat``/``ok``: the acknowledgement of a registration, heartbeat or task."""
    return ServerMessage(type=ServerMessageType.HEARTBEAT, status=TaskStatus.OK, **fields)


def registration_ack() -> ServerMessage:
    return ack(response_id=str(uuid.uuid4()))


def error(text: str, **fields: Any) -> ServerMessage:
    """An ``error`` frame carrying ``text``."""
    return ServerMessage(
        type=ServerMessageType.ERROR, status=TaskStatus.ERROR, error=text, **fields
    )
