"""WebSocket close codes the server uses, all in one place.

Codes in the 4000-4999 band are the application's own; the others are the standard ones that
the server (or uvicorn beneath it) sends.
"""

from __future__ import annotations

from registry.registry import CODE_REPLACED

NORMAL = 1000
GOING_AWAY = 1001  # the server is shutting down
INVALID_PAYLOAD = 1007  # a text frame that is not valid UTF-8 (sent by uvicorn)
POLICY_VIOLATION = 1008  # refused before accept: the handshake answers HTTP 403
MESSAGE_TOO_BIG = 1009  # a frame over max_frame_bytes (sent by uvicorn)
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012  # uvicorn's close on shutdown

INVALID_REGISTRATION = 4400  # the first frame was not a valid register frame
TARGET_NOT_CONNECTED = 4404  # a constellation's target device is not connected
IDLE_TIMEOUT = 4408  # no frame within idle_timeout (or handshake_timeout)
DUPLICATE_CLIENT = 4409  # the client id is already live
SLOW_CONSUMER = 4410  # a send waited longer than send_timeout on a peer that does not read
#: 4411: displaced by a newer registration of its client id (``on_duplicate=replace``, or a
#: holder that did not answer its ping); the registry records the replaced row with it.
REPLACED = CODE_REPLACED
RATE_LIMITED = 4429  # frames arrived faster than max_frames_per_second, beyond frame_burst
STORE_UNAVAILABLE = 4503  # the registration could not be made durable

#: Disconnect reasons recorded for standard codes a client (or uvicorn) closes with.
REASONS = {
    NORMAL: "client_closed",
    GOING_AWAY: "going_away",
    1005: "client_closed",
    1006: "connection_lost",
    INVALID_PAYLOAD: "invalid_payload",
    MESSAGE_TOO_BIG: "message_too_big",
    INTERNAL_ERROR: "internal_error",
    SERVICE_RESTART: "server_shutdown",
}
