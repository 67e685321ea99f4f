"""The API key ``registry serve`` keeps when none is given: generated on the first start,
written to an owner-only file (:meth:`registry.settings.Settings.key_file`) and read again on
every later start, so that clients keep their key across restarts."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from registry.errors import RegistryError

#: Random bytes in a generated key (43 URL-safe characters).
KEY_BYTES = 32


class KeyFileError(RegistryError):
    """The key file cannot be read or written, or holds no usable key."""


def read_key(path: Path) -> str:
    """The key kept in ``path``: its text without surrounding whitespace, one line of
    printable ASCII (as an ``X-API-Key`` header or a ``?token=`` carries it)."""
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read the API key file {path}: {_reason(exc)}") from exc
    if not key:
        raise KeyFileError(f"the API key file {path} is empty: write a key in it, or delete it")
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        raise KeyFileError(
            f"the API key file {path} must hold one key of printable ASCII, without spaces"
        )
    return key


def load_or_create(path: Path) -> tuple[str, bool]:
    """The key kept in ``path``, or a new one written there if there is no such file (readable
    by its owner only); True when it was created now."""
    if path.exists():
        return read_key(path), False
    key = secrets.token_urlsafe(KEY_BYTES)
    # Written in full under a temporary name, then linked into place: the file appears
    # complete or not at all, and a server starting at the same moment that linked its own
    # first wins (both then use that one).
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.unlink(missing_ok=True)  # left by a start that died here with this pid
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="ascii") as file:
                file.write(key + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.link(temporary, path)
        finally:
            temporary.unlink()
    except FileExistsError:
        return read_key(path), False
    except OSError as exc:
        raise KeyFileError(f"cannot write the API key file {path}: {_reason(exc)}") from exc
    return key, True


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
