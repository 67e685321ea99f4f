"""``GET /api/events``: Server-Sent Events from the audit trail, live and resumed.

Runs on SQLite and PostgreSQL: the events are the store's audit rows.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert

from registry.audit import AuditKind
from registry.history import encode_cursor
from registry.server.events import KINDS, EventFeed, event_kind, stream
from registry.store import models
from registry.store.dialect import create_engine
from registry.types import AuditEvent
from tests.server.sse import subscribe
from tests.support import (
    API_KEY,
    HOST,
    WAIT,
    Clients,
    Serve,
    Server,
    eventually,
    free_port,
    store,
)


@pytest.fixture
def db_url(database_url: str) -> str:
    return database_url


async def _committed_events(server: Server, after: int = 0) -> list[AuditEvent]:
    """Every audit row after ``after`` that is sent as an event, in id order."""
    await server.registry.flush()
    found: list[AuditEvent] = []
    async with store(server.database_url) as history:
        cursor: str | None = encode_cursor(after)
        while cursor is not None:
            page = await history.audit(cursor=cursor, limit=1000)
            found += [event for event in page.items if event_kind(event.kind)]
            cursor = page.next_cursor
    return found


async def test_a_subscriber_sees_joins_leaves_sessions_and_info_in_commit_order(
    server: Server, clients: Clients
) -> None:
    async with subscribe(server) as events:
        device = await clients.device("dev-1", system_info={"cpu": 4})
        constellation = await clients.constellation("const-1")
        await constellation.send_as(
            "task", target_id="dev-1", session_id="s-1", task_name="job", request="go"
        )
        await constellation.recv_type("heartbeat")
        await device.recv_type("command")
        await device.close()  # the session it runs ends with it
        expected = await eventually(
            lambda: _committed_events(server),
            lambda rows: {"leave", "session_end"} <= {event_kind(row.kind) for row in rows},
        )
        received = await events.wait_for(len(expected))
    assert [event.id for event in received] == [row.event_id for row in expected]
    assert [event.kind for event in received] == [event_kind(row.kind) for row in expected]
    kinds = [event.kind for event in received]
    assert kinds[:3] == ["join", "device_info", "join"], kinds
    assert {"session_start", "session_end", "leave"} <= set(kinds)
    join = received[0].data
    assert join["id"] == received[0].id
    assert (join["client_id"], join["audit_kind"]) == ("dev-1", "client_registered")
    assert join["details"]["client_type"] == "device"
    assert join["node_id"] == server.registry.node_id


async def test_filters_by_kind_and_client(server: Server, clients: Clients) -> None:
    async with (
        subscribe(server, params={"kind": ["leave"], "client": "dev-2"}) as narrow,
        subscribe(server, params={"kind": ["join", "leave"]}) as wide,
    ):
        one = await clients.device("dev-1", system_info={"cpu": 1})
        two = await clients.device("dev-2", system_info={"cpu": 2})
        await one.close()
        await two.close()
        await wide.wait_for(4)
        await narrow.wait_for(1)
        await asyncio.sleep(0.5)  # nothing else may come
    assert [(e.kind, e.data["client_id"]) for e in narrow.events] == [("leave", "dev-2")]
    assert sorted((e.kind, e.data["client_id"]) for e in wide.events) == [
        ("join", "dev-1"),
        ("join", "dev-2"),
        ("leave", "dev-1"),
        ("leave", "dev-2"),
    ]


async def test_a_subscriber_resumes_with_its_last_id_and_gets_exactly_what_it_missed(
    server: Server, clients: Clients
) -> None:
    """Reconnecting while clients keep registering: the resumed stream is the audit trail's
    events after the last id, each once, in order, with no gap at the replay's end."""
    async with subscribe(server) as first:
        for n in range(3):
            await clients.device(f"early-{n}")
        await first.wait_for(3)
    last = first.ids[2]

    stop = asyncio.Event()

    async def churn() -> None:
        for n in itertools.count():
            client = await clients.device(f"churn-{n}")
            await client.close()
            if stop.is_set():
                return

    churner = asyncio.create_task(churn())
    try:
        await eventually(lambda: _committed_events(server, last), lambda rows: len(rows) >= 6)
        async with subscribe(server, last_event_id=last) as resumed:
            await eventually(lambda: _committed_events(server, last), lambda r: len(r) >= 30)
            stop.set()
            await churner
            expected = await _committed_events(server, last)
            await resumed.wait_for(len(expected))
            await asyncio.sleep(0.3)
    finally:
        stop.set()
        await churner
    assert resumed.ids == [row.event_id for row in expected]


