"""The store fails while the server runs (``store_faults``: locked, disk full, read-only, refusing
connections, restarted): the server keeps serving what is live, says so loudly, refuses what it
cannot record, and writes everything it accepted once the store is back.

The policy under test (README, "When the store fails"):

- what a client *starts* (a registration, a task) is acknowledged only once durable; if the
  commit does not come within ``store_timeout`` it is refused (4503, or an error frame) and
  never written, and it is refused at once when the journal holds ``journal_limit``
  operations;
- what *ends* (a disconnect, a session's end) is never refused: the server waits up to
  ``store_timeout`` for it and goes on, and the journal writes it when the store is back;
- live clients keep working: heartbeats, the live API, sessions already running;
- ``/api/health`` answers 503 ``degraded`` with the reason, ``registry_store_healthy`` is 0,
  and each failed commit is logged as an error, until the store is back.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from registry.server import closecodes
from registry.server.aip import STORE_BEHIND
from tests.reliability.store_faults import FAULTS, Fault, prepared
from tests.support import Client, Clients, Server, assert_error, eventually, sql

#: Long enough for a commit on a loaded 2-core machine, short enough to keep the tests quick.
STORE_TIMEOUT = 1.0
#: How long the server may take to find the store writable again (backoff is capped at 5 s,
#: and a locked SQLite commit waits out its 5 s busy timeout first).
RECOVERY = 30.0


@pytest.fixture(params=FAULTS)
async def fault(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fault]:
    async with prepared(request.param, tmp_path) as prepared_fault:
        yield prepared_fault


@pytest.fixture
def db_url(fault: Fault) -> str:
    return fault.url


@pytest.fixture
async def broken(fault: Fault, server: Server) -> AsyncIterator[Fault]:
    """``fault`` for a test on ``server``: mended before the server stops, even if the test
    fails while the store is broken (a server cannot drain its journal into a broken store)."""
    try:
        yield fault
    finally:
        await fault.clear()


@pytest.fixture
def server_settings() -> dict[str, Any]:
    # Node beats only when the test writes: a disk-full fault must meet the test's commits.
    return {"store_timeout": STORE_TIMEOUT, "auto_migrate": True, "heartbeat_interval": 60.0}


async def _health(server: Server) -> tuple[int, dict[str, Any]]:
    async with server.http() as http:
        answer = await http.get("/api/health")
        body: dict[str, Any] = answer.json()
        return answer.status_code, body


async def _store_healthy_metric(server: Server) -> float:
    async with server.http() as http:
        text = (await http.get("/metrics")).text
    (line,) = [line for line in text.splitlines() if line.startswith("registry_store_healthy ")]
    return float(line.split()[1])


async def _refused_registration(clients: Clients, client_id: str) -> tuple[float, Client]:
    """Try to register ``client_id``; assert the store refusal, return how long it took."""
    client = await clients.open()
    started = time.monotonic()
    await client.send(type="register", status="ok", client_id=client_id, client_type="device")
    frame = await client.recv()
    code, reason = await client.closed()
    took = time.monotonic() - started
    assert frame["type"] == "error", frame
    assert "try again later" in frame["error"], frame
    assert code == closecodes.STORE_UNAVAILABLE, (code, reason)
    return took, client


async def _round_trip(constellation: Client, device: Client) -> dict[str, Any]:
    """A task from ``constellation`` to ``device``, answered; the ``task_end`` frame."""
    session_id = f"s-{uuid.uuid4().hex[:8]}"
    await constellation.task(session_id, "job", target_id=device.client_id)
    await device.answer_command(session_id)
    end = await constellation.recv_type("task_end")
    assert (end["session_id"], end["status"]) == (session_id, "completed"), end
    return end


async def test_server_rides_out_a_store_fault(
    broken: Fault,
    server: Server,
    clients: Clients,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    caplog.set_level(logging.WARNING)
    device = await clients.device("dev-a")
    leaving = await clients.device("dev-b")
    constellation = await clients.constellation("con", target_id="dev-a")
    await _round_trip(constellation, device)
    # A session in flight when the store breaks: its result must not wait for the store.
    running = "s-running"
    await constellation.task(running, "long", target_id="dev-a")
    command = await device.recv_type("command")

    await broken.inject()
    injected = time.monotonic()

    await leaving.close()  # an end: accepted, and written once the store is back
    _, body = await eventually(
        lambda: _health(server), lambda answer: answer[0] == 503, wait=RECOVERY
    )
    assert body["status"] == "degraded", body
    assert body["error"], body
    assert body["journal_depth"] > 0, body
    assert sorted(body["online_clients"]) == ["con", "dev-a"], body
    assert await _store_healthy_metric(server) == 0.0
    degraded_after = time.monotonic() - injected

    # The live map keeps serving: heartbeats and the live API answer as before.
    await device.heartbeat_ok()
    await constellation.heartbeat_ok()
    async with server.http() as http:
        listed = (await http.get("/api/clients")).json()["online_clients"]
    assert sorted(listed) == ["con", "dev-a"]

    # The running session ends: the owner hears of it within store_timeout, not after the fault.
    started = time.monotonic()
    await device.send_as(
        "command_results",
        session_id=running,
        prev_response_id=command["response_id"],
        action_results=[
            {"status": "success", "result": {}, "call_id": action["call_id"]}
            for action in command["actions"]
        ],
    )
    for party in (constellation, device):
        end = await party.recv_type("task_end")
        assert (end["session_id"], end["status"]) == (running, "completed"), end
    assert time.monotonic() - started < STORE_TIMEOUT + 2.0

    # What starts is refused, with a clear error, within store_timeout.
    took, _ = await _refused_registration(clients, "dev-c")
    assert took < STORE_TIMEOUT + 2.0
    await constellation.send_as(
        "task", target_id="dev-a", session_id="s-refused", task_name="t", request="r"
    )
    refusal = await constellation.recv_type("error")
    assert_error(refusal, STORE_BEHIND)
    assert refusal["session_id"] == "s-refused"
    await device.nothing()  # no command for a refused task

    depth = server.registry.journal.depth
    await broken.clear()
    cleared = time.monotonic()

    await eventually(lambda: _health(server), lambda answer: answer[0] == 200, wait=RECOVERY)
    healthy_after = time.monotonic() - cleared
    assert await _store_healthy_metric(server) == 1.0
    later = await clients.device("dev-c")  # registrations work again
    await _round_trip(constellation, device)
    await server.registry.flush()

    errors = [
        record.getMessage()
        for record in caplog.records
        if record.name == "registry.journal" and record.levelno == logging.ERROR
    ]
    assert errors, "the fault was not logged"
    assert all(
        "operations failed" in message or "the store is not answering" in message
        for message in errors
    ), errors
    assert any("store writable again" in record.getMessage() for record in caplog.records)

    # Everything accepted during the fault is in the database, exactly once; the refused
    # registration is not.
    rows = await sql(
        server.database_url,
        "SELECT client_id, close_reason FROM connections ORDER BY client_id, connected_at",
    )
    assert [tuple(row) for row in rows] == [
        ("con", None),
        ("dev-a", None),
        ("dev-b", "client_closed"),
        ("dev-c", None),
    ]
    stored = await sql(server.database_url, "SELECT session_id, state FROM sessions")
    sessions = {row[0]: row[1] for row in stored}
    assert sessions[running] == "completed"
    assert "s-refused" not in sessions, sessions  # refused before it was opened
    await later.close()
    # The figures of the README's reliability section (shown with pytest -s).
    print(
        f"\nfault {request.node.callspec.params['fault']}: {body['error'][:100]!r}; degraded "
        f"after {degraded_after:.1f}s, registration refused in {took:.1f}s, {depth} operations "
        f"journalled, healthy {healthy_after:.1f}s after the fault cleared, all written"
    )


@pytest.mark.parametrize("fault", ["sqlite-locked"], indirect=True)
async def test_the_sessions_a_disconnect_ends_wait_for_the_store_together(
    broken: Fault, server: Server, clients: Clients
) -> None:
    """A device running several sessions leaves during a fault: every owner hears of its
    session's end after one ``store_timeout`` wait for all of them, not one wait each."""
    sessions = 4
    device = await clients.device("dev-a")
    constellation = await clients.constellation("con", target_id="dev-a")
    for number in range(sessions):
        await constellation.task(f"s-{number}", f"job-{number}", target_id="dev-a")
        await device.recv_type("command")
    await broken.inject()

    started = time.monotonic()
    await device.close()
    ends = [await constellation.recv_type("task_end") for _ in range(sessions)]
    took = time.monotonic() - started
    assert sorted(end["session_id"] for end in ends) == [f"s-{n}" for n in range(sessions)]
    assert {end["status"] for end in ends} == {"failed"}, ends
    assert took < STORE_TIMEOUT * (sessions - 1), f"{took:.1f}s for {sessions} session ends"

    await broken.clear()
    await eventually(lambda: _health(server), lambda answer: answer[0] == 200, wait=RECOVERY)
    await server.registry.flush()
    rows = await sql(server.database_url, "SELECT state FROM sessions")
    assert sorted(row[0] for row in rows) == ["failed"] * sessions


