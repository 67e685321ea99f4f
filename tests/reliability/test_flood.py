"""Flood control: a connection that sends frames faster than ``max_frames_per_second`` beyond
its ``frame_burst`` is closed with 4429 ``rate_limited``; everyone else is served meanwhile, and
traffic at heartbeat rates is never throttled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as sync_connect

from registry.server import closecodes
from registry.settings import Settings
from tests.support import WAIT, Clients, Server, closed_record

HEARTBEAT = json.dumps({"type": "heartbeat", "status": "ok"})


@dataclass
class Flood:
    """What a flooding client saw."""

    sent: int
    answers: list[str | bytes]
    code: int | None
    reason: str | None


def _flood(url: str, client_id: str, frame: str | bytes, *, limit: int = 200_000) -> Flood:
    """Register ``client_id``, then send ``frame`` as fast as possible until the server
    closes the connection (or ``limit`` frames, or ``WAIT`` seconds).

    A blocking client in a thread of its own, like a real flooder in another process: it does
    not take turns with the server on the event loop. It buffers what the server answers
    (``max_queue=None``) instead of pushing back, so the server is never slowed down by TCP
    backpressure and meets the flood at full speed."""
    with sync_connect(url, max_queue=None, open_timeout=WAIT, close_timeout=WAIT) as ws:
        ws.send(json.dumps({"type": "register", "status": "ok", "client_id": client_id}))
        assert json.loads(ws.recv(timeout=WAIT))["type"] == "heartbeat"
        sent = 0
        deadline = time.monotonic() + WAIT
        with contextlib.suppress(ConnectionClosed):
            while sent < limit and time.monotonic() < deadline:
                ws.send(frame)
                sent += 1
        answers: list[str | bytes] = []
        with contextlib.suppress(ConnectionClosed):
            while True:
                answers.append(ws.recv(timeout=WAIT))
        return Flood(sent, answers, ws.close_code, ws.close_reason)


def test_flood_control_defaults() -> None:
    fields = Settings.model_fields
    assert fields["max_frames_per_second"].default == 500
    assert fields["frame_burst"].default == 1000
    assert closecodes.RATE_LIMITED == 4429


async def test_flooding_client_is_closed_and_others_keep_being_served(
    server: Server, clients: Clients
) -> None:
    """Default limits: the flooder is closed with 4429 after about ``frame_burst`` frames,
    while a well-behaved client's heartbeat round trips go on during the flood."""
    good = await clients.device("dev-good")
    flood = asyncio.create_task(asyncio.to_thread(_flood, server.ws_url(), "dev-flood", HEARTBEAT))
    during: list[float] = []  # round trips of the heartbeats sent while the flood was on
    while not flood.done():
        started = time.monotonic()
        ack = await good.heartbeat()
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok"), ack
        during.append(time.monotonic() - started)
        await asyncio.sleep(0.005)
    outcome = await flood

    assert (outcome.code, outcome.reason) == (4429, "rate_limited")
    burst = server.settings.frame_burst
    assert outcome.sent > burst
    # The server answered the frames it accepted (the bucket's burst, less the registration,
    # plus what it refilled meanwhile), and then nothing more.
    assert all(json.loads(answer)["type"] == "heartbeat" for answer in outcome.answers)
    assert burst - 1 <= len(outcome.answers) < outcome.sent
    assert during, "no heartbeat round trip during the flood"
    assert max(during) < 2.0, during

    record = await closed_record(server, "dev-flood")
    assert (record.close_code, record.close_reason) == (4429, "rate_limited")
    # The well-behaved client is untouched: still online, still answered.
    assert server.registry.is_online("dev-good")
    assert not server.registry.is_online("dev-flood")
    ack = await good.heartbeat()
    assert (ack["type"], ack["status"]) == ("heartbeat", "ok")


@pytest.mark.parametrize(
    "frame",
    [b"\x00binary", "{not json", json.dumps({"type": "task_end", "status": "ok"})],
    ids=["binary", "bad-json", "ignored"],
)
async def test_every_kind_of_frame_counts(server: Server, frame: str | bytes) -> None:
    """Frames that get an error (binary, bad JSON) or no answer at all count too."""
    outcome = await asyncio.to_thread(_flood, server.ws_url(), "dev-f", frame)
    assert (outcome.code, outcome.reason) == (4429, "rate_limited")
    assert outcome.sent > server.settings.frame_burst
    record = await closed_record(server, "dev-f")
    assert (record.close_code, record.close_reason) == (4429, "rate_limited")


class TestTightLimits:
    """With a small bucket the limit is easy to reach, and still never hit at heartbeat rate."""

    RATE = 100.0
    BURST = 3

    @pytest.fixture
    def server_settings(self) -> dict[str, Any]:
        return {"max_frames_per_second": self.RATE, "frame_burst": self.BURST}

    async def test_heartbeat_rate_traffic_is_never_throttled(self, clients: Clients) -> None:
        """One frame per 20 ms against a refill of 100/s, well past the burst: each frame
        finds at least two fresh tokens (client and server share the event loop's clock, and
        the next frame leaves only after the previous ack and a 20 ms sleep)."""
        device = await clients.device("dev-steady")
        for _ in range(self.BURST * 10):
            ack = await device.heartbeat()
            assert (ack["type"], ack["status"]) == ("heartbeat", "ok"), ack
            await asyncio.sleep(0.02)
        # Other frames at that rate are answered too (an error echo here).
        for index in range(self.BURST * 3):
            await device.send(type="error", status="error", error=f"e{index}")
            assert (await device.recv())["error"] == f"e{index}"
            await asyncio.sleep(0.02)
        await device.nothing()
        assert device.ws.close_code is None

    async def test_a_burst_over_the_bucket_is_closed(
        self, server: Server, clients: Clients
    ) -> None:
        device = await clients.device("dev-burst")
        # The bucket refills at 100/s, so the frames must come faster than that: send them
        # in one go (no await between them reaches the server).
        for _ in range(self.BURST * 20):
            with contextlib.suppress(ConnectionClosed):
                await device.ws.send(HEARTBEAT)
        assert await device.closed() == (4429, "rate_limited")
        record = await closed_record(server, "dev-burst")
        assert (record.close_code, record.close_reason) == (4429, "rate_limited")
        # The id is free again at once: a well-behaved reconnect is accepted.
        again = await clients.device("dev-burst")
        ack = await again.heartbeat()
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok")
