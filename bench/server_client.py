"""Client processes of the server benchmark: the ``websockets`` asyncio client, one event loop
per process (:mod:`bench.client`), driven by the parent over its pipes.

Every worker runs one :class:`ClientJob` through the same steps:

1. set up: open and register ``connections`` connections (none for ``handshake`` jobs), then
   send :class:`Ready`;
2. except for ``idle`` jobs: receive a wall-clock start time, run the measured loop for
   ``duration`` seconds from then, send :class:`Measured`;
3. receive :data:`~bench.client.CLOSE`, close every connection still held, send
   :class:`Closed`.

Any exception is sent to the parent as :class:`~bench.client.Failed`. Every network operation
is bounded by ``ClientJob.timeout``, every wait on the parent by :data:`PARENT_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection

from bench.client import (
    CLOSE,
    Errors,
    Workers,
    heartbeat_frame,
    is_ack,
    open_websocket,
    register_frame,
)

Kind = Literal["handshake", "heartbeat", "idle"]

PARENT_TIMEOUT = 600.0
CLOSE_CONCURRENCY = 200
MAX_ERRORS = 5


@dataclass(frozen=True, slots=True)
class ClientJob:
    """What one client process does against ``url``."""

    kind: Kind
    url: str
    prefix: str  # client ids are ``<prefix>-<n>``: unique per process and run
    connections: int  # connectors (handshake) or connections held (heartbeat, idle)
    open_concurrency: int = 50  # connections being opened at once during set-up
    duration: float = 0.0
    system_info: bool = True
    compression: bool = True  # offer permessage-deflate, as the websockets default (and UFO)
    timeout: float = 60.0


@dataclass(slots=True)
class Ready:
    """Set-up done: ``opened`` registered connections held, wall-clock span of the set-up."""

    opened: int
    failed: int
    started: float
    finished: float
    errors: list[str]


@dataclass(slots=True)
class Measured:
    """The measured loop: operations completed inside the window and their latencies."""

    operations: int
    failed: int
    latencies: list[float]
    cpu_seconds: float
    errors: list[str]


@dataclass(slots=True)
class Closed:
    closed: int
    seconds: float


@dataclass(slots=True)
class _Tally:
    operations: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Errors = field(default_factory=lambda: Errors(MAX_ERRORS))

    def success(self, seconds: float) -> None:
        self.operations += 1
        self.latencies.append(seconds)

    def failure(self, exc: BaseException) -> None:
        self.errors.add(f"{type(exc).__name__}: {exc}")


# -- frames --------------------------------------------------------------------------------


def expect_ack(frame: str | bytes) -> None:
    """Raise unless ``frame`` is a ``heartbeat``/``ok`` ack."""
    if not is_ack(json.loads(frame)):
        raise RuntimeError(f"unexpected frame: {str(frame)[:200]}")


# -- connections ---------------------------------------------------------------------------


async def _register(job: ClientJob, client_id: str) -> ClientConnection:
    websocket = await open_websocket(job.url, compression=job.compression, wait=job.timeout)
    try:
        await websocket.send(register_frame(client_id, system_info=job.system_info))
        expect_ack(await websocket.recv())
    except BaseException:
        await websocket.close()
        raise
    return websocket


async def open_registered(job: ClientJob, client_id: str) -> ClientConnection:
    """Connect, send ``register`` and receive its ack, within ``job.timeout``."""
    async with asyncio.timeout(job.timeout):
        return await _register(job, client_id)


async def open_many(job: ClientJob) -> tuple[list[ClientConnection], _Tally]:
    """Open ``job.connections`` registered connections, ``job.open_concurrency`` at a time."""
    gate = asyncio.Semaphore(job.open_concurrency)
    tally = _Tally()

    async def one(index: int) -> ClientConnection | None:
        async with gate:
            started = time.perf_counter()
            try:
                websocket = await open_registered(job, f"{job.prefix}-{index}")
            except Exception as exc:
                tally.failure(exc)
                return None
            tally.success(time.perf_counter() - started)
            return websocket

    opened = await asyncio.gather(*(one(index) for index in range(job.connections)))
    return [websocket for websocket in opened if websocket is not None], tally


async def close_many(websockets: Sequence[ClientConnection], seconds_each: float) -> int:
    """Close every connection (normal closure), a bounded number at a time, each within
    ``seconds_each``; return how many closed cleanly."""
    gate = asyncio.Semaphore(CLOSE_CONCURRENCY)

    async def one(websocket: ClientConnection) -> bool:
        async with gate:
            try:
                async with asyncio.timeout(seconds_each):
                    await websocket.close()
            except Exception:
                return False
            return True

    return sum(await asyncio.gather(*(one(websocket) for websocket in websockets)))


# -- measured loops ------------------------------------------------------------------------


async def _sleep_until(wall_clock: float) -> None:
    await asyncio.sleep(max(0.0, wall_clock - time.time()))


async def handshake_loop(job: ClientJob, connector: int, end: float, tally: _Tally) -> None:
    """One connector: connect, register, receive the ack, close; again until ``end``.

    Only handshakes completed (closed) before ``end`` count."""
    number = 0
    while time.time() < end:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(job.timeout):
                websocket = await _register(job, f"{job.prefix}-{connector}-{number}")
                await websocket.close()
        except Exception as exc:
            tally.failure(exc)
            await asyncio.sleep(0.01)
        else:
            if time.time() <= end:
                tally.success(time.perf_counter() - started)
        number += 1


async def heartbeat_loop(
    job: ClientJob, websocket: ClientConnection, client_id: str, end: float, tally: _Tally
) -> None:
    """One connection: send a heartbeat, await its ack; again until ``end``."""
    frame = heartbeat_frame(client_id)
    while time.time() < end:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(job.timeout):
                await websocket.send(frame)
                expect_ack(await websocket.recv())
        except Exception as exc:
            tally.failure(exc)
            return
        if time.time() <= end:
            tally.success(time.perf_counter() - started)


async def measure(job: ClientJob, held: Sequence[ClientConnection], start_at: float) -> Measured:
    """Run the job's loop from ``start_at`` for ``job.duration`` seconds; the client CPU time is
    taken over exactly that window."""
    end = start_at + job.duration
    tally = _Tally()
    await _sleep_until(start_at)
    cpu_started = time.process_time()
    loops: list[Awaitable[None]]
    if job.kind == "handshake":
        loops = [handshake_loop(job, index, end, tally) for index in range(job.connections)]
    else:
        loops = [
            heartbeat_loop(job, websocket, f"{job.prefix}-{index}", end, tally)
            for index, websocket in enumerate(held)
        ]

    cpu_seconds = 0.0

    async def window() -> None:
        nonlocal cpu_seconds
        await _sleep_until(end)
        cpu_seconds = time.process_time() - cpu_started

    await asyncio.gather(window(), *loops)
    errors = tally.errors
    return Measured(tally.operations, errors.count, tally.latencies, cpu_seconds, errors.first)


# -- the worker process --------------------------------------------------------------------


def _receive(pipe: Connection, timeout: float) -> Any:
    if not pipe.poll(timeout):
        raise TimeoutError(f"no word from the benchmark for {timeout:.0f}s")
    return pipe.recv()


async def receive(pipe: Connection) -> Any:
    """The parent's next message (within :data:`PARENT_TIMEOUT`), without blocking the event
    loop: idle connections still answer the server's pings meanwhile."""
    return await asyncio.to_thread(_receive, pipe, PARENT_TIMEOUT)


async def work(job: ClientJob, pipe: Connection, outbox: Connection) -> None:
    """The worker's three steps (see the module docstring): orders come from ``pipe``."""
    started = time.time()
    held: list[ClientConnection] = []
    tally = _Tally()
    if job.kind != "handshake":
        held, tally = await open_many(job)
    outbox.send(Ready(len(held), tally.errors.count, started, time.time(), tally.errors.first))
    if job.kind != "idle":
        start_at = float(await receive(pipe))
        outbox.send(await measure(job, held, start_at))
    if await receive(pipe) != CLOSE:
        raise RuntimeError("expected the close command")
    closing = time.perf_counter()
    closed = await close_many(held, job.timeout)
    outbox.send(Closed(closed, time.perf_counter() - closing))


def client_group(jobs: Sequence[ClientJob]) -> Workers[ClientJob]:
    """One client process per job (a context manager that always reaps them)."""
    return Workers(work, jobs, reap_timeout=30)
