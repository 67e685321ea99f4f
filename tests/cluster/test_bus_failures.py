"""The bus when Redis fails under it: a Redis server of the test's own is killed (SIGKILL) and
restarted on the same port, or frozen (SIGSTOP) and thawed, under two running buses.

Run: ``python -m pytest tests/cluster -p no:cacheprovider -q -s`` (``-s`` shows the measured
reconnection times).
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from registry.cluster import Bus, Message
from registry.cluster.message import encode
from registry.cluster.redis_bus import RECONNECT_MAX_SECONDS
from registry.errors import BusUnavailableError
from tests.cluster.conftest import FAST, Connect, Inbox, RedisServer, settled
from tests.support import WAIT, until

#: How long Redis stays down: long enough for a few reconnection attempts to fail (0.1 s, then
#: 0.2 s, 0.4 s, 0.8 s apart).
OUTAGE = 2.0

pytestmark = pytest.mark.timeout(180)


async def echo(message: Message) -> Any:
    return message.payload


async def assert_down_and_fast(a: Bus, b: Bus) -> None:
    """Both buses are down and say why; what they are asked to carry fails at once."""
    await until(lambda: not a.healthy and not b.healthy)
    fault = a.fault()
    assert fault is not None
    assert "is unreachable" in fault
    assert fault.endswith("; reconnecting")
    started = time.monotonic()
    for attempt in (
        a.request("b", "echo", 1, timeout=WAIT),
        a.send("b", "note", 1),
        b.broadcast("note", 1),
    ):
        with pytest.raises(BusUnavailableError, match="is unreachable"):
            await attempt
    assert time.monotonic() - started < FAST


async def test_redis_killed_and_restarted(
    redis_server: RedisServer, connect: Connect, prefix: str
) -> None:
    a, b = await connect(redis_server.url, "a"), await connect(redis_server.url, "b")
    inbox, holding = Inbox(), asyncio.Event()

    async def hold(message: Message) -> None:
        holding.set()
        await asyncio.Event().wait()

    b.on("note", inbox)
    b.on("echo", echo)
    b.on("hold", hold)
    for n in range(10):
        await a.send("b", "note", n)
    in_flight = asyncio.create_task(a.request("b", "hold", timeout=WAIT * 3))
    await asyncio.wait_for(holding.wait(), WAIT)

    redis_server.kill()
    killed = time.monotonic()
    with pytest.raises(BusUnavailableError, match=r"lost its connection .* before the answer came"):
        await in_flight
    assert time.monotonic() - killed < FAST
    await assert_down_and_fast(a, b)

    await asyncio.sleep(OUTAGE - (time.monotonic() - killed))  # an outage of some length
    await redis_server.start()
    restarted = time.monotonic()
    await until(lambda: a.healthy and b.healthy, wait=RECONNECT_MAX_SECONDS + WAIT)
    healthy = time.monotonic() - restarted
    assert await a.request("b", "echo", "back") == "back"
    working = time.monotonic() - restarted
    print(
        f"\nRedis down {restarted - killed:.2f}s; after its restart both buses healthy in "
        f"{healthy:.2f}s, a request answered in {working:.2f}s"
    )
    assert working <= RECONNECT_MAX_SECONDS + FAST

    for n in range(10, 20):
        await a.send("b", "note", n)
    # A message from before the outage, published again (as a retried publish would be).
    replay = Redis.from_url(redis_server.url)
    try:
        await replay.publish(f"{prefix}node:b", encode(inbox.messages[0]))
    finally:
        await replay.aclose()
    await settled(a, "b", inbox)
    assert inbox.payloads == list(range(20))  # nothing lost between live nodes, nothing twice


async def test_redis_frozen_and_thawed(redis_server: RedisServer, connect: Connect) -> None:
    """A server that stops answering without closing its connections (as behind a network
    that drops packets) is noticed by the PING of a quiet subscription, not by TCP."""
    options = {"timeout": 0.5, "ping_interval": 0.5}
    a = await connect(redis_server.url, "a", **options)
    b = await connect(redis_server.url, "b", **options)
    b.on("echo", echo)
    b.on("note", Inbox())
    assert await a.request("b", "echo", 1) == 1
    quiet_until = time.monotonic() + 3 * 0.5  # a quiet bus is pinged, and answers: healthy
    while time.monotonic() < quiet_until:
        assert a.healthy
        assert b.healthy
        await asyncio.sleep(0.05)

    redis_server.signal(signal.SIGSTOP)
    frozen = time.monotonic()
    with pytest.raises(BusUnavailableError, match="failed to publish: TimeoutError"):
        await a.request("b", "echo", 2, timeout=WAIT)
    assert time.monotonic() - frozen < 0.5 + FAST
    await assert_down_and_fast(a, b)
    noticed = time.monotonic() - frozen
    assert noticed < 2 * 0.5 + 0.5 + FAST  # two PING intervals and a read's granularity

    redis_server.signal(signal.SIGCONT)
    thawed = time.monotonic()
    await until(lambda: a.healthy and b.healthy, wait=RECONNECT_MAX_SECONDS + WAIT)
    assert await a.request("b", "echo", 3) == 3
    print(
        f"\nRedis frozen: noticed by both buses in {noticed:.2f}s; after the thaw a request "
        f"answered in {time.monotonic() - thawed:.2f}s"
    )
