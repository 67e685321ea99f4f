"""Argument checks shared by the registry's mutations.

Everything a mutation stores is checked here first, so a value that every backend could not
store (a NUL on PostgreSQL, a lone surrogate, an over-long id) is refused with
:class:`~registry.errors.InvalidArgumentError` before anything changes, instead of failing
the commit of a whole batch later.
"""

from __future__ import annotations

import json
import re
from typing import Any

from registry.errors import InvalidArgumentError
from registry.types import ClientType

MAX_ID_LENGTH = 255

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)
#: What an id must not contain: ``/`` (a path separator) and control characters (C0, DEL, C1).
_UNADDRESSABLE = re.compile(r"[/\x00-\x1f\x7f-\x9f]")


def canonical_json(value: Any, argument: str) -> str:
    """Serialise ``value`` as canonical JSON (sorted keys, no NaN, ASCII), or raise
    :class:`~registry.errors.InvalidArgumentError` naming ``argument``."""
    try:
        return _CANONICAL.encode(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(argument, f"must be JSON-serialisable ({exc})") from exc


def storable_text(value: str) -> str | None:
    """Why ``value`` cannot be stored on every backend, or None if it can.

    PostgreSQL refuses NUL characters in text and JSON, and neither driver can encode lone
    surrogates; such a value would fail every commit of its batch, so it is refused up front.
    """
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None


def require_text(argument: str, value: object, *, max_length: int | None = None) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(argument, f"must be a string, not {type(value).__name__}")
    if max_length is not None and len(value) > max_length:
        raise InvalidArgumentError(argument, f"must be at most {max_length} characters")
    problem = storable_text(value)
    if problem is not None:
        raise InvalidArgumentError(argument, problem)
    return value


def optional_text(argument: str, value: object, *, max_length: int | None = None) -> str | None:
    return None if value is None else require_text(argument, value, max_length=max_length)


def free_text(argument: str, value: object) -> str | None:
    """A free-text reason, made storable: NUL and lone surrogates become U+FFFD.

    A disconnect or a session end must never be refused over its description (often a
    peer's close frame or a device's error message): the id has to be freed regardless.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentError(
            argument, f"must be a string or None, not {type(value).__name__}"
        )
    if storable_text(value) is None:
        return value
    cleaned = value.replace("\x00", "\ufffd")
    return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in cleaned)


def require_id(argument: str, value: object) -> str:
    """An id (of a client, session, node or task): a non-blank string of at most
    :data:`MAX_ID_LENGTH` characters that one URL path segment can address once
    percent-encoded (``/api/clients/{id}``), so no ``/``, no control character and not ``.``
    or ``..`` (which clients and proxies resolve as path steps). Anything else goes: spaces,
    any Unicode, ``?``, ``#``, ``%``."""
    if isinstance(value, str) and (not value or value.isspace()):
        raise InvalidArgumentError(argument, "must not be empty")
    value = require_text(argument, value, max_length=MAX_ID_LENGTH)
    if value in (".", ".."):
        raise InvalidArgumentError(argument, "must not be '.' or '..' (not addressable in a URL)")
    unaddressable = _UNADDRESSABLE.search(value)
    if unaddressable is not None:
        found = unaddressable.group()
        if found == "/":
            raise InvalidArgumentError(argument, "must not contain '/' (not addressable in a URL)")
        raise InvalidArgumentError(
            argument, f"must not contain control characters (found {found!r})"
        )
    return value


def document_problem(value: Any) -> str | None:
    """Why a decoded JSON document cannot be stored on every backend, or None."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        for key, item in value.items():
            problem = storable_text(key) or document_problem(item)
            if problem is not None:
                return problem
    elif isinstance(value, list):
        for item in value:
            problem = document_problem(item)
            if problem is not None:
                return problem
    return None


def require_document(argument: str, value: object) -> str:
    if not isinstance(value, dict):
        raise InvalidArgumentError(argument, f"must be a dict, not {type(value).__name__}")
    try:
        document = canonical_json(value, argument)
        # Canonical JSON is ASCII: NUL and surrogates can only appear as \u escapes.
        if "\\u0000" in document or "\\ud" in document:
            problem = document_problem(json.loads(document))
            if problem is not None:
                raise InvalidArgumentError(argument, f"strings in it {problem}")
    except RecursionError:
        raise InvalidArgumentError(argument, "is nested too deeply") from None
    return document


def close_code(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise InvalidArgumentError("code", "must be a WebSocket close code (0-65535) or None")
    return value


def require_positive(argument: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise InvalidArgumentError(argument, f"must be a positive number, not {value!r}")


def client_type_of(value: object) -> ClientType:
    try:
        return ClientType(value)  # type: ignore[arg-type]  # checked right here
    except ValueError:
        choices = ", ".join(kind.value for kind in ClientType)
        raise InvalidArgumentError(
            "client_type", f"unknown client type {value!r} (expected one of: {choices})"
        ) from None
