"""Round trip of a request over the bus, on a loopback Redis.

Run from the repository root::

    python -m bench.bus                   # 1,000 requests
    python -m bench.bus --requests 200    # a short smoke run

Two buses in this one process, nodes ``a`` and ``b``, on the Redis at ``--redis-url`` (default
``$REGISTRY_TEST_REDIS_URL`` or ``redis://127.0.0.1:6379/0``), on channels of the run's own.
``a`` asks ``b`` an ``echo`` request with a small payload, one request at a time, after 100
warm-up requests: each round trip is two PUBLISHes, two deliveries, and the encoding and
decoding of both messages. The baseline is redis-py's own PING round trip on the same Redis,
measured in the same loop, one PING before each request. Both buses share this process's event
loop (so one core); Redis and the benchmark share the machine's cores with whatever else runs
(the load average is in the notes). Progress goes to stderr, the markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
import uuid
from importlib.metadata import version
from typing import Any

from redis.asyncio import Redis

from bench.report import percentile, progress_printer, table
from registry.cluster import Message, bus_from_url

DEFAULT_REDIS_URL = os.environ.get("REGISTRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WARM_UP = 100
PAYLOAD = {"client_id": "dev-1", "task_name": "task-1", "status": "ok"}

progress = progress_printer("bench.bus")


async def echo(message: Message) -> Any:
    return message.payload


async def measure(url: str, requests: int) -> tuple[list[float], list[float]]:
    """Round trips in seconds: of bus requests, and of PINGs."""
    prefix = f"registry-bench:{uuid.uuid4().hex}:"
    client = Redis.from_url(url)
    bus_a = bus_from_url(url, node_id="a", channel_prefix=prefix)
    bus_b = bus_from_url(url, node_id="b", channel_prefix=prefix)
    bus_b.on("echo", echo)
    trips: list[float] = []
    pings: list[float] = []
    try:
        async with bus_a, bus_b:
            for n in range(WARM_UP + requests):
                started = time.perf_counter()
                await client.ping()
                pinged = time.perf_counter()
                answer = await bus_a.request("b", "echo", PAYLOAD)
                done = time.perf_counter()
                assert answer == PAYLOAD
                if n >= WARM_UP:
                    pings.append(pinged - started)
                    trips.append(done - pinged)
    finally:
        await client.aclose()
    return trips, pings


def report(trips: list[float], pings: list[float], load: float) -> str:
    def us(seconds: float) -> str:
        return f"{seconds * 1e6:,.0f} µs"

    rows = []
    for name, fraction in (("p50", 0.50), ("p99", 0.99)):
        trip, ping = percentile(trips, fraction), percentile(pings, fraction)
        rows.append(
            [f"request round trip, {name}", us(trip), f"PING {us(ping)}", f"{trip / ping:.1f}x"]
        )
    notes = (
        f"{len(trips):,} sequential requests after {WARM_UP} warm-up ones; "
        f"Python {platform.python_version()}, redis-py {version('redis')}, "
        f"load average {load:.2f} before the run"
    )
    return table(["Measure", "Bus", "Compared with", "Ratio"], rows) + f"\n\n{notes}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bus", description=__doc__)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--requests", type=int, default=1_000)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    progress(f"{args.requests:,} requests over {args.redis_url}")
    trips, pings = asyncio.run(measure(args.redis_url, args.requests))
    print(report(trips, pings, load))


if __name__ == "__main__":
    main()
