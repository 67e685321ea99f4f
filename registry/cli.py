"""The ``registry`` command line: ``serve`` runs the server; ``db`` manages the schema.

Every option of ``serve`` is also a ``REGISTRY_*`` environment variable; options given on the
command line win.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from typing import Any

import click

from registry.errors import RegistryError
from registry.settings import Settings
from registry.store.dialect import DEFAULT_URL


def _settings(**options: Any) -> Settings:
    try:
        return Settings(**{name: value for name, value in options.items() if value is not None})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


@click.group()
@click.version_option(package_name="registry")
def main() -> None:
    """Client registry and AIP server for fleets of agent devices."""


@main.command()
@click.option("--host", help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to bind (default 5000).")
@click.option("--database-url", help=f"SQLAlchemy URL (default {DEFAULT_URL}).")
@click.option("--api-key", help="Key for /api and /ws (default: generate one and print it).")
@click.option("--no-auth", is_flag=True, help="Serve without any key (trusted networks only).")
@click.option("--runner", help="Session runner class, package.module:Class.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, help="Accepted Host header.")
@click.option("--log-level", default="info", show_default=True)
def serve(no_auth: bool, allowed_hosts: tuple[str, ...], log_level: str, **options: Any) -> None:
    """Run the WebSocket and HTTP server."""
    import uvicorn

    from registry.server import create_app

    settings = _settings(allowed_hosts=list(allowed_hosts) or None, **options)
    if no_auth:
        settings = settings.model_copy(update={"api_key": None})
    elif settings.api_key is None:
        key = secrets.token_urlsafe(24)
        settings = settings.model_copy(update={"api_key": key})
        click.echo(f"API key (generated for this run): {key}", err=True)
    try:
        app = create_app(settings)
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        log_level=log_level,
        proxy_headers=False,
    )


@main.group()
def db() -> None:
    """Manage the database schema (Alembic)."""


def _database_option(function: Any) -> Any:
    return click.option(
        "--database-url", help=f"SQLAlchemy URL (default $REGISTRY_DATABASE_URL or {DEFAULT_URL})."
    )(function)


def _run_schema(action: str, database_url: str | None) -> None:
    from registry.store.schema import run_alembic

    url = _settings(database_url=database_url).database_url
    try:
        asyncio.run(run_alembic(url, action))
    except RegistryError as exc:
        raise click.ClickException(str(exc)) from exc


@db.command()
@_database_option
def upgrade(database_url: str | None) -> None:
    """Upgrade the schema to the newest revision."""
    _run_schema("upgrade", database_url)


@db.command()
@_database_option
def current(database_url: str | None) -> None:
    """Print the database's schema revision."""
    _run_schema("current", database_url)


@db.command()
@_database_option
def check(database_url: str | None) -> None:
    """Fail unless the database is at the newest revision and matches the models."""
    _run_schema("check", database_url)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
