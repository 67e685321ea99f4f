"""Bad input gets a clear error naming the argument, and changes nothing.

Each rejected call must raise :class:`registry.InvalidArgumentError` (a ``ValueError``) whose
``argument`` and message name the parameter; afterwards the live state is as before, and once
flushed the database holds exactly the rows it held before (audit trail included). Values that
one backend would accept and the other refuse (NUL characters, lone surrogates, ids longer than
the columns) are refused up front on both, so they can never block the writer.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

import registry
from registry import ClientType, InvalidArgumentError, Registry
from registry.store.dialect import create_engine
from registry.store.models import Base

LONG_ID = "x" * 256


class Opaque:
    pass


def _deep(levels: int) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for _ in range(levels):
        document = {"a": document}
    return document


def _circular() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


BAD_IDS: list[object] = ["", "   ", None, 123, b"bytes", LONG_ID, "a\x00b", "a\ud800"]
#: Ids no REST path could address (README "Client ids"): refused like the others.
BAD_IDS += ["a/b", "/", ".", "..", "a\x01b", "line\nbreak", "\x7f", "a\x9fb"]
BAD_DOCUMENTS: list[object] = [
    ["not", "a", "dict"],
    "a string",
    {"set": {1, 2}},
    {"object": Opaque()},
    {"nan": float("nan")},
    {"inf": math.inf},
    {("tuple", "key"): 1},
    {"nul": "a\x00b"},
    {"a\x00": "nul in a key"},
    {"deep": [{"surrogate": "\udc00"}]},
    _circular(),
    _deep(5000),
    {"deep": _deep(2000), "nul": "\x00"},
]


def live_state(reg: Registry) -> tuple[Any, ...]:
    """Everything the reference reads can see about the baseline clients and sessions."""
    clients = sorted(
        (c.client_id, c.platform, c.client_type, repr(c.metadata), c.connection_id)
        for c in reg.get_all_clients()
    )
    return (
        reg.get_online_count(),
        clients,
        reg.get_device_sessions("d1"),
        reg.get_constellation_sessions("c1"),
        reg.get_device_info("d1"),
        reg.get_session("s1"),
    )


async def db_state(url: str) -> dict[str, Any]:
    """Row counts of every table, the newest audit event, and every connection's state."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            counts = {
                table.name: (
                    await connection.execute(text(f"SELECT count(*) FROM {table.name}"))
                ).scalar()
                for table in Base.metadata.sorted_tables
            }
            newest = (
                await connection.execute(text("SELECT max(event_id) FROM audit_events"))
            ).scalar()
            connections = (
                await connection.execute(
                    text(
                        "SELECT connection_id, disconnected_at, close_reason FROM connections "
                        "ORDER BY connection_id"
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    return {
        "counts": counts,
        "newest_audit": newest,
        "connections": [tuple(r) for r in connections],
    }


async def baseline(reg: Registry) -> None:
    reg.add_client("d1", "windows", object(), ClientType.DEVICE, {"k": 1})
    reg.add_client("c1", "linux", object(), ClientType.CONSTELLATION)
    reg.add_constellation_session("c1", "s1")
    reg.add_device_session("d1", "s1")
    reg.set_device_info("d1", {"os": "Windows"})
    await reg.flush()


#: Calls made with no arguments. Each lambda binds its bad value as a default (``b=bad``), so
#: mypy types it from the ``...`` as Any: the values are of wrong types on purpose.
BadCall = Callable[..., object]
BadCoroutine = Callable[..., Awaitable[object]]


def bad_calls(reg: Registry) -> list[tuple[str, BadCall]]:
    """(argument the error must name, call) for every synchronous mutation."""
    ws = object()
    calls: list[tuple[str, BadCall]] = []
    for bad in BAD_IDS:
        calls += [
            ("client_id", lambda b=bad: reg.add_client(b, "linux", ws, ClientType.DEVICE)),
            ("device_id", lambda b=bad: reg.add_device_session(b, "s9")),
            ("session_id", lambda b=bad: reg.add_device_session("d1", b)),
            ("constellation_id", lambda b=bad: reg.add_constellation_session(b, "s9")),
            ("session_id", lambda b=bad: reg.add_constellation_session("c1", b)),
            ("device_id", lambda b=bad: reg.set_device_info(b, {"a": 1})),
            ("client_id", lambda b=bad: reg.remove_client(b)),
            ("device_id", lambda b=bad: reg.remove_device_sessions(b)),
            ("constellation_id", lambda b=bad: reg.remove_constellation_sessions(b)),
            ("session_id", lambda b=bad: reg.remove_session(b)),
        ]
    for bad in BAD_DOCUMENTS:
        calls += [
            # d1 is live: the bad metadata must be reported, not a duplicate
            ("metadata", lambda b=bad: reg.add_client("d1", "linux", ws, ClientType.DEVICE, b)),
            ("metadata", lambda b=bad: reg.add_client("d9", "linux", ws, ClientType.DEVICE, b)),
            ("device_info", lambda b=bad: reg.set_device_info("d1", b)),
        ]
    calls += [("device_info", lambda: reg.set_device_info("d1", None))]  # type: ignore[arg-type]
    for bad_platform in (None, 5, LONG_ID, "li\x00nux"):
        calls.append(
            ("platform", lambda b=bad_platform: reg.add_client("d9", b, ws, ClientType.DEVICE))
        )
    for bad_type in ("printer", "DEVICE ", None, 42, ClientType):
        calls.append(("client_type", lambda b=bad_type: reg.add_client("d9", "linux", ws, b)))
    for bad_address in (5, "a" * 300, "10.0.0.1\x00"):
        calls.append(
            (
                "remote_address",
                lambda b=bad_address: reg.add_client(
                    "d9", "linux", ws, ClientType.DEVICE, remote_address=b
                ),
            )
        )
    for bad_code in ("1000", -1, 70000, 1.5, True):
        calls.append(("code", lambda b=bad_code: reg.remove_client("d1", code=b)))
    for bad_reason in (5, b"bytes", ["bye"]):
        calls += [
            ("reason", lambda b=bad_reason: reg.remove_client("d1", reason=b)),
            ("reason", lambda b=bad_reason: reg.remove_session("s1", reason=b)),
        ]
    for bad_state in ("active", "bogus", None, 3, "ACTIVE"):
        calls.append(("state", lambda b=bad_state: reg.remove_session("s1", state=b)))
    return calls


def bad_coroutines(reg: Registry) -> list[tuple[str, BadCoroutine]]:
    ws = object()
    calls: list[tuple[str, BadCoroutine]] = []
    for bad in BAD_IDS:
        calls += [
            (
                "client_id",
                lambda b=bad: reg.add_client_durable(b, "linux", ws, ClientType.DEVICE),
            ),
            ("client_id", lambda b=bad: reg.remove_client_durable(b)),
            ("device_id", lambda b=bad: reg.set_device_info_durable(b, {})),
            ("session_id", lambda b=bad: reg.open_session(b, owner_id="c1", executor_id="d1")),
            ("owner_id", lambda b=bad: reg.open_session("s9", owner_id=b, executor_id="d1")),
            ("executor_id", lambda b=bad: reg.open_session("s9", owner_id="c1", executor_id=b)),
            ("session_id", lambda b=bad: reg.end_session(b, "completed")),
        ]
        if bad is not None:  # no task name is fine
            calls.append(
                (
                    "task_name",
                    lambda b=bad: reg.open_session(
                        "s9", owner_id="c1", executor_id="d1", task_name=b
                    ),
                )
            )
    for bad in BAD_DOCUMENTS:
        calls += [
            (
                "metadata",
                lambda b=bad: reg.add_client_durable("d9", "linux", ws, ClientType.DEVICE, b),
            ),
            ("device_info", lambda b=bad: reg.set_device_info_durable("d1", b)),
        ]
    for bad_state in ("active", "bogus", None):
        calls.append(("state", lambda b=bad_state: reg.end_session("s1", b)))
    calls.append(("reason", lambda: reg.end_session("s1", "failed", 42)))  # type: ignore[arg-type]
    calls.append(("code", lambda: reg.remove_client_durable("d1", code=-5)))
    return calls


def _check(error: InvalidArgumentError, argument: str) -> None:
    assert isinstance(error, ValueError)
    assert isinstance(error, registry.RegistryError)
    assert error.argument == argument
    assert argument in str(error)


async def test_bad_input_raises_and_changes_nothing(registry: Registry, database_url: str) -> None:
    await baseline(registry)
    before_live = live_state(registry)
    before_db = await db_state(database_url)
    sync_calls = bad_calls(registry)
    async_calls = bad_coroutines(registry)
    assert len(sync_calls) > 130
    for index, (argument, call) in enumerate(sync_calls):
        try:
            call()
        except InvalidArgumentError as error:
            _check(error, argument)
        else:
            pytest.fail(f"bad call #{index} (bad {argument}) was accepted")
        assert live_state(registry) == before_live, (index, argument)
    for index, (argument, coroutine) in enumerate(async_calls):
        try:
            await coroutine()
        except InvalidArgumentError as error:
            _check(error, argument)
        else:
            pytest.fail(f"bad coroutine #{index} (bad {argument}) was accepted")
        assert live_state(registry) == before_live, (index, argument)
    async with asyncio.timeout(10):  # nothing poisoned the writer
        await registry.flush()
    assert registry.journal.last_error is None
    assert await db_state(database_url) == before_db
    # The registry still works normally afterwards.
    registry.add_client("d2", "linux", object(), ClientType.DEVICE)
    async with asyncio.timeout(10):
        await registry.flush()
    assert (await db_state(database_url))["counts"]["connections"] == 3


async def test_values_at_the_limits_are_accepted_on_both_backends(
    registry: Registry, database_url: str
) -> None:
    """The largest and oddest valid values are stored (and read back) on both backends."""
    longest = "é" * 255  # 255 characters, 510 bytes
    registry.add_client(
        longest,
        "p" * 255,
        object(),
        "constellation",
        {"emoji": "\U0001f600", "quote": "\"'\\", "escaped": "\\u0000", "big": 2**62},
        remote_address="[2001:db8::1]:65535",
    )
    registry.set_device_info(longest, {"nested": [[[]]], "unicode": "日本語", "neg": -1.5e-300})
    registry.add_device_session(longest, longest)
    registry.remove_client(longest, code=65535, reason="r" * 10_000)
    registry.remove_session(longest, state="cancelled", reason="")
    async with asyncio.timeout(10):
        await registry.flush()
    page = await registry.history.connections(longest)
    record = page.items[0]
    assert record.metadata["emoji"] == "\U0001f600"
    assert record.metadata["escaped"] == "\\u0000"
    assert record.metadata["big"] == 2**62
    assert (record.close_code, len(record.close_reason or "")) == (65535, 10_000)
    snapshots = await registry.history.device_info(longest)
    assert snapshots.items[0].info == {"nested": [[[]]], "unicode": "日本語", "neg": -1.5e-300}


async def test_unstorable_reasons_are_cleaned_not_refused(
    registry: Registry, database_url: str
) -> None:
    """A close reason or an end reason is free text (often a peer's): the removal must happen,
    so NUL characters and lone surrogates are replaced instead of refusing it."""
    registry.add_client("d1", "linux", object(), ClientType.DEVICE)
    registry.add_device_session("d1", "s1")
    registry.remove_client("d1", code=1000, reason="bye\x00now\ud800")
    assert not registry.is_online("d1")
    registry.remove_session("s1", state="failed", reason="error\x00")
    assert registry.get_device_sessions("d1") == set()
    async with asyncio.timeout(10):
        await registry.flush()
    record = (await registry.history.connections("d1")).items[0]
    assert record.close_reason == "bye\ufffdnow\ufffd"
    session = (await registry.history.sessions("d1")).items[0]
    assert session.end_reason == "error\ufffd"


def test_bad_constructor_arguments() -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("on_duplicate", {"on_duplicate": "overwrite"}),
        ("on_duplicate", {"on_duplicate": None}),
        ("database_url", {"database_url": "mysql://user@localhost/db"}),
        ("database_url", {"database_url": "redis://localhost:6379/0"}),
        ("database_url", {"database_url": "not a url at all"}),
        ("node_name", {"node_name": LONG_ID}),
        ("node_name", {"node_name": "node\x00"}),
        ("heartbeat_interval", {"heartbeat_interval": 0}),
        ("heartbeat_interval", {"heartbeat_interval": -1.0}),
        ("node_timeout", {"node_timeout": 0}),
        ("close_timeout", {"close_timeout": -1}),
    ]
    for argument, kwargs in cases:
        url = kwargs.pop("database_url", "sqlite+aiosqlite:///unused.db")
        with pytest.raises(InvalidArgumentError) as caught:
            Registry(url, **kwargs)
        _check(caught.value, argument)
    # The accepted spellings work.
    assert Registry("sqlite:///x.db", on_duplicate="replace").database_url.startswith(
        "sqlite+aiosqlite://"
    )
    assert Registry("postgresql://u:secret@h/db").database_url == (
        "postgresql+asyncpg://u:***@h/db"
    )


# -- the store cannot be used -------------------------------------------------------------------


async def _settle_sqlite_threads() -> None:
    """Let aiosqlite's worker threads of failed connections finish while our loop still runs.

    When ``aiosqlite.connect`` fails it stops its worker thread with a future nobody awaits;
    if the loop closes first, that thread dies with "Event loop is closed" (an aiosqlite race,
    not a registry one).
    """
    for _ in range(200):
        if not any("_connection_worker_thread" in thread.name for thread in threading.enumerate()):
            return
        await asyncio.sleep(0.01)


async def _refused_start(url: str) -> registry.StoreUnavailableError:
    reg = Registry(url, auto_migrate=True)
    with pytest.raises(registry.StoreUnavailableError) as caught:
        await reg.start()
    await _settle_sqlite_threads()
    # Nothing is left started: mutations and queries refuse.
    with pytest.raises(registry.RegistryClosedError):
        reg.add_client("d1", "linux", object(), ClientType.DEVICE)
    with pytest.raises(registry.RegistryClosedError):
        _ = reg.history
    assert isinstance(caught.value, registry.StoreError)
    return caught.value


async def test_unreachable_postgresql_is_a_clear_error() -> None:
    error = await _refused_start("postgresql+asyncpg://postgres:hunter2@127.0.0.1:1/x")
    message = str(error)
    assert "cannot open the registry database" in message
    assert "127.0.0.1:1" in message
    assert "hunter2" not in message  # the password is never shown


async def test_sqlite_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    error = await _refused_start(f"sqlite+aiosqlite:///{missing / 'registry.db'}")
    assert "unable to open database file" in str(error)
    assert not (tmp_path / "no").exists()


async def test_read_only_sqlite_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    async with Registry(f"sqlite+aiosqlite:///{path}"):
        pass  # a migrated database with one finished node run
    size = path.stat().st_size
    # Tests run as root, which ignores file modes: open it read-only through SQLite itself.
    error = await _refused_start(f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true")
    assert "readonly" in str(error)
    assert path.stat().st_size == size
    async with Registry(f"sqlite+aiosqlite:///{path}") as reg:
        await reg.flush()
        engine = create_engine(f"sqlite+aiosqlite:///{path}")
        try:
            async with engine.connect() as connection:
                nodes = (await connection.execute(text("SELECT count(*) FROM nodes"))).scalar()
        finally:
            await engine.dispose()
        assert nodes == 2  # the first run and this one; the refused start left nothing


async def test_read_only_empty_sqlite_cannot_be_migrated(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    error = await _refused_start(f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true")
    assert "readonly" in str(error)
    assert path.stat().st_size == 0
