"""How connections, sessions and node runs end: every close code and reason, spelled once.

A :class:`Disconnect` is what a connection's record keeps when it ends (``close_code``,
``close_reason``): the registry, start-up recovery and the server all record these values, and
the server closes the WebSocket with the same code and reason. ``code`` is None where no close
frame is involved (a removal through the library, a run found gone at start-up). The codes in
the 4000-4999 band are the application's own (see docs/protocol.md); the others are the
standard WebSocket codes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A way a connection ends: the close code (None without a close frame) and the reason."""

    code: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Close(Disconnect):
    """A :class:`Disconnect` that a close frame carries: its code is always set."""

    code: int


# -- ended by the registry (library calls, start-up recovery) ------------------------------

#: ``remove_client`` without a reason of its own.
REMOVED = Disconnect(None, "removed")
#: Displaced by a newer registration of its client id (``on_duplicate=replace``, or a holder
#: that did not answer its ping).
REPLACED = Close(4411, "replaced")
#: The server (or the registry) shut down with the connection open: uvicorn's close code.
SERVER_SHUTDOWN = Close(1012, "server_shutdown")
#: Left open by an earlier run of this node (same name, or SQLite's one node).
SERVER_RESTART = Disconnect(None, "server_restart")
#: Left open by another node whose heartbeat expired.
NODE_LOST = Disconnect(None, "node_lost")

# -- ended by the server -------------------------------------------------------------------

#: The registration could not be made durable in time.
STORE_UNAVAILABLE = Close(4503, "store_unavailable")
#: The registration was refused: the journal is at its limit.
JOURNAL_FULL = Close(4503, "journal_full")
#: A send waited longer than ``send_timeout`` on a peer that does not read.
SLOW_CONSUMER = Close(4410, "slow_consumer")
#: Frames arrived faster than ``max_frames_per_second``, beyond ``frame_burst``.
RATE_LIMITED = Close(4429, "rate_limited")
#: No frame within ``idle_timeout`` (or ``handshake_timeout``).
IDLE_TIMEOUT = Close(4408, "idle_timeout")
#: The client id is already live and the policy is ``refuse``.
DUPLICATE_CLIENT = Close(4409, "duplicate_client")
#: The first frame was not a valid register frame.
INVALID_REGISTRATION = Close(4400, "invalid_registration")
#: The first frame was binary.
BINARY_REGISTRATION = Close(4400, "binary_registration")
#: A constellation's target device is not connected.
TARGET_NOT_CONNECTED = Close(4404, "target_not_connected")
#: The connection's handler failed.
INTERNAL_ERROR = Close(1011, "internal_error")

# -- ended by the client (or the network), as recorded ------------------------------------

#: A close frame with 1000 (or 1005, no status).
CLIENT_CLOSED = Close(1000, "client_closed")
GOING_AWAY = Close(1001, "going_away")
#: Gone without a close frame (uvicorn reports 1005 without a reason).
CONNECTION_LOST = Close(1006, "connection_lost")
#: A text frame that is not valid UTF-8 (closed by uvicorn).
INVALID_PAYLOAD = Close(1007, "invalid_payload")
#: A frame over ``max_frame_bytes`` (closed by uvicorn).
MESSAGE_TOO_BIG = Close(1009, "message_too_big")

#: The reason recorded for a standard code a client (or uvicorn) closes with, by code.
REASONS: dict[int, str] = {
    value.code: value.reason
    for value in (
        CLIENT_CLOSED,
        GOING_AWAY,
        CONNECTION_LOST,
        INVALID_PAYLOAD,
        MESSAGE_TOO_BIG,
        INTERNAL_ERROR,
        SERVER_SHUTDOWN,
    )
}
REASONS[1005] = CLIENT_CLOSED.reason  # a close frame without a status code

# -- how sessions and node runs end --------------------------------------------------------

#: A session left without links (its clients were unbound): it ends ``cancelled``.
SESSION_UNLINKED = "unlinked"
#: A session whose opening could not be made durable in time: it ends ``failed``.
SESSION_NOT_DURABLE = STORE_UNAVAILABLE.reason
#: An active session of a run that shut down: it is ``interrupted``.
SESSION_SERVER_SHUTDOWN = SERVER_SHUTDOWN.reason
#: A node run's ``stop_reason`` when it closed cleanly (recovery records the gone runs'
#: as :data:`SERVER_RESTART` or :data:`NODE_LOST`).
NODE_STOPPED = "shutdown"
