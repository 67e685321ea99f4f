"""Slow consumers: a client that registers and then never reads again is given up with 4410
``slow_consumer`` once a send to it has waited ``send_timeout`` (its record closed at once, the
TCP connection dropped by the kernel soon after); what is sent at it meanwhile is not buffered
without bound, the HTTP calls that could not deliver answer 404 within about ``send_timeout``
instead of hanging, and the other clients keep their round trips.

The stuck client is a raw TCP socket with a small receive buffer, driven by websockets'
sans-I/O ``ClientProtocol``: it reads the handshake response and the registration answer and
never calls ``recv`` again, so the kernel's buffers fill up and push back on the server (the
asyncio and sync clients of websockets read into a buffer of their own in the background and
would hide that). The server runs in this process (``tests.support.running_server``), so this
process's RSS is the server's memory.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import Event, State
from websockets.uri import parse_uri

from registry.server import closecodes, listen
from tests.support import (
    API_KEY,
    HOST,
    WAIT,
    Client,
    Clients,
    Server,
    closed_record,
    eventually,
    store,
    until,
)

#: Seconds a send may wait on a peer that does not read: short, to keep the module quick, and
#: well above a round trip on a loaded 2-core machine (up to about 1.2 s seen), so that a client
#: queued behind the stuck one (which waits at least this long) stands out from mere load.
SEND_TIMEOUT = 2.0
#: The ``request`` of each dispatch at the stuck client, and how much is sent in all.
PAYLOAD_BYTES = 256 * 1024
TOTAL_BYTES = 64 * 1024 * 1024
#: Dispatches in flight at once (the HTTP bodies in flight are memory the server may hold).
CONCURRENCY = 4
#: The stuck client's socket receive buffer (the kernel rounds it up, to a few KiB).
RCVBUF = 4096
#: The most a dispatch may take: a send waits ``send_timeout`` for the peer, then gives it up.
DISPATCH_BOUND = SEND_TIMEOUT + 1.0
#: When the kernel drops a connection whose data stays unacknowledged (``TCP_USER_TIMEOUT``,
#: :mod:`registry.server.listen`), with some slack for the zero-window probe timer.
KERNEL_DROP = listen.UNACKNOWLEDGED_SEND_TIMEOUTS * SEND_TIMEOUT + 5.0

STATUS = Path("/proc/self/status")
TCP_TABLE = Path("/proc/net/tcp")

pytestmark = pytest.mark.skipif(
    not (STATUS.exists() and TCP_TABLE.exists()), reason="needs /proc (Linux)"
)


@pytest.fixture
def server_settings() -> dict[str, Any]:
    """A short ``send_timeout`` (the default is 30 s)."""
    return {"send_timeout": SEND_TIMEOUT}


def _rss() -> int:
    """This process's resident set size in bytes (VmRSS)."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


# -- the stuck client ---------------------------------------------------------------------------


