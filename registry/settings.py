"""Server settings: one object built from arguments and ``REGISTRY_*`` environment variables.

Nothing reads the environment at import time; :class:`Settings` does when it is constructed.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from registry.journal import DEFAULT_LIMIT
from registry.store.dialect import DEFAULT_URL, is_sqlite, parse_url
from registry.types import DuplicatePolicy

LOOPBACK_HOST_NAMES = ["localhost", "127.0.0.1", "::1", "[::1]"]


class Settings(BaseSettings):
    """Everything the server can be told. Each field is also ``REGISTRY_<NAME>`` in the
    environment (for example ``REGISTRY_DATABASE_URL``)."""

    model_config = SettingsConfigDict(env_prefix="REGISTRY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=5000, ge=0, le=65535)
    database_url: str = DEFAULT_URL
    api_key: str | None = Field(
        default=None,
        description="Key for /api (X-API-Key) and /ws (?token=); None disables the check.",
    )
    api_key_file: Path | None = Field(
        default=None,
        description="Where `registry serve` keeps its key when api_key is not given: read if "
        "the file exists, else generated and written there, readable by its owner only. "
        "Default: beside a SQLite database file (registry.db.key); none for PostgreSQL.",
    )
    runner: str = Field(
        default="registry.server.sessions:RelayRunner",
        description="Import string of the session runner class, package.module:Class.",
    )
    allowed_hosts: list[str] | None = Field(
        default=None,
        description="Host headers accepted on HTTP and WebSocket; default: the loopback names "
        "when bound to loopback, otherwise any.",
    )
    on_duplicate: DuplicatePolicy = DuplicatePolicy.REFUSE
    twin_ping_timeout: float = Field(
        default=2.0,
        gt=0,
        description="Seconds the connection holding a client id has to answer a WebSocket "
        "ping when its id is claimed again; one that does not is replaced (4411).",
    )
    node_name: str | None = None
    auto_migrate: bool | None = None
    max_frame_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    idle_timeout: float = Field(
        default=300.0,
        gt=0,
        description="Seconds without any frame before a peer is closed (UFO devices "
        "heartbeat every 120 s).",
    )
    handshake_timeout: float = Field(default=30.0, gt=0)
    store_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a registration or task waits for its commit before it is "
        "refused (4503 or an error frame); a disconnect or session end waits this long and "
        "then stays journalled until the store is back; a commit running longer counts as a "
        "store fault.",
    )
    journal_limit: int = Field(
        default=DEFAULT_LIMIT,
        gt=0,
        description="Operations waiting for the store at which registrations and new tasks "
        "are refused at once (4503) instead of queueing more history in memory.",
    )
    ping_interval: float = Field(default=20.0, gt=0)
    ping_timeout: float = Field(default=20.0, gt=0)
    send_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a send may wait on a peer that does not read."
    )
    command_timeout: float = Field(
        default=600.0, gt=0, description="Seconds a session waits for command_results."
    )
    max_sessions_per_client: int = Field(default=64, gt=0)
    max_frames_per_second: float = Field(
        default=500.0,
        gt=0,
        description="Frames per second a connection may keep sending (token-bucket refill "
        "rate); a peer that outruns it after its burst is closed with 4429.",
    )
    frame_burst: int = Field(
        default=1000, gt=0, description="Frames a connection may send back to back (bucket size)."
    )
    metrics_open: bool = Field(
        default=False, description="Serve /metrics without the API key (for a scraper)."
    )
    heartbeat_interval: float = Field(default=5.0, gt=0)
    node_timeout: float = Field(default=30.0, gt=0)

    def key_file(self) -> Path | None:
        """The file that keeps the key when ``api_key`` is not given: ``api_key_file``, else
        the SQLite database file's path plus ``.key``. None for PostgreSQL (nodes sharing a
        database must share one key, which a file of each node's own would not be) and for
        SQLite in memory."""
        if self.api_key_file is not None:
            return self.api_key_file
        url = parse_url(self.database_url)
        if not is_sqlite(url) or url.database in (None, "", ":memory:"):
            return None
        database = Path(url.database).absolute()
        return database.with_name(database.name + ".key")

    def trusted_hosts(self) -> list[str]:
        """The Host-header allow-list in force."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        if self.host == "localhost":
            return LOOPBACK_HOST_NAMES
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = False
        return LOOPBACK_HOST_NAMES if loopback else ["*"]
