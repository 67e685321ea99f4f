"""The ``registry`` command line.

``serve`` runs the server; ``db`` manages the schema; ``clients``, ``client``, ``history``,
``sessions``, ``audit`` and ``stats`` read the database directly (so they work while the server
is down), as tables or, with ``--json``, as JSON; ``prune`` applies retention.

Every option of ``serve`` is also a ``REGISTRY_*`` environment variable; options given on the
command line win. Every failure is one line on stderr and an exit code: 0 success, 1 not found,
2 bad usage, 3 database unavailable or schema mismatch (or missing, for a command that only
reads), 4 the server cannot start (its address is taken, its key file unusable).
"""

from __future__ import annotations

import asyncio
import gc
import json
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic_core import to_jsonable_python
from sqlalchemy.exc import SQLAlchemyError
from tabulate import tabulate

from registry.errors import DatabaseInUseError, InvalidArgumentError, RegistryError, describe
from registry.history import MAX_LIMIT, History
from registry.settings import Settings
from registry.store.dialect import DEFAULT_URL, create_engine, is_sqlite, parse_url
from registry.store.schema import ensure_schema
from registry.types import ClientType, ConnectionRecord, Page, SessionState
from registry.validation import storable_text

if TYPE_CHECKING:
    from registry.prune import PruneReport

T = TypeVar("T")

#: Allocations between young-generation collections in the server (CPython's default: 700).
GC_YOUNG_THRESHOLD = 50_000

EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_STORE = 3
EXIT_CANNOT_SERVE = 4


class _BadUsage(click.ClickException):
    """Bad usage said in one line (a UsageError would print the usage above it)."""

    exit_code = EXIT_USAGE


class _StoreFailure(click.ClickException):
    exit_code = EXIT_STORE


class _CannotServe(click.ClickException):
    exit_code = EXIT_CANNOT_SERVE


def _settings(**options: Any) -> Settings:
    try:
        return Settings(**{name: value for name, value in options.items() if value is not None})
    except ValueError as exc:
        raise _BadUsage(str(exc)) from exc


@click.group()
@click.version_option(package_name="agent-fleet-registry")
def main() -> None:
    """Client registry and AIP server for fleets of agent devices."""