@dataclass
class StuckClient:
    """A device on a raw socket that reads its handshake and registration answer, then never
    reads again (until :meth:`drain`)."""

    sock: socket.socket
    protocol: ClientProtocol
    client_id: str
    events: list[Event] = field(default_factory=list)

    @classmethod
    async def register(cls, server: Server, client_id: str) -> StuckClient:
        """Connect (``SO_RCVBUF`` set before ``connect``, so the window stays small), do the
        WebSocket handshake and register as a device; check the ``heartbeat``/``ok`` answer."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(WAIT):
                await loop.sock_connect(sock, (HOST, server.port))
            stuck = cls(sock, ClientProtocol(parse_uri(server.ws_url()), max_size=None), client_id)
            stuck.protocol.send_request(stuck.protocol.connect())
            await stuck._flush()
            response = await stuck._next_event()
            assert isinstance(response, Response), response
            assert response.status_code == 101, response
            assert stuck.protocol.state is State.OPEN, stuck.protocol.handshake_exc
            register = {
                "type": "register",
                "status": "ok",
                "client_type": "device",
                "client_id": client_id,
                "metadata": {"platform": "linux"},
            }
            stuck.protocol.send_text(json.dumps(register).encode())
            await stuck._flush()
            answer = await stuck._next_event()
            assert isinstance(answer, Frame), answer
            assert answer.opcode is Opcode.TEXT, answer
            frame = json.loads(bytes(answer.data))
            assert (frame["type"], frame["status"]) == ("heartbeat", "ok"), frame
        except BaseException:
            sock.close()
            raise
        return stuck

    async def _flush(self) -> None:
        data = b"".join(self.protocol.data_to_send())
        if data:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _next_event(self) -> Event:
        """The next event the server's bytes make (reading only as much as that takes)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(WAIT):
            while not self.events:
                data = await loop.sock_recv(self.sock, 4096)
                if not data:
                    raise AssertionError("the server closed the connection")
                self.protocol.receive_data(data)
                self.events.extend(self.protocol.events_received())
        return self.events.pop(0)

    async def drain(self, wait: float = WAIT) -> tuple[int, Close | None]:
        """Read everything the server left in the pipe until it ends the connection (end of
        stream or reset); the bytes read and the close frame, if one came through. Times out
        (``TimeoutError``) if the server never ends the connection."""
        loop = asyncio.get_running_loop()
        received = 0
        async with asyncio.timeout(wait):
            while True:
                try:
                    data = await loop.sock_recv(self.sock, 1 << 16)
                except ConnectionResetError:
                    break
                if not data:
                    break
                received += len(data)
                self.protocol.receive_data(data)
                self.protocol.events_received()  # the frames themselves are not needed
        return received, self.protocol.close_rcvd

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def stuck(server: Server) -> AsyncIterator[StuckClient]:
    """A registered device ``dev-stuck`` that never reads; its socket is closed at teardown
    (before the server stops, which would otherwise wait for that connection)."""
    client = await StuckClient.register(server, "dev-stuck")
    try:
        yield client
    finally:
        client.close()


# -- sending at it ------------------------------------------------------------------------------


@dataclass
class Dispatch:
    """One ``POST /api/dispatch``: its status (None: no answer within ``WAIT``), its detail
    and how long it took."""

    status: int | None
    detail: str | None
    seconds: float


@dataclass
class Flood:
    """What ``TOTAL_BYTES`` of dispatches at one client did."""

    dispatches: list[Dispatch]
    seconds: float
    rss_before: int
    rss_peak: int
    rss_after: int

    @property
    def sent(self) -> int:
        return len(self.dispatches) * PAYLOAD_BYTES

    @property
    def delivered(self) -> int:
        """Bytes the server said it dispatched (handed to the connection)."""
        return sum(PAYLOAD_BYTES for item in self.dispatches if item.status == 200)

    @property
    def slowest(self) -> float:
        return max(item.seconds for item in self.dispatches)

    def describe(self) -> str:
        answers = sorted({(item.status, item.detail) for item in self.dispatches}, key=str)
        return (
            f"sent {_mib(self.sent)} in {len(self.dispatches)} dispatches over "
            f"{self.seconds:.2f}s, delivered {_mib(self.delivered)}; answers {answers}, slowest "
            f"{self.slowest:.2f}s; RSS {_mib(self.rss_before)} -> peak {_mib(self.rss_peak)}, "
            f"after {_mib(self.rss_after)}"
        )


def _body(client_id: str) -> bytes:
    return json.dumps({"client_id": client_id, "request": "x" * PAYLOAD_BYTES}).encode()


async def _post(http: httpx.AsyncClient, body: bytes) -> Dispatch:
    started = time.monotonic()
    try:
        answer = await http.post(
            "/api/dispatch", content=body, headers={"Content-Type": "application/json"}
        )
    except httpx.TimeoutException:
        return Dispatch(None, None, time.monotonic() - started)
    detail: str | None = None
    if answer.status_code != 200:
        try:
            detail = answer.json().get("detail")
        except ValueError:  # not JSON (a plain-text 500, say): keep the text for the report
            detail = answer.text[:200]
    return Dispatch(answer.status_code, detail, time.monotonic() - started)