@pytest.mark.parametrize(
    "fault",
    ["sqlite-locked", pytest.param("postgresql-refusing", marks=pytest.mark.postgres)],
    indirect=True,
)
class TestJournalLimit:
    LIMIT = 12

    @pytest.fixture
    def server_settings(self) -> dict[str, Any]:
        return {
            "store_timeout": STORE_TIMEOUT,
            "auto_migrate": True,
            "heartbeat_interval": 60.0,
            "journal_limit": self.LIMIT,
        }

    async def test_full_journal_refuses_registrations_at_once_and_loses_nothing(
        self, broken: Fault, server: Server, clients: Clients
    ) -> None:
        device = await clients.device("dev-a")
        leaving = await clients.device("dev-b")
        constellation = await clients.constellation("con", target_id="dev-a")
        await broken.inject()
        await leaving.close()

        # Each registration that times out keeps its place in the journal (its operations
        # withdrawn: never written), until it is full.
        timed_out: list[str] = []
        for attempt in range(self.LIMIT):
            client_id = f"try-{attempt}"
            took, _ = await _refused_registration(clients, client_id)
            if took < STORE_TIMEOUT / 2:
                break  # refused at once: the journal is full
            timed_out.append(client_id)
        else:
            raise AssertionError("the journal limit never refused a registration")
        assert timed_out, "the first attempt should have waited for the store"

        status, body = await _health(server)
        assert status == 503, body
        assert body["journal_depth"] >= self.LIMIT == body["journal_limit"], body
        async with server.http() as http:
            metrics = (await http.get("/metrics")).text
        assert 'registry_journal_refused_total{what="registration"} 1.0' in metrics
        assert 'registry_journal_refused_total{what="session"} 0.0' in metrics
        await device.heartbeat_ok()  # live clients are still served
        # A task is refused at once too, and nothing of it is queued.
        depth = server.registry.journal.depth
        started = time.monotonic()
        await constellation.send_as(
            "task", target_id="dev-a", session_id="s-full", task_name="t", request="r"
        )
        assert_error(await constellation.recv_type("error"), STORE_BEHIND)
        assert time.monotonic() - started < STORE_TIMEOUT / 2
        assert server.registry.journal.depth == depth
        await device.nothing()

        await broken.clear()
        await eventually(lambda: _health(server), lambda answer: answer[0] == 200, wait=RECOVERY)
        await server.registry.flush()
        rows = await sql(
            server.database_url,
            "SELECT client_id, close_reason FROM connections ORDER BY client_id",
        )
        # What was refused, at once or after store_timeout, left no record.
        assert sorted(tuple(row) for row in rows) == [
            ("con", None),
            ("dev-a", None),
            ("dev-b", "client_closed"),
        ]
        assert await sql(server.database_url, "SELECT * FROM sessions") == []
        print(
            f"\njournal limit {self.LIMIT}: {len(timed_out)} registrations refused after "
            f"store_timeout, then one at once, in {took * 1000:.0f} ms; depth "
            f"{body['journal_depth']}; everything accepted written"
        )