@main.command()
@click.option("--host", help="Interface to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to bind (default 5000).")
@click.option("--database-url", help=f"SQLAlchemy URL (default {DEFAULT_URL}).")
@click.option("--api-key", help="Key for /api and /ws (default: the one in the key file).")
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File keeping the key: read, or generated and written owner-only "
    "(default: the SQLite database's path plus .key).",
)
@click.option("--no-auth", is_flag=True, help="Serve without any key (trusted networks only).")
@click.option(
    "--auto-migrate/--no-auto-migrate",
    default=None,
    help="Upgrade the schema on start (default: on for SQLite, off for PostgreSQL).",
)
@click.option("--runner", help="Session runner class, package.module:Class.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, help="Accepted Host header.")
@click.option("--log-level", default="info", show_default=True)
def serve(no_auth: bool, allowed_hosts: tuple[str, ...], log_level: str, **options: Any) -> None:
    """Run the WebSocket and HTTP server until SIGINT or SIGTERM (then exit 0)."""
    from registry.server import create_app, listen

    settings = _settings(allowed_hosts=list(allowed_hosts) or None, **options)
    settings, key_source = _with_api_key(settings, no_auth)
    try:
        app = create_app(settings)
    except InvalidArgumentError as exc:  # e.g. a runner that cannot be imported
        raise _BadUsage(str(exc)) from exc
    except DatabaseInUseError as exc:  # another registry serves this SQLite file
        raise _CannotServe(str(exc)) from exc
    try:
        sock = listen.bind(settings.host, settings.port, settings.send_timeout)
    except OSError as exc:
        raise _CannotServe(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc
    host = f"[{settings.host.strip('[]')}]" if ":" in settings.host else settings.host
    address = f"{host}:{sock.getsockname()[1]}"

    def announce() -> None:
        registry = app.state.registry
        click.echo(
            f"registry serving http://{address} and ws://{address}/ws, node {registry.node_id}, "
            f"database {registry.database_url}, {key_source}"
        )

    # Thousands of long-lived connection objects make each full collection long (seen: up to
    # 0.9 s with 5,000 clients, stalling every connection): move what is loaded now out of
    # the collector's sight and collect the young generation less often.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        listen.run(app, settings, log_level, sock, announce)
    except InvalidArgumentError as exc:  # e.g. a node name the registry refuses
        raise _BadUsage(str(exc)) from exc
    except RegistryError as exc:  # the store unreachable, its schema behind, ...
        raise _StoreFailure(str(exc)) from exc


def _with_api_key(settings: Settings, no_auth: bool) -> tuple[Settings, str]:
    """``settings`` with the key to serve with, and where it comes from (for the start line).

    A key given is used as is; otherwise the key file's, generated (and printed, this once)
    if there is none yet."""
    from registry.server.apikey import KeyFileError, load_or_create

    if no_auth:
        return settings.model_copy(update={"api_key": None}), "no API key (--no-auth)"
    if settings.api_key is not None:
        return settings, "API key from --api-key or REGISTRY_API_KEY"
    try:
        path = settings.key_file()
    except InvalidArgumentError as exc:  # a database URL that cannot be served
        raise _BadUsage(str(exc)) from exc
    if path is None:
        raise _BadUsage(
            "a database that is not a SQLite file has no place for a generated API key: "
            "give --api-key, --api-key-file or --no-auth (nodes that share a database must "
            "share one key)"
        )
    try:
        key, created = load_or_create(path)
    except KeyFileError as exc:
        raise _CannotServe(str(exc)) from exc
    if created:
        click.echo(f"API key generated and kept in {path} (owner-only): {key}", err=True)
    return settings.model_copy(update={"api_key": key}), f"API key in {path}"


@main.group()
def db() -> None:
    """Manage the database schema (Alembic)."""


def _database_option(function: Any) -> Any:
    return click.option(
        "--database-url", help=f"SQLAlchemy URL (default $REGISTRY_DATABASE_URL or {DEFAULT_URL})."
    )(function)


def _run(
    work: Coroutine[Any, Any, T], what: str, usage: Callable[[InvalidArgumentError], str] = str
) -> T:
    """Run ``work`` to its end, its failures one line and an exit code: an argument the
    registry refuses is bad usage (2, said by ``usage``), a store that fails or does not
    answer is 3 (``cannot {what}: ...`` when the store's driver says why)."""
    try:
        return asyncio.run(work)
    except InvalidArgumentError as exc:
        raise _BadUsage(usage(exc)) from exc
    except RegistryError as exc:  # unreachable, or not at the newest revision
        raise _StoreFailure(str(exc)) from exc
    except (SQLAlchemyError, OSError) as exc:
        raise _StoreFailure(f"cannot {what}: {describe(exc)}") from exc


def _run_schema(action: str, database_url: str | None) -> None:
    from registry.store.schema import run_alembic

    if action == "upgrade":  # the one that may create the database
        url = _settings(database_url=database_url).database_url
    else:
        url = _existing_database(database_url)

    async def run() -> None:
        if action == "check":
            # The revision first, read-only: Alembic's check would stamp an empty database
            # with an (empty) alembic_version table, and a check must not write.
            engine = create_engine(url)
            try:
                await ensure_schema(engine, auto_migrate=False)
            finally:
                await engine.dispose()
        await run_alembic(url, action)

    _run(run(), f"reach {url}")


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


# -- reading the store ----------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _text(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A string the store can compare (the callback of every id and filter): an argument that
    held bytes which are not UTF-8 reaches ``sys.argv`` as lone surrogates, which no backend
    can take, so it is bad usage (exit code 2) rather than a store failure."""
    problem = None if value is None else storable_text(value)
    if problem is not None:
        raise _invalid(ctx, param, problem)
    return value


def _instant(ctx: click.Context, param: click.Parameter, text: str | None) -> datetime | None:
    """An ISO 8601 time (naive is UTC)."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _invalid(ctx, param, f"{text!r} is not an ISO 8601 time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _age(ctx: click.Context, param: click.Parameter, text: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``30d`` or ``2w``."""
    match = _DURATION.match(text)
    if match is None:
        raise _invalid(ctx, param, f"{text!r} is not a duration like 30d, 12h, 15m, 90s or 2w")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _invalid(ctx: click.Context, param: click.Parameter, problem: str) -> _BadUsage:
    return _BadUsage(f"Invalid value for {param.get_error_hint(ctx)}: {problem}")


#: The command-line names of the History arguments a listing passes on unchanged.
_OPTION_OF = {"cursor": "--cursor", "since": "--since", "until": "--until"}


def _existing_database(database_url: str | None) -> str:
    """The database URL to read; a SQLite file that does not exist is exit code 3 (reading
    must not leave an empty file behind)."""
    url = _settings(database_url=database_url).database_url
    parsed = parse_url(url)
    if is_sqlite(parsed) and parsed.database and not Path(parsed.database).exists():
        raise _StoreFailure(f"no registry database at {parsed.database}")
    return url


def _query(database_url: str | None, action: Callable[[History], Awaitable[T]]) -> T:
    """Run ``action`` on a History of the database, mapping store errors to exit code 3.

    Parse every argument before calling this: bad usage is exit code 2 whatever the database."""
    url = _existing_database(database_url)

    async def run() -> T:
        engine = create_engine(url)
        try:
            await ensure_schema(engine, auto_migrate=False)
            return await action(History(engine))
        finally:
            await engine.dispose()

    return _run(run(), f"read {url}", _option_usage)


def _option_usage(exc: InvalidArgumentError) -> str:
    """A History argument refused (e.g. --since after --until), said with its option's name."""
    option = _OPTION_OF.get(exc.argument)
    if option is None:
        return str(exc)
    return f"Invalid value for '{option}': {str(exc).removeprefix(f'{exc.argument}: ')}"


def _emit(value: Any, as_json: bool, rows: list[dict[str, Any]], empty: str) -> None:
    if as_json:
        click.echo(json.dumps(to_jsonable_python(value), indent=2))
    elif rows:
        click.echo(tabulate(rows, headers="keys", tablefmt="simple"))
    else:
        click.echo(empty)


def _emit_page(
    page: Page[Any], as_json: bool, rows: list[dict[str, Any]], empty: str, value: Any = None
) -> None:
    """A page as :func:`_emit` prints it (``value``, default the page, as JSON, which carries
    ``next_cursor``); a table is followed, on stderr, by how to get the next page if any."""
    _emit(page if value is None else value, as_json, rows, empty)
    if page.next_cursor is not None and not as_json:
        click.echo(f"more: run again with --cursor {page.next_cursor}", err=True)


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}s"


def _read_options(function: Any) -> Any:
    function = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(function)
    return _database_option(function)


def _window_options(function: Any) -> Any:
    function = click.option(
        "--until", callback=_instant, help="ISO 8601 time (exclusive; naive is UTC)."
    )(function)
    return click.option("--since", callback=_instant, help="ISO 8601 time (naive is UTC).")(
        function
    )


def _page_options(function: Any) -> Any:
    function = click.option(
        "--cursor", callback=_text, help="Where to go on: the cursor a previous page printed."
    )(function)
    return click.option(
        "--limit", type=click.IntRange(1, MAX_LIMIT), default=50, show_default=True
    )(function)


@main.command()
@_read_options
@_page_options
@click.option("--type", "client_type", type=click.Choice([k.value for k in ClientType]))
@click.option("--platform", callback=_text, help="Only this platform (any case).")
def clients(
    database_url: str | None,
    as_json: bool,
    limit: int,
    cursor: str | None,
    client_type: str | None,
    platform: str | None,
) -> None:
    """Clients connected now, on every node, newest first."""
    page = _query(
        database_url,
        lambda h: h.open_connections(
            client_type=client_type, platform=platform, limit=limit, cursor=cursor
        ),
    )
    table = [
        {
            "client": r.client_id,
            "type": r.client_type.value,
            "platform": r.platform,
            "connected": _when(r.connected_at),
            "node": r.node_id[:8],
            "address": r.remote_address or "",
        }
        for r in page.items
    ]
    _emit_page(page, as_json, table, "no clients online")


@main.command()
@_read_options
@click.argument("client_id", callback=_text)
def client(database_url: str | None, as_json: bool, client_id: str) -> None:
    """What is known of one client."""
    summary = _query(database_url, lambda h: h.client(client_id))
    if summary is None:
        click.echo(f"client {client_id!r} was never seen", err=True)
        sys.exit(EXIT_NOT_FOUND)
    table = [
        {"field": name, "value": value}
        for name, value in (
            ("client", summary.client_id),
            ("type", summary.client_type),
            ("platform", summary.platform),
            ("online", "yes" if summary.online else "no"),
            ("connected", _when(summary.connected_at)),
            ("first seen", _when(summary.first_seen)),
            ("last seen", "now" if summary.online else _when(summary.last_seen)),
            ("connections", summary.connection_count),
            ("metadata", json.dumps(summary.metadata)),
        )
    ]
    _emit(summary, as_json, table, "")


@main.command()
@_read_options
@_window_options
@_page_options
@click.argument("client_id", callback=_text)
def history(
    database_url: str | None,
    as_json: bool,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    cursor: str | None,
    client_id: str,
) -> None:
    """Connection history of one client, newest first (exit code 1 if it was never seen)."""

    async def read(h: History) -> tuple[Page[ConnectionRecord], bool]:
        page = await h.connections(client_id, since=since, until=until, limit=limit, cursor=cursor)
        return page, bool(page.items) or await h.client(client_id) is not None

    page, known = _query(database_url, read)
    if not known:
        click.echo(f"client {client_id!r} was never seen", err=True)
        sys.exit(EXIT_NOT_FOUND)
    table = [
        {
            "connected": _when(r.connected_at),
            "disconnected": _when(r.disconnected_at),
            "duration": _seconds(r.duration_seconds),
            "code": "" if r.close_code is None else r.close_code,
            "reason": r.close_reason or "",
            "node": r.node_id[:8],
        }
        for r in page.items
    ]
    answer = {  # as GET /api/clients/{id}/connections: each with its duration
        "items": [
            {**to_jsonable_python(r), "duration_seconds": r.duration_seconds} for r in page.items
        ],
        "next_cursor": page.next_cursor,
    }
    _emit_page(page, as_json, table, f"no connections of {client_id!r}", answer)


@main.command()
@_read_options
@_window_options
@_page_options
@click.option(
    "--client", "client_id", callback=_text, help="Sessions this client owned or executed."
)
@click.option("--state", type=click.Choice([s.value for s in SessionState]))
def sessions(
    database_url: str | None,
    as_json: bool,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    cursor: str | None,
    client_id: str | None,
    state: str | None,
) -> None:
    """Sessions, newest first."""
    page = _query(
        database_url,
        lambda h: h.sessions(
            client_id, state=state, since=since, until=until, limit=limit, cursor=cursor
        ),
    )
    table = [
        {
            "session": r.session_id,
            "task": r.task_name or "",
            "owner": r.owner_id or "",
            "executor": r.executor_id or "",
            "state": r.state.value,
            "created": _when(r.created_at),
            "ended": _when(r.ended_at),
            "reason": r.end_reason or "",
        }
        for r in page.items
    ]
    _emit_page(page, as_json, table, "no sessions")


@main.command()
@_read_options
@_window_options
@_page_options
@click.option("--kind", callback=_text)
@click.option("--client", "client_id", callback=_text)
@click.option("--session", "session_id", callback=_text)
def audit(
    database_url: str | None,
    as_json: bool,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    cursor: str | None,
    kind: str | None,
    client_id: str | None,
    session_id: str | None,
) -> None:
    """The audit trail, newest first."""
    page = _query(
        database_url,
        lambda h: h.audit(
            kind=kind,
            client_id=client_id,
            session_id=session_id,
            since=since,
            until=until,
            newest_first=True,
            limit=limit,
            cursor=cursor,
        ),
    )
    table = [
        {
            "id": e.event_id,
            "at": _when(e.at),
            "kind": e.kind,
            "client": e.client_id or "",
            "session": e.session_id or "",
            "details": json.dumps(e.details),
        }
        for e in page.items
    ]
    _emit_page(page, as_json, table, "no audit events")


@main.command()
@_read_options
@_window_options
def stats(
    database_url: str | None, as_json: bool, since: datetime | None, until: datetime | None
) -> None:
    """Online now, and figures over a window (default: the last 24 hours)."""
    figures = _query(database_url, lambda h: h.statistics(since=since, until=until))
    table: list[dict[str, Any]] = [
        {"figure": "window", "value": f"{_when(figures.since)} .. {_when(figures.until)}"},
        *(
            {"figure": f"online {kind}", "value": count}
            for kind, count in figures.online_by_type.items()
        ),
        *(
            {"figure": f"online on {platform}", "value": count}
            for platform, count in figures.online_by_platform.items()
        ),
        {"figure": "connections", "value": figures.connections},
        {"figure": "distinct clients", "value": figures.distinct_clients},
        {"figure": "mean duration", "value": _seconds(figures.mean_duration_seconds)},
        {"figure": "p95 duration", "value": _seconds(figures.p95_duration_seconds)},
        *(
            {"figure": f"closed: {reason}", "value": count}
            for reason, count in figures.disconnects_by_reason.items()
        ),
        *(
            {"figure": f"sessions {state}", "value": count}
            for state, count in figures.sessions_by_state.items()
        ),
        *(
            {"figure": f"availability {device}", "value": f"{fraction:.1%}"}
            for device, fraction in (figures.availability or {}).items()
        ),
    ]
    _emit(figures, as_json, table, "")


@main.command()
@_database_option
@click.option(
    "--older-than", "older_than", required=True, callback=_age, help="Age like 30d, 12h or 2w."
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def prune(database_url: str | None, older_than: timedelta, dry_run: bool, as_json: bool) -> None:
    """Delete history and audit older than --older-than, in bounded batches.

    Open connections, active or interrupted sessions and each device's latest info snapshot
    are never deleted.
    """
    from registry.prune import prune as run_prune

    cutoff = datetime.now(UTC) - older_than
    url = _existing_database(database_url)

    async def run() -> PruneReport:
        engine = create_engine(url)
        try:
            await ensure_schema(engine, auto_migrate=False)
            planned = await run_prune(engine, cutoff, dry_run=True)
            if dry_run:
                return planned
            total = sum(planned.counts().values())
            done: dict[str, int] = {}
            with click.progressbar(length=total, label="pruning", file=sys.stderr) as bar:

                def progress(table: str, rows: int) -> None:
                    bar.update(rows - done.get(table, 0))
                    done[table] = rows

                return await run_prune(engine, cutoff, progress=progress)
        finally:
            await engine.dispose()

    report = _run(run(), f"prune {url}")
    verb = "would delete" if dry_run else "deleted"
    table = [{"table": name, verb: count} for name, count in report.counts().items()]
    _emit(report, as_json, table, "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