async def _dispatch_all(http: httpx.AsyncClient, body: bytes, count: int) -> list[Dispatch]:
    """``count`` dispatches of ``body``, ``CONCURRENCY`` at a time."""
    queue = iter(range(count))
    outcomes: list[Dispatch] = []

    async def worker() -> None:
        for _ in queue:
            outcomes.append(await _post(http, body))

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcomes


async def _flood(server: Server, client_id: str) -> Flood:
    """Send ``TOTAL_BYTES`` in ``PAYLOAD_BYTES`` dispatches at ``client_id`` and watch this
    process's RSS meanwhile. The allocator is warmed up first with the same traffic at a client
    that is not online (answered 404 after the body is parsed), so the baseline already holds
    what ``CONCURRENCY`` requests in flight cost."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(
        base_url=server.http_url, headers={"X-API-Key": API_KEY}, timeout=WAIT, limits=limits
    ) as http:
        warm_up = await _dispatch_all(http, _body("nobody"), CONCURRENCY * 4)
        assert {item.status for item in warm_up} == {404}, warm_up
        body = _body(client_id)
        gc.collect()
        before = peak = _rss()
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, _rss())
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        try:
            dispatches = await _dispatch_all(http, body, TOTAL_BYTES // PAYLOAD_BYTES)
        finally:
            sampling = False
            await sampler
        seconds = time.monotonic() - started
        del body
    gc.collect()
    peak = max(peak, _rss())
    return Flood(dispatches, seconds, before, peak, _rss())


async def _online(server: Server) -> list[str]:
    async with server.http() as http:
        answer = await http.get("/api/clients")
    assert answer.status_code == 200, answer.text
    online: list[str] = answer.json()["online_clients"]
    return online


def _server_side_open(server_port: int, client_port: int) -> bool:
    """Whether this host still has the server's end of the TCP connection from
    ``client_port`` to ``server_port`` (``/proc/net/tcp``: ports in hex, IPv4)."""
    local, remote = f":{server_port:04X}", f":{client_port:04X}"
    for line in TCP_TABLE.read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(local) and fields[2].endswith(remote):
            return True
    return False


def _mib(size: float) -> str:
    return f"{size / 2**20:.1f} MiB"


# -- the tests ----------------------------------------------------------------------------------


async def test_stuck_client_is_closed_with_4410(
    server: Server, clients: Clients, stuck: StuckClient
) -> None:
    """Dispatches at a client that never reads: the server gives it up with 4410
    ``slow_consumer``. It is gone from ``/api/clients``, its connection row is closed with that
    code and reason, the server's end of the TCP connection is dropped while the client still
    reads nothing (instead of staying open for as long as the client keeps it), the client
    then finds it reset, and the id is free again for a well-behaved reconnect."""
    client_port = stuck.sock.getsockname()[1]
    assert _server_side_open(server.port, client_port)  # the probe sees the connection
    started = time.monotonic()
    flood = await _flood(server, stuck.client_id)
    print(flood.describe())
    try:
        await eventually(lambda: _online(server), lambda ids: stuck.client_id not in ids)
    except AssertionError as exc:
        peer = server.registry.get_client(stuck.client_id)
        decided = getattr(peer, "closed_by_server", None)
        raise AssertionError(
            f"{stuck.client_id} still online {time.monotonic() - started:.1f}s after the first "
            f"dispatch (the server's own close decision: {decided}); {flood.describe()}"
        ) from exc
    print(f"gone from /api/clients {time.monotonic() - started:.2f}s after the first dispatch")

    record = await closed_record(server, stuck.client_id)
    assert (record.close_code, record.close_reason) == (
        closecodes.SLOW_CONSUMER,
        "slow_consumer",
    ), record
    assert not server.registry.is_online(stuck.client_id)

    await until(lambda: not _server_side_open(server.port, client_port), wait=KERNEL_DROP)
    print(f"server end dropped {time.monotonic() - started:.2f}s after the first dispatch")
    drained, close = await stuck.drain()
    print(f"drained {_mib(drained)} after the close; close frame: {close}")
    if close is not None:
        assert (close.code, close.reason) == (closecodes.SLOW_CONSUMER, "slow_consumer")
    again = await clients.device(stuck.client_id)
    ack = await again.heartbeat()
    assert (ack["type"], ack["status"]) == ("heartbeat", "ok"), ack


async def test_what_is_sent_at_a_stuck_client_is_not_buffered(
    server: Server, stuck: StuckClient
) -> None:
    """64 MiB of dispatches at a client that never reads: the server hands it what the socket
    takes and no more; every dispatch answers within ``DISPATCH_BOUND`` (delivered: 200, not:
    404 ``Client not online``) instead of hanging, and this process's RSS (the server's
    included) grows by well under a quarter of what was sent, at its peak and after."""
    flood = await _flood(server, stuck.client_id)
    figures = flood.describe()
    print(figures)

    answers = {(item.status, item.detail) for item in flood.dispatches}
    assert answers <= {(200, None), (404, "Client not online")}, figures
    assert (404, "Client not online") in answers, figures
    assert flood.slowest < DISPATCH_BOUND, figures
    # A server that buffered what it cannot deliver would accept it all and grow by as much.
    assert flood.delivered < TOTAL_BYTES // 4, figures
    assert flood.rss_peak - flood.rss_before < TOTAL_BYTES // 4, figures
    assert flood.rss_after - flood.rss_before < TOTAL_BYTES // 4, figures


async def _round_trip(device: Client, constellation: Client, number: int) -> None:
    """Heartbeats from both, and a task from the constellation to the device: acknowledged,
    the device answers the command, both get ``task_end`` ``completed``."""
    for client in (device, constellation):
        ack = await client.heartbeat(client_id=client.client_id)
        assert (ack["type"], ack["status"]) == ("heartbeat", "ok"), ack
    session_id = f"job-{number}@{uuid.uuid4().hex[:8]}"
    await constellation.task(session_id, f"job-{number}", target_id=device.client_id)
    await device.answer_command(session_id)
    end = await constellation.recv_type("task_end")
    assert (end["status"], end["session_id"]) == ("completed", session_id), end
    assert (await device.recv_type("task_end"))["session_id"] == session_id


async def test_others_keep_their_round_trips_while_a_client_is_stuck(
    server: Server, clients: Clients, stuck: StuckClient
) -> None:
    """While the stuck client is flooded (until every dispatch at it has answered), another
    device and a constellation keep going: heartbeats answered and full task round trips (task,
    ack, command, command_results, task_end to both) completed, each within ``send_timeout``
    (a client queued behind the stuck one would wait at least that long)."""
    device = await clients.device("dev-ok")
    constellation = await clients.constellation("const-ok", target_id="dev-ok")
    await _round_trip(device, constellation, -1)  # the first session warms up its code paths
    flooding = asyncio.create_task(_flood(server, stuck.client_id))
    during: list[float] = []
    try:
        while not flooding.done() or len(during) < 3:
            started = time.monotonic()
            await _round_trip(device, constellation, len(during))
            during.append(time.monotonic() - started)
    finally:
        flood = await flooding
    summary = (
        f"{len(during)} round trips during the flood ({flood.describe()}): worst "
        f"{max(during) * 1000:.0f} ms, median {sorted(during)[len(during) // 2] * 1000:.0f} ms"
    )
    print(summary)

    # The flood did hit a client that does not read (some dispatches could not be delivered).
    assert any(item.status == 404 for item in flood.dispatches), summary
    assert max(during) < SEND_TIMEOUT, summary
    # The well-behaved clients are untouched: still online, their connections still open.
    assert {"dev-ok", "const-ok"} <= set(await _online(server))
    async with store(server.database_url) as history:
        for client_id in ("dev-ok", "const-ok"):
            rows = (await history.connections(client_id)).items
            assert [row.disconnected_at for row in rows] == [None], rows
    await _round_trip(device, constellation, len(during))
