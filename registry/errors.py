"""The registry's one error hierarchy.

Every error the registry raises derives from :class:`RegistryError`. The store wraps driver
errors (``sqlalchemy.exc.*``, ``sqlite3``, ``asyncpg``) into :class:`StoreError` subclasses, so
callers never need to import a driver to handle a failure.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Root of every error raised by the registry."""


class InvalidArgumentError(RegistryError, ValueError):
    """An argument was rejected before anything changed.

    ``argument`` names the offending parameter.
    """

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument


class DuplicateClientError(RegistryError):
    """``client_id`` is already live on this node and the duplicate policy is ``refuse``."""

    def __init__(self, client_id: str) -> None:
        super().__init__(
            f"client_id '{client_id}' is already registered; "
            "duplicate registrations are not allowed"
        )
        self.client_id = client_id


class SessionOwnershipError(RegistryError):
    """A client tried to use a session id that another client owns."""

    def __init__(self, session_id: str, owner_id: str | None) -> None:
        super().__init__(f"session_id '{session_id}' is owned by another client")
        self.session_id = session_id
        self.owner_id = owner_id


class SessionFinishedError(RegistryError):
    """Its owner tried to open a session id again after the session had ended (``completed``,
    ``failed`` or ``cancelled``): a finished session keeps its record, so a new run needs a new
    session id. ``state`` is how the session ended."""

    def __init__(self, session_id: str, state: str) -> None:
        super().__init__(
            f"session_id '{session_id}' has already ended ({state}); "
            "a finished session cannot be reopened: use a new session_id"
        )
        self.session_id = session_id
        self.state = state


class RegistryClosedError(RegistryError):
    """A mutation or query was attempted on a registry that is not started or already closed."""


class StoreError(RegistryError):
    """The durable store failed; the message names the operation and the cause."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached or written (down, read-only, disk full)."""


class JournalFullError(StoreUnavailableError):
    """New work was refused because the journal holds its limit of operations that the store
    has not committed yet (the store is down or too slow); nothing changed."""


class SchemaError(StoreError):
    """The database schema is behind (and auto-migration is off) or unknown to this version."""


class BusUnavailableError(RegistryError):
    """The bus between nodes cannot carry a message now: it is not connected, its server is
    unreachable (the bus reconnects by itself), or the node addressed is not listening."""


class BusTimeoutError(RegistryError):
    """A request over the bus got no answer from the node addressed within its timeout."""


def describe(exc: BaseException) -> str:
    """One line naming a driver error's own type and message (not SQLAlchemy's wrapper)."""
    original = getattr(exc, "orig", None) or exc
    return f"{type(original).__name__}: {original}"
