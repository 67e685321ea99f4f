"""A finished session id reused by its owner over ``/ws`` is refused with an error frame naming
the id, and the first run's record stands: while the server runs, and after a restart, when
the session is only in the store (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support import Client, Clients, Server, assert_error, running_server, sql

REFUSAL = (
    "session_id 'run@1' has already ended (completed); "
    "a finished session cannot be reopened: use a new session_id"
)


@pytest.fixture
def db_url(database_url: str) -> str:
    """On SQLite and on PostgreSQL: these flows record sessions."""
    return database_url


async def _record(server: Server) -> list[tuple[Any, ...]]:
    await server.registry.flush()
    rows = await sql(
        server.database_url,
        "SELECT session_id, owner_id, task_name, state, created_at, ended_at, end_reason "
        "FROM sessions",
    )
    return [tuple(row) for row in rows]


async def _ask(device: Client, task_name: str) -> None:
    await device.send_as("task", session_id="run@1", task_name=task_name, request="x")


async def _refused(device: Client) -> None:
    frame = await device.recv_type("error")
    assert_error(frame, REFUSAL)
    assert frame["session_id"] == "run@1"
    await device.nothing()  # no command: nothing runs


async def test_a_finished_session_id_reused_by_its_owner_is_refused(db_url: str) -> None:
    async with running_server(db_url) as server:
        clients = Clients(server)
        try:
            device = await clients.device("dev-reuse")
            await device.task("run@1", "first")
            await device.answer_command("run@1")
            end = await device.recv_type("task_end")
            assert (end["session_id"], end["status"]) == ("run@1", "completed")
            first = await _record(server)
            assert [row[:4] for row in first] == [("run@1", "dev-reuse", "first", "completed")]

            await _ask(device, "second")
            await _refused(device)
            assert await _record(server) == first
            assert server.registry.get_session("run@1") is None
        finally:
            await clients.aclose()

    async with running_server(db_url) as server:  # the session is only in the store now
        clients = Clients(server)
        try:
            device = await clients.device("dev-reuse")
            await _ask(device, "third")
            await _refused(device)
            assert await _record(server) == first
            events = await sql(
                db_url,
                "SELECT count(*) FROM audit_events "
                "WHERE session_id = 'run@1' AND kind = 'session_opened'",
            )
            assert events[0][0] == 1
        finally:
            await clients.aclose()


async def test_another_client_learns_only_that_the_id_is_not_its_own(
    server: Server, clients: Clients
) -> None:
    owner = await clients.device("dev-owner")
    await owner.task("run@1", "first")
    await owner.answer_command("run@1")
    await owner.recv_type("task_end")
    other = await clients.device("dev-other")
    await _ask(other, "mine")
    frame = await other.recv_type("error")
    assert_error(frame, "session_id 'run@1' is owned by another client")


def _gauge(metrics: str, state: str) -> float:
    (line,) = [
        line
        for line in metrics.splitlines()
        if line.startswith(f'registry_sessions{{state="{state}"}} ')
    ]
    return float(line.split()[1])


async def _metrics(server: Server) -> str:
    async with server.http() as http:
        return (await http.get("/metrics")).text


async def test_the_interrupted_gauge_counts_sessions_until_their_owner_ends_them(
    db_url: str,
) -> None:
    """``registry_sessions{state="interrupted"}`` agrees with the API: a session interrupted
    by a server stop is counted (and found by get_interrupted_sessions) until its owner is back
    and the runner ends it, then it is not."""
    async with running_server(db_url) as server:
        clients = Clients(server)
        device = await clients.device("dev-int")
        await device.send_as("task", session_id="int@1", task_name="job", request="x")
        await device.recv_type("command")  # running, never answered
        # Leaving the block stops the server with the session active.
    await clients.aclose()

    async with running_server(db_url) as server:
        assert _gauge(await _metrics(server), "interrupted") == 1.0
        assert [s.session_id for s in server.registry.get_interrupted_sessions("dev-int")] == [
            "int@1"
        ]
        clients = Clients(server)
        try:
            device = await clients.device("dev-int")
            end = await device.recv_type("task_end")
            assert (end["session_id"], end["status"]) == ("int@1", "failed")
            assert _gauge(await _metrics(server), "interrupted") == 0.0
            assert server.registry.get_interrupted_sessions("dev-int") == []
            assert server.registry.get_session("int@1") is None
        finally:
            await clients.aclose()
