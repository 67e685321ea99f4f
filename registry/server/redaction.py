"""Credentials kept out of the log.

uvicorn logs the path of every request with its query string (the WebSocket handshake's
``"WebSocket /ws?token=..." [accepted]`` line at INFO, the access log, the ASGI scopes at
TRACE), and at DEBUG its WebSocket implementation logs every handshake header; UFO's clients
present the API key as ``?token=``, others as ``X-API-Key`` or ``Authorization``.
:class:`RedactCredentials`, installed on uvicorn's loggers by ``create_app``, replaces the value
of each with ``***`` in every record, whatever the level, handler or format.
"""

from __future__ import annotations

import logging
import re

#: The loggers uvicorn writes requests to.
UVICORN_LOGGERS = ("uvicorn.error", "uvicorn.access", "uvicorn.asgi")

REDACTED = "***"
# ``token`` as a query parameter name, also percent-encoded; its value runs to the next ``&``
# or white space (a quote may be part of it, so a quoted context can lose its closing quote),
# unless it is redacted already.
_QUERY_TOKEN = re.compile(
    r"((?:^|[?&\s'\"])(?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)=)"
    r"(?!\*\*\*(?:[\"'&\s]|$))[^&\s]*",
    re.IGNORECASE,
)
_HEADER = re.compile(
    r"\b((?:x-api-key|authorization|proxy-authorization|cookie)[ \t]*:[ \t]*)"
    r"(?![ \t]|\*\*\*$)[^\r\n]*",
    re.IGNORECASE | re.MULTILINE,
)


def redact(text: str) -> str:
    """``text`` with the value of every ``token`` query parameter and credential header
    replaced by ``***``."""
    return _HEADER.sub(rf"\g<1>{REDACTED}", _QUERY_TOKEN.sub(rf"\g<1>{REDACTED}", text))


class RedactCredentials(logging.Filter):
    """Redacts a record's string arguments one by one (the access log's formatter needs them
    as they are: a path stays a path), then, if its message still holds a credential (a header
    name and its value in separate arguments, a scope's query string), the whole message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact(value) if isinstance(value, str) else value for value in record.args
            )
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # arguments that do not fit: logging reports it
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_FILTER = RedactCredentials()


def install() -> None:
    """Add the filter to uvicorn's loggers (once: a second call changes nothing)."""
    for name in UVICORN_LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)