async def test_events_written_by_another_node_arrive_within_the_poll(server: Server) -> None:
    """Rows this server's journal did not commit (another node, a tool) come from the
    periodic read of the audit trail. A SQLite file has one registry, so the other writer is
    a plain insert of the row another node's journal would write."""
    async with subscribe(server, params={"kind": "join"}) as events:
        engine = create_engine(server.database_url)
        try:
            async with engine.begin() as connection:
                await connection.execute(
                    insert(models.audit_events).values(
                        at=datetime.now(UTC),
                        node_id="other-node",
                        kind=AuditKind.CLIENT_REGISTERED.value,
                        client_id="elsewhere",
                        details={"client_type": "device", "platform": "linux"},
                    )
                )
        finally:
            await engine.dispose()
        (event,) = await events.wait_for(1, wait=3)
        assert event.data["client_id"] == "elsewhere"
        assert event.data["node_id"] == "other-node"


async def test_wrong_key_unknown_kind_and_bad_last_event_id_are_refused(server: Server) -> None:
    async with server.http(api_key="wrong") as http:
        assert (await http.get("/api/events")).status_code == 401
    async with server.http() as http:
        answer = await http.get("/api/events", params={"kind": "explode"})
        assert answer.status_code == 422
        assert "explode" in answer.json()["detail"]
        answer = await http.get("/api/events", headers={"Last-Event-ID": "yesterday"})
        assert answer.status_code == 422
        assert "Last-Event-ID" in answer.json()["detail"]
    assert server.app.state.events.subscribers == 0


async def test_a_subscriber_that_does_not_read_is_dropped_and_others_go_on(
    server: Server, clients: Clients
) -> None:
    """The feed never waits for a subscriber: one whose buffer is full is ended, and the
    others get every event."""
    feed: EventFeed = server.app.state.events
    feed.buffer = 3
    stuck = await feed.subscribe(list(KINDS))  # never read
    try:
        async with subscribe(server, params={"kind": "join"}) as reader:
            for n in range(6):
                await clients.device(f"dev-{n}")
            await reader.wait_for(6)
            async with asyncio.timeout(WAIT):
                await stuck.ended.wait()
        assert stuck.dropped
        assert feed.dropped == 1
        assert stuck.buffer.qsize() == 3
        # Its stream ends once it has read what was buffered: it may resume from there.
        history = server.registry.history
        sent = [message async for message in stream(history, stuck, None)]
        assert [message.id for message in sent[1:]] == [str(n) for n in reader.ids[:3]]
    finally:
        feed.unsubscribe(stuck)


async def test_the_feed_reads_nothing_without_subscribers(server: Server, clients: Clients) -> None:
    feed: EventFeed = server.app.state.events
    await clients.device("dev-1")
    await server.registry.flush()
    await asyncio.sleep(1.5)  # a poll and a commit have passed
    assert feed.subscribers == 0
    assert feed._last_id is None


async def test_the_stream_is_documented_in_the_openapi_schema(server: Server) -> None:
    async with server.http() as http:
        schema = (await http.get("/openapi.json")).json()
    route = schema["paths"]["/api/events"]["get"]
    assert "text/event-stream" in route["responses"]["200"]["content"]
    names = {parameter["name"] for parameter in route["parameters"]}
    assert {"kind", "client", "Last-Event-ID"} <= names


async def test_registry_serve_stops_promptly_with_a_stream_open(tmp_path: Path) -> None:
    """An endless stream must not hold the shutdown: uvicorn waits for open responses."""
    port = free_port()
    serve = Serve(f"sqlite+aiosqlite:///{tmp_path / 'stop.db'}", port, tmp_path / "serve.log")
    try:
        await serve.ready()
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None)) as http,
            http.stream(
                "GET", f"http://{HOST}:{port}/api/events", headers={"X-API-Key": API_KEY}
            ) as response,
        ):
            assert response.status_code == 200
            started = time.monotonic()
            code = await serve.stop(signal.SIGTERM)
            assert time.monotonic() - started < WAIT
            assert code in (0, -signal.SIGTERM)
        log = (tmp_path / "serve.log").read_text()
        assert "ERROR" not in log, log  # every stream ended, none cut off
    finally:
        await serve.stop(signal.SIGKILL)
