"""The bus contract (registry/cluster/bus.py) against a real Redis: two or three buses in one
process, each a node of its own, on channels of the test's own.

Run: ``python -m pytest tests/cluster -p no:cacheprovider -q`` (Redis at
``REGISTRY_TEST_REDIS_URL``; tests/cluster/conftest.py says when they skip).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import subprocess
import sys
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from registry.cluster import Bus, Message, RemoteError, bus_from_url
from registry.cluster.message import encode
from registry.errors import (
    BusTimeoutError,
    BusUnavailableError,
    InvalidArgumentError,
    SessionOwnershipError,
)
from tests.cluster.conftest import FAST, Connect, Inbox, RedisServer, settled
from tests.server_process import HOST, ROOT, free_port
from tests.support import QUIET, WAIT, until


async def test_send_reaches_the_node_addressed_only(redis_url: str, connect: Connect) -> None:
    a, b, c = [await connect(redis_url, node) for node in "abc"]
    inboxes = {bus.node_id: Inbox() for bus in (a, b, c)}
    for bus in (a, b, c):
        bus.on("note", inboxes[bus.node_id])

    await a.send("b", "note", {"n": 1})

    await until(lambda: len(inboxes["b"].messages) == 1)
    message = inboxes["b"].messages[0]
    assert (message.sender, message.type, message.kind, message.payload) == (
        "a",
        "event",
        "note",
        {"n": 1},
    )
    await asyncio.sleep(QUIET)
    assert inboxes["a"].messages == inboxes["c"].messages == []


async def test_broadcast_reaches_every_other_node(redis_url: str, connect: Connect) -> None:
    a, b, c = [await connect(redis_url, node) for node in "abc"]
    inboxes = {bus.node_id: Inbox() for bus in (a, b, c)}
    for bus in (a, b, c):
        bus.on("note", inboxes[bus.node_id])

    await a.broadcast("note", "from a")
    await c.broadcast("note", "from c")

    await until(lambda: len(inboxes["b"].messages) == 2)
    await until(lambda: inboxes["a"].payloads == ["from c"])
    await until(lambda: inboxes["c"].payloads == ["from a"])
    await asyncio.sleep(QUIET)  # and no node hears its own broadcast, even late
    assert sorted(inboxes["b"].payloads) == ["from a", "from c"]
    assert inboxes["a"].payloads == ["from c"]
    assert inboxes["c"].payloads == ["from a"]


async def test_request_returns_the_handlers_answer(redis_url: str, connect: Connect) -> None:
    a, b = await connect(redis_url, "a"), await connect(redis_url, "b")

    async def add(message: Message) -> dict[str, Any]:
        await asyncio.sleep(random.uniform(0, 0.01))  # answers come back out of order
        return {"sum": message.payload["x"] + message.payload["y"], "asked_by": message.sender}

    b.on("add", add)

    assert await a.request("b", "add", {"x": 1, "y": 2}) == {"sum": 3, "asked_by": "a"}
    answers = await asyncio.gather(*(a.request("b", "add", {"x": i, "y": i}) for i in range(50)))
    assert [answer["sum"] for answer in answers] == [2 * i for i in range(50)]
    assert await b.request("b", "add", {"x": 2, "y": 2}) == {"sum": 4, "asked_by": "b"}


async def test_a_node_not_listening_is_refused_at_once(redis_url: str, connect: Connect) -> None:
    a = await connect(redis_url, "a")

    started = time.monotonic()
    with pytest.raises(BusUnavailableError, match="node 'ghost' is not listening"):
        await a.request("ghost", "add", {}, timeout=WAIT)
    with pytest.raises(BusUnavailableError, match="node 'ghost' is not listening"):
        await a.send("ghost", "note")
    assert time.monotonic() - started < FAST


async def test_a_request_times_out_and_its_handler_is_cancelled(
    redis_url: str, connect: Connect
) -> None:
    a, b = await connect(redis_url, "a"), await connect(redis_url, "b")
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(message: Message) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def echo(message: Message) -> Any:
        return message.payload

    b.on("hang", hang)
    b.on("echo", echo)

    begun = time.monotonic()
    with pytest.raises(BusTimeoutError, match=r"node 'b' did not answer 'hang' within 0\.5s"):
        await a.request("b", "hang", timeout=0.5)
    assert 0.5 <= time.monotonic() - begun < 0.5 + FAST
    assert started.is_set()
    await asyncio.wait_for(cancelled.wait(), WAIT)  # b gave up too: no handler left hanging
    assert await a.request("b", "echo", "still there") == "still there"


async def test_a_failed_handler_gives_the_requester_a_clear_error(
    redis_url: str, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await connect(redis_url, "a"), await connect(redis_url, "b")

    async def fail(message: Message) -> None:
        raise ValueError(f"cannot handle {message.payload}")

    async def refuse(message: Message) -> None:
        raise SessionOwnershipError("s-1", "const-2")

    async def answer_badly(message: Message) -> Any:
        return {"not json": object()}

    inbox = Inbox()

    async def fail_event(message: Message) -> None:
        if message.payload == "bad":
            raise RuntimeError("bad event")
        await inbox(message)

    b.on("fail", fail)
    b.on("refuse", refuse)
    b.on("answer-badly", answer_badly)
    b.on("note", fail_event)

    with pytest.raises(RemoteError) as failed:
        await a.request("b", "fail", 7)
    assert (failed.value.node_id, failed.value.kind) == ("b", "fail")
    assert (failed.value.error_type, failed.value.detail) == ("ValueError", "cannot handle 7")
    assert str(failed.value) == "node 'b' could not answer 'fail': ValueError: cannot handle 7"

    with pytest.raises(RemoteError, match="SessionOwnershipError: session_id 's-1' is owned"):
        await a.request("b", "refuse")
    with pytest.raises(RemoteError, match="LookupError: no handler for 'unknown'"):
        await a.request("b", "unknown")
    with pytest.raises(RemoteError, match="InvalidArgumentError: payload: must be JSON"):
        await a.request("b", "answer-badly")

    await a.send("b", "note", "bad")  # an event handler that raises is logged; the next runs
    await a.send("b", "note", "good")
    await until(lambda: inbox.payloads == ["good"])
    logged = {r.getMessage() for r in caplog.records if r.name.startswith("registry.cluster")}
    assert "the handler for 'fail' asked by a failed" in logged
    assert "the handler for 'note' from a failed" in logged
    assert "no handler for 'unknown' asked by a" in logged
    # A refusal a handler raises on purpose (a RegistryError) is an answer, not a fault.
    assert not any("'refuse'" in text for text in logged)


async def test_a_large_payload_travels_whole(redis_url: str, connect: Connect) -> None:
    a, b = await connect(redis_url, "a"), await connect(redis_url, "b")
    big = {"blob": "x" * (8 << 20), "items": list(range(10_000)), "text": "é€😀"}
    inbox = Inbox()

    async def reflect(message: Message) -> Any:
        return message.payload

    b.on("note", inbox)
    b.on("reflect", reflect)

    await a.send("b", "note", big)
    await until(lambda: len(inbox.messages) == 1)
    assert inbox.payloads == [big]
    assert await a.request("b", "reflect", big, timeout=WAIT) == big


async def test_what_is_not_a_message_is_logged_and_dropped(
    redis_url: str,
    connect: Connect,
    raw: Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = await connect(redis_url, "a"), await connect(redis_url, "b")
    inbox = Inbox()
    b.on("note", inbox)
    valid = {"id": "1" * 32, "sender": "a", "type": "event", "kind": "note", "payload": 1}
    hostile: list[bytes] = [
        b"\xff\xfe not UTF-8",
        b"not json",
        b"[1, 2, 3]",
        b"null",
        b'{"id": 5}',
        json.dumps({**valid, "type": "bogus"}).encode(),
        json.dumps({**valid, "sender": ""}).encode(),
        json.dumps({**valid, "type": "request"}).encode(),  # no timeout
        json.dumps({**valid, "type": "request", "timeout": -1}).encode(),
        json.dumps({**valid, "type": "reply"}).encode(),  # no reply_to
        json.dumps({**valid, "type": "reply", "reply_to": "x", "error": "boom"}).encode(),
        b"[" * 100_000 + b"]" * 100_000,  # nested beyond the parser's recursion
        bytes(random.getrandbits(8) for _ in range(1 << 20)),
    ]
    for data in hostile:
        await raw.publish(f"{prefix}node:b", data)
    await raw.publish(f"{prefix}broadcast", b"not json either")

    await settled(a, "b", inbox)
    assert inbox.messages == []
    dropped = [r for r in caplog.records if r.getMessage().startswith("dropped what is not")]
    assert len(dropped) == len(hostile) + 2  # the broadcast one by a and b both
    assert all(r.levelno == logging.WARNING for r in dropped)
    assert f"on {prefix}node:b (not JSON" in dropped[1].getMessage()
    assert max(len(r.getMessage()) for r in dropped) < 2000  # quoted, not dumped

    async def echo(message: Message) -> Any:
        return message.payload

    b.on("echo", echo)
    assert await a.request("b", "echo", "alive") == "alive"


async def test_events_from_one_sender_arrive_in_order(redis_url: str, connect: Connect) -> None:
    a, b, c = [await connect(redis_url, node) for node in "abc"]
    received: dict[str, list[int]] = {"a": [], "c": []}

    async def record(message: Message) -> None:
        await asyncio.sleep(random.choice([0, 0, 0.001]))  # handlers that take turns
        received[message.sender].append(message.payload)

    b.on("seq", record)

    async def send_all(sender: Bus) -> None:
        for n in range(300):
            await sender.send("b", "seq", n)

    await asyncio.gather(send_all(a), send_all(c))
    await until(lambda: len(received["a"]) + len(received["c"]) == 600)
    assert received == {"a": list(range(300)), "c": list(range(300))}


async def test_a_repeated_message_is_delivered_once(
    redis_url: str, connect: Connect, raw: Redis, prefix: str
) -> None:
    a, b = await connect(redis_url, "a"), await connect(redis_url, "b")
    inbox, asked = Inbox(), Inbox()

    async def count(message: Message) -> str:
        await asked(message)
        return "counted"

    b.on("note", inbox)
    b.on("count", count)
    # What a sends, as it was on the wire: a repeat of it is what a retried publish would be.
    sniffer = raw.pubsub()
    await sniffer.subscribe(f"{prefix}node:b")
    try:
        await a.send("b", "note", "once")
        assert await a.request("b", "count") == "counted"
        wire: list[bytes] = []
        while len(wire) < 2:
            item = await sniffer.get_message(timeout=WAIT)
            assert item is not None
            if item["type"] == "message":
                wire.append(item["data"])
    finally:
        await sniffer.aclose()  # type: ignore[no-untyped-call]

    for data in wire * 3:
        await raw.publish(f"{prefix}node:b", data)

    await settled(a, "b", inbox)
    assert inbox.payloads == ["once"]
    assert len(asked.messages) == 1
    assert len({message.id for message in [*inbox.messages, *asked.messages]}) == 2


async def test_bad_arguments_are_refused_and_nothing_is_sent(
    redis_url: str, connect: Connect
) -> None:
    a, b = await connect(redis_url, "a"), await connect(redis_url, "b")
    inbox = Inbox()
    b.on("note", inbox)

    with pytest.raises(InvalidArgumentError, match=r"^payload: must be JSON-serialisable"):
        await a.send("b", "note", {"when": time})
    with pytest.raises(InvalidArgumentError, match=r"^payload: must be JSON-serialisable"):
        await a.broadcast("note", float("nan"))
    with pytest.raises(InvalidArgumentError, match=r"^payload: must be JSON-serialisable"):
        await a.request("b", "note", {1j})
    with pytest.raises(InvalidArgumentError, match=r"^kind: must not be empty"):
        await a.send("b", "")
    with pytest.raises(InvalidArgumentError, match=r"^node_id: must not be empty"):
        await a.request("", "note")
    for timeout in (0, -1, math.inf, math.nan):
        with pytest.raises(InvalidArgumentError, match=r"^timeout: must be a positive number"):
            await a.request("b", "note", timeout=timeout)
    with pytest.raises(InvalidArgumentError, match=r"^kind: 'note' has a handler already"):
        b.on("note", Inbox())
    await settled(a, "b", inbox)
    assert inbox.messages == []

    with pytest.raises(InvalidArgumentError, match=r"^bus_url: 'http://x' is not a bus URL"):
        bus_from_url("http://x", node_id="a")
    with pytest.raises(InvalidArgumentError, match=r"^bus_url: .*not a bus URL .*unix://"):
        bus_from_url("127.0.0.1:6379", node_id="a")
    with pytest.raises(InvalidArgumentError, match=r"^bus_url: "):
        bus_from_url("redis://127.0.0.1:port/0", node_id="a")
    with pytest.raises(InvalidArgumentError, match=r"^node_id: must not be empty"):
        bus_from_url(redis_url, node_id="")


async def test_lifecycle(redis_url: str, prefix: str) -> None:
    def tasks_of(bus: Bus) -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name().startswith(f"bus {bus.node_id}:")]

    a = bus_from_url(redis_url, node_id="a", channel_prefix=prefix)
    assert (a.healthy, a.fault()) == (False, "the bus is not connected")
    with pytest.raises(BusUnavailableError, match="the bus is not connected"):
        await a.broadcast("note")

    async with a, bus_from_url(redis_url, node_id="b", channel_prefix=prefix) as b:
        assert (a.healthy, a.fault()) == (True, None)
        assert len(tasks_of(a)) == 2
        await a.connect()  # again: nothing changes
        assert len(tasks_of(a)) == 2
        started = asyncio.Event()

        async def hang(message: Message) -> None:
            started.set()
            await asyncio.Event().wait()

        b.on("hang", hang)
        waiting = asyncio.create_task(a.request("b", "hang", timeout=WAIT * 3))
        await asyncio.wait_for(started.wait(), WAIT)
        closed = time.monotonic()
        await a.close()
        with pytest.raises(BusUnavailableError, match="the bus was closed"):
            await waiting
        assert time.monotonic() - closed < FAST
        assert tasks_of(a) == []
    assert tasks_of(b) == []  # its handler task too

    assert (a.healthy, a.fault()) == (False, "the bus is closed")
    with pytest.raises(BusUnavailableError, match="the bus is closed"):
        await a.send("b", "note")
    await a.close()  # again: nothing happens
    with pytest.raises(BusUnavailableError, match="the bus is closed"):
        await a.connect()


async def test_connecting_to_no_redis_fails_at_once_and_hides_the_password(prefix: str) -> None:
    url = f"redis://user:secret@{HOST}:{free_port()}/0"
    bus = bus_from_url(url, node_id="a", channel_prefix=prefix)
    started = time.monotonic()
    with pytest.raises(BusUnavailableError) as refused:
        await bus.connect()
    assert time.monotonic() - started < FAST
    assert f"the bus at redis://user:***@{HOST}:" in str(refused.value)
    assert "secret" not in str(refused.value)
    assert bus.fault() == "the bus is not connected"
    await bus.close()


async def test_a_unix_socket_bus(redis_server: RedisServer, connect: Connect) -> None:
    a = await connect(redis_server.unix_url, "a")
    b = await connect(redis_server.unix_url, "b")

    async def echo(message: Message) -> Any:
        return message.payload

    b.on("echo", echo)
    assert await a.request("b", "echo", [1, "two"]) == [1, "two"]


def test_the_bus_imports_redis_only_when_a_redis_url_is_used() -> None:
    script = """
import sys
from registry.cluster import bus_from_url
from registry.errors import InvalidArgumentError
assert not any(name == "redis" or name.startswith("redis.") for name in sys.modules)
sys.modules["redis"] = None  # as if redis-py were not installed
try:
    bus_from_url("redis://127.0.0.1:6379/0", node_id="a")
except InvalidArgumentError as exc:
    print(exc)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    refusal = done.stdout.strip()
    assert refusal.startswith("bus_url: a redis:// bus needs the module 'redis")
    assert refusal.endswith(": pip install 'agent-fleet-registry[cluster]'")


def test_the_wire_format_is_the_documented_one() -> None:
    message = Message("ab" * 16, "a", "request", "add", {"x": 1}, timeout=2.5)
    assert json.loads(encode(message)) == {
        "id": "ab" * 16,
        "sender": "a",
        "type": "request",
        "kind": "add",
        "payload": {"x": 1},
        "timeout": 2.5,
    }
