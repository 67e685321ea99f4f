"""The AIP rules (registry.server.aip) and the transport's parts (the peer's states, the token
bucket), without a socket: each rule is a function of a frame and the state it needs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from registry import closes
from registry.errors import (
    DuplicateClientError,
    InvalidArgumentError,
    JournalFullError,
    SessionFinishedError,
    SessionOwnershipError,
    StoreUnavailableError,
)
from registry.server import aip
from registry.server.peer import TRANSITIONS, PeerState
from registry.server.protocol import ClientMessage, ServerMessage, ServerMessageType, TaskStatus
from registry.server.tokenbucket import TokenBucket
from registry.types import ClientType

DEVICE = aip.Identity("dev-1", ClientType.DEVICE, None)
CONSTELLATION = aip.Identity("con-1", ClientType.CONSTELLATION, None)
PINNED = aip.Identity("con-2", ClientType.CONSTELLATION, "dev-1")


def frame(**fields: Any) -> str:
    return json.dumps({"status": "ok", **fields})


def message(**fields: Any) -> ClientMessage:
    return ClientMessage.model_validate_json(frame(**fields))


def error_text(reply: ServerMessage | None) -> str | None:
    assert reply is not None
    assert reply.type is ServerMessageType.ERROR, reply
    return reply.error


def connected(*ids: str) -> Any:
    return lambda client_id: client_id in ids


@pytest.mark.parametrize(
    ("text", "close", "answer"),
    [
        (None, closes.BINARY_REGISTRATION, None),
        ("{", closes.INVALID_REGISTRATION, "Invalid message: not valid JSON"),
        ("[1]", closes.INVALID_REGISTRATION, "Invalid message: expected a JSON object"),
        (frame(type="shout"), closes.INVALID_REGISTRATION, "Unknown message type: shout"),
        (
            frame(type="heartbeat", client_id="a"),
            closes.INVALID_REGISTRATION,
            "First message must be a register message",
        ),
        (
            frame(type="register"),
            closes.INVALID_REGISTRATION,
            "Client ID is required for WebSocket registration",
        ),
        (
            frame(type="register", client_id="c", client_type="constellation", target_id="d"),
            closes.TARGET_NOT_CONNECTED,
            "Target device 'd' is not connected",
        ),
    ],
)
def test_a_bad_first_frame_is_refused_with_its_close(
    text: str | None, close: closes.Close, answer: str | None
) -> None:
    refusal = aip.registration(text, connected())
    assert isinstance(refusal, aip.Refusal), refusal
    assert refusal.close == close
    if answer is None:
        assert refusal.error is None
    else:
        assert refusal.error is not None
        assert refusal.error.startswith(answer), refusal.error


def test_a_register_frame_is_accepted_with_what_the_registry_records() -> None:
    info = {"cpu": 4}
    accepted = aip.registration(
        frame(type="register", client_id="dev-1", metadata={"system_info": info}),
        connected(),
    )
    assert accepted == aip.Registration(
        aip.Identity("dev-1", ClientType.DEVICE, None), "windows", {"system_info": info}, info
    )
    pinned = aip.registration(
        frame(
            type="register",
            client_id="con-2",
            client_type="constellation",
            target_id="dev-1",
            metadata={"platform": 7, "system_info": info},
        ),
        connected("dev-1"),
    )
    assert isinstance(pinned, aip.Registration)
    # A constellation's system_info is not device info; a platform that is no string is text.
    assert (pinned.identity, pinned.platform, pinned.system_info) == (PINNED, "7", None)


@pytest.mark.parametrize(
    ("refused", "close", "answer"),
    [
        (TimeoutError(), closes.STORE_UNAVAILABLE, aip.STORE_BEHIND),
        (JournalFullError("full"), closes.JOURNAL_FULL, aip.STORE_BEHIND),
        (
            DuplicateClientError("dev-1"),
            closes.DUPLICATE_CLIENT,
            str(DuplicateClientError("dev-1")),
        ),
        (
            InvalidArgumentError("metadata", "too big"),
            closes.INVALID_REGISTRATION,
            "Invalid registration: metadata: too big",
        ),
    ],
)
def test_a_registration_the_registry_refuses_is_closed_as_such(
    refused: Exception, close: closes.Close, answer: str
) -> None:
    assert aip.registration_refused(refused) == aip.Refusal(close, answer)


def test_an_unexpected_error_is_no_registration_refusal() -> None:
    assert aip.registration_refused(RuntimeError("bug")) is None


def test_a_frame_claiming_another_identity_is_answered_with_an_error() -> None:
    assert error_text(aip.misdirected(DEVICE, message(type="heartbeat", client_id="x"))) == (
        "client_id does not match the registered connection"
    )
    mismatch = "client_type does not match the registered connection"
    as_constellation = message(type="task", client_type="constellation")
    assert error_text(aip.misdirected(DEVICE, as_constellation)) == mismatch
    as_device_task = message(type="task", client_type="device")
    assert error_text(aip.misdirected(CONSTELLATION, as_device_task)) == mismatch
    # Heartbeats are not checked for their type; a constellation may say "device" elsewhere.
    assert aip.misdirected(DEVICE, message(type="heartbeat", client_type="constellation")) is None
    assert aip.misdirected(CONSTELLATION, message(type="device_info_request")) is None


def test_frames_that_need_nothing_else_are_answered_directly() -> None:
    heartbeat = aip.direct_reply(message(type="heartbeat"))
    assert heartbeat is not None
    assert (heartbeat.type, heartbeat.status) == (ServerMessageType.HEARTBEAT, TaskStatus.OK)
    assert heartbeat.response_id
    assert error_text(aip.direct_reply(message(type="error", error="boom"))) == "boom"
    assert error_text(aip.direct_reply(message(type="error"))) == "Unknown error"
    assert error_text(aip.direct_reply(message(type="register"))) == (
        "Already registered on this connection"
    )
    assert aip.direct_reply(message(type="task")) is None


def test_device_info_is_for_constellations_and_their_target() -> None:
    infos = {"dev-1": {"cpu": 4}}
    request = message(type="device_info_request", target_id="dev-1", request_id="r1")
    assert error_text(aip.device_info(DEVICE, request, infos.get)) == (
        "DEVICE_INFO_REQUEST is permitted only for constellation clients"
    )
    other = message(type="device_info_request", target_id="dev-9")
    assert error_text(aip.device_info(PINNED, other, infos.get)) == (
        "Not authorized to request device info for this device"
    )
    answer = aip.device_info(PINNED, request, infos.get)
    assert (answer.type, answer.response_id, answer.result) == (
        ServerMessageType.DEVICE_INFO_RESPONSE,
        "r1",
        {"cpu": 4},
    )
    unknown = aip.device_info(CONSTELLATION, other, infos.get)
    assert unknown.result == {"error": "Device dev-9 not found or no system info available"}


def test_a_task_runs_on_the_targeted_connected_device_or_the_device_itself() -> None:
    online = connected("dev-1", "con-9")
    devices = connected("dev-1")

    def executor(identity: aip.Identity, **fields: Any) -> str | None:
        result = aip.task_executor(identity, message(type="task", **fields), online, devices)
        return result if isinstance(result, str) else error_text(result)

    assert executor(CONSTELLATION) == "Constellation task requests require target_id"
    assert executor(CONSTELLATION, target_id="dev-2") == "Device 'dev-2' is not connected"
    assert executor(CONSTELLATION, target_id="con-9") == (
        "Constellation tasks may only target device clients"
    )
    assert executor(CONSTELLATION, target_id="dev-1") == "dev-1"
    assert executor(
        aip.Identity("con-3", ClientType.CONSTELLATION, "dev-0"), target_id="dev-1"
    ) == ("Not authorized to send tasks to this device")
    assert executor(DEVICE, target_id="dev-2") == "Device clients may not target other devices"
    assert executor(DEVICE) == executor(DEVICE, target_id="dev-1") == "dev-1"


def test_a_session_is_refused_over_the_limit_to_another_owner_or_when_running() -> None:
    def refused(**state: Any) -> str | None:
        given = {"active": 0, "limit": 2, "owner_id": None, "running": False} | state
        reply = aip.session_refused("con-1", "s1", **given)
        return None if reply is None else error_text(reply)

    assert refused() is None
    assert refused(owner_id="con-1") is None
    assert refused(active=2) == "Too many active sessions (limit 2)"
    # Ownership before "running": another client learns no more than that it is not its own.
    assert refused(owner_id="con-9", running=True) == str(SessionOwnershipError("s1", "con-9"))
    assert refused(running=True) == "session_id 's1' is already running"


def test_a_session_the_registry_refuses_is_answered_with_its_reason() -> None:
    finished = SessionFinishedError("s1", "completed")
    assert error_text(aip.task_refused(finished, "s1")) == str(finished)
    assert error_text(aip.task_refused(InvalidArgumentError("task_name", "bad"), "s1")) == (
        "Invalid task: task_name: bad"
    )
    for outage in (TimeoutError(), StoreUnavailableError("db down")):
        reply = aip.task_refused(outage, "s1")
        assert (error_text(reply), reply.session_id) == (aip.STORE_BEHIND, "s1")


def test_task_names_are_made_safe() -> None:
    assert aip.sanitise_task_name("../a b") == "_a_b"
    assert aip.sanitise_task_name("ok-1.2_x") == "ok-1.2_x"
    assert len(aip.sanitise_task_name("")) == 36  # a uuid4


def test_a_peer_moves_only_forward() -> None:
    assert TRANSITIONS[PeerState.HANDSHAKE] == {
        PeerState.OPEN,
        PeerState.CLOSED,
        PeerState.ABANDONED,
    }
    assert TRANSITIONS[PeerState.OPEN] == {PeerState.CLOSED, PeerState.ABANDONED}
    assert TRANSITIONS[PeerState.CLOSED] == {PeerState.ABANDONED}
    assert not TRANSITIONS[PeerState.ABANDONED]


def test_the_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.05)  # half a token since: still overdrawn
    assert bucket.take(0.3)  # 2.5 more: the overdraft repaid, one token left for this frame
    bucket = TokenBucket(rate=10.0, burst=3.0, now=0.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at 3
