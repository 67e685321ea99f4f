"""WebSocket close codes the server uses, as ints (the values of :mod:`registry.closes`,
which spells each code and reason once; 1008 is the one code no connection record keeps).

Codes in the 4000-4999 band are the application's own; the others are the standard ones that
the server (or uvicorn beneath it) sends.
"""

from __future__ import annotations

from registry import closes

NORMAL = closes.CLIENT_CLOSED.code
GOING_AWAY = closes.GOING_AWAY.code
INVALID_PAYLOAD = closes.INVALID_PAYLOAD.code  # a text frame that is not valid UTF-8 (uvicorn)
POLICY_VIOLATION = 1008  # refused before accept: the handshake answers HTTP 403
MESSAGE_TOO_BIG = closes.MESSAGE_TOO_BIG.code  # a frame over max_frame_bytes (uvicorn)
INTERNAL_ERROR = closes.INTERNAL_ERROR.code
SERVICE_RESTART = closes.SERVER_SHUTDOWN.code  # uvicorn's close on shutdown

INVALID_REGISTRATION = closes.INVALID_REGISTRATION.code
TARGET_NOT_CONNECTED = closes.TARGET_NOT_CONNECTED.code
IDLE_TIMEOUT = closes.IDLE_TIMEOUT.code
DUPLICATE_CLIENT = closes.DUPLICATE_CLIENT.code
SLOW_CONSUMER = closes.SLOW_CONSUMER.code
REPLACED = closes.REPLACED.code
RATE_LIMITED = closes.RATE_LIMITED.code
STORE_UNAVAILABLE = closes.STORE_UNAVAILABLE.code

#: Disconnect reasons recorded for standard codes a client (or uvicorn) closes with.
REASONS = closes.REASONS
