"""Server benchmark: the registry's ``/ws`` against a bare FastAPI WebSocket endpoint.

Run from the repository root::

    python -m bench.server            # the full run (a few minutes)
    python -m bench.server --quick    # a short smoke run

Both servers run as subprocesses on 127.0.0.1 with the same uvicorn options: ``registry serve
--no-auth`` on a fresh SQLite file in a temporary directory, and :mod:`bench.server_bare`. The
clients are the ``websockets`` asyncio client in separate processes (:mod:`bench.server_client`).
Every ratio in the table comes from the same run. Measurements:

1. **Registration handshakes/s**: concurrent connectors each loop connect, send ``register``,
   receive the ack, close. The registry acks only once the registration is committed.
2. **Heartbeat round trips/s** over open registered connections: each connection sends a
   heartbeat and awaits its ack, in a loop.
3. **Memory per idle registered connection**: server RSS after opening N idle registered
   connections minus RSS before, divided by N; once with clients offering permessage-deflate
   (the ``websockets`` default, and so UFO's clients) and once without compression.
4. **10,000 idle registered connections** held by one registry process: time to open them,
   ``/api/clients`` count, server RSS; then all closed, and the ``connections`` table checked.

Throughput windows alternate between the two servers (bare, registry, bare, ...) to spread drift.
Server CPU time per operation is reported too: client and server share the machine's cores, so
when the server is not saturated the rate also measures the client, while CPU per operation
does not.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

from bench.client import CLOSE, raise_fd_limit
from bench.report import percentile, progress_printer
from bench.server_client import ClientJob, Measured, Ready, client_group
from bench.server_procs import (
    ConnectionRows,
    MeasuredServer,
    connection_rows,
    machine_busy_seconds,
    online_clients,
    start_bare,
    start_registry,
)

SETUP_TIMEOUT = 300.0
START_DELAY = 0.5
SETTLE_SECONDS = 2.0
DRAIN_TIMEOUT = 120.0
HANDSHAKE_GOAL = 0.80
HEARTBEAT_GOAL = 0.80
MEMORY_GOAL = 1.25


@dataclass(frozen=True, slots=True)
class Config:
    """How much of everything; :data:`QUICK` is the smoke-run variant."""

    handshake_connectors: int = 50
    heartbeat_connections: int = 100
    window_seconds: float = 5.0
    rounds: int = 3
    memory_connections: int = 2_000
    hold_connections: int = 10_000
    client_processes: int = 2
    hold_processes: int = 4
    open_concurrency: int = 50  # per client process
    system_info: bool = True
    log_level: str = "warning"
    label: str = "Full run"


QUICK = Config(
    window_seconds=1.5,
    rounds=1,
    memory_connections=300,
    hold_connections=1_000,
    label="Smoke run (--quick): sizes too small for representative numbers",
)


progress = progress_printer("bench.server")


def split(total: int, parts: int) -> list[int]:
    """``total`` as ``parts`` near-equal positive shares (fewer parts if total is small)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if index < total % parts else 0) for index in range(parts)]


def sleep_until(wall_clock: float) -> None:
    time.sleep(max(0.0, wall_clock - time.time()))


@contextmanager
def running(
    start: Callable[[Path, str], MeasuredServer], workdir: Path, log_level: str
) -> Iterator[MeasuredServer]:
    """A server subprocess for the duration of the block."""
    server = start(workdir, log_level)
    progress(f"{server.name} server pid {server.pid} on port {server.port}")
    try:
        yield server
    finally:
        server.halt()


# -- throughput ----------------------------------------------------------------------------


@dataclass(slots=True)
class Throughput:
    """Operations completed inside measurement windows against one server, summed."""

    operations: int = 0
    failed: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    machine_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.operations / self.seconds if self.seconds else 0.0

    @property
    def server_cpu_per_op(self) -> float:
        """Server CPU seconds (all threads) per completed operation."""
        return self.server_cpu / self.operations if self.operations else float("nan")

    @property
    def server_load(self) -> float:
        """Server CPU time over wall time: 1.0 is one core busy."""
        return self.server_cpu / self.seconds if self.seconds else 0.0

    @property
    def client_load(self) -> float:
        return self.client_cpu / self.seconds if self.seconds else 0.0

    @property
    def other_load(self) -> float:
        """CPU load of every other process of the machine meanwhile (not ours: a shared box)."""
        other = self.machine_cpu - self.server_cpu - self.client_cpu
        return max(0.0, other / self.seconds) if self.seconds else 0.0

    def add(
        self, measured: Sequence[Measured], seconds: float, server_cpu: float, machine_cpu: float
    ) -> None:
        self.seconds += seconds
        self.server_cpu += server_cpu
        self.machine_cpu += machine_cpu
        for part in measured:
            self.operations += part.operations
            self.failed += part.failed
            self.client_cpu += part.cpu_seconds
            self.latencies.extend(part.latencies)
            self.errors.extend(error for error in part.errors if error not in self.errors)


def throughput_jobs(
    kind: str, server: MeasuredServer, total: int, tag: str, config: Config
) -> list[ClientJob]:
    """``total`` connectors (handshake) or connections (heartbeat) spread over the client
    processes."""
    return [
        ClientJob(
            kind="handshake" if kind == "handshake" else "heartbeat",
            url=server.ws_url,
            prefix=f"{kind}-{tag}-p{index}",
            connections=share,
            open_concurrency=config.open_concurrency,
            duration=config.window_seconds,
            system_info=config.system_info,
        )
        for index, share in enumerate(split(total, config.client_processes))
    ]


def run_window(server: MeasuredServer, jobs: Sequence[ClientJob], into: Throughput) -> None:
    """One measurement window: set up, start every client at the same wall-clock time, read the
    server's CPU time at the window's start and end, collect, close."""
    duration = jobs[0].duration
    with client_group(jobs) as group:
        ready: list[Ready] = group.gather(SETUP_TIMEOUT)
        failed = sum(part.failed for part in ready)
        if failed:
            raise RuntimeError(f"{failed} connections failed to open: {ready[0].errors}")
        start_at = time.time() + START_DELAY
        group.send_all(start_at)
        sleep_until(start_at)
        cpu_started, machine_started = server.cpu_seconds(), machine_busy_seconds()
        sleep_until(start_at + duration)
        server_cpu = server.cpu_seconds() - cpu_started
        machine_cpu = machine_busy_seconds() - machine_started
        measured: list[Measured] = group.gather(duration + SETUP_TIMEOUT)
        group.send_all(CLOSE)
        group.gather(SETUP_TIMEOUT)
    into.add(measured, duration, server_cpu, machine_cpu)


def compare_throughput(
    kind: str, servers: Sequence[MeasuredServer], total: int, config: Config
) -> dict[str, Throughput]:
    """Alternate windows between the servers, ``config.rounds`` windows each."""
    results = {server.name: Throughput() for server in servers}
    for round_number in range(config.rounds):
        for server in servers:
            tag = f"{server.name}-r{round_number}"
            run_window(
                server, throughput_jobs(kind, server, total, tag, config), results[server.name]
            )
            server.check_alive()
            progress(f"{kind} {tag}: {results[server.name].rate:,.0f}/s so far")
    return results


# -- memory --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Memory:
    """Server RSS before and after opening ``connections`` idle registered connections."""

    connections: int
    rss_before: int
    rss_after: int
    open_seconds: float

    @property
    def per_connection(self) -> float:
        return (self.rss_after - self.rss_before) / self.connections


def idle_jobs(
    server: MeasuredServer,
    total: int,
    processes: int,
    tag: str,
    config: Config,
    compression: bool = True,
) -> list[ClientJob]:
    """``total`` idle registered connections spread over ``processes`` client processes."""
    return [
        ClientJob(
            kind="idle",
            url=server.ws_url,
            prefix=f"idle-{tag}-p{index}",
            connections=share,
            open_concurrency=config.open_concurrency,
            system_info=config.system_info,
            compression=compression,
        )
        for index, share in enumerate(split(total, processes))
    ]


@dataclass(frozen=True, slots=True)
class Held:
    opened: int
    failed: int
    open_seconds: float
    errors: list[str]


def held_summary(ready: Sequence[Ready]) -> Held:
    errors = [error for part in ready for error in part.errors]
    return Held(
        opened=sum(part.opened for part in ready),
        failed=sum(part.failed for part in ready),
        open_seconds=max(part.finished for part in ready) - min(part.started for part in ready),
        errors=errors[:5],
    )


def open_and_close(
    server: MeasuredServer, total: int, tag: str, config: Config, compression: bool
) -> None:
    """Warm-up: open ``total`` idle registered connections, then close them all."""
    jobs = idle_jobs(server, total, config.client_processes, tag, config, compression)
    with client_group(jobs) as group:
        group.gather(SETUP_TIMEOUT)
        group.send_all(CLOSE)
        group.gather(SETUP_TIMEOUT)


def measure_memory(server: MeasuredServer, config: Config, compression: bool) -> Memory:
    """RSS growth per idle registered connection, after a warm-up round of connections (so
    one-off allocations such as lazy imports and first-use caches are not counted)."""
    total = config.memory_connections
    warm_up = min(200, max(20, total // 10))
    open_and_close(server, warm_up, f"{server.name}-warm", config, compression)
    time.sleep(SETTLE_SECONDS)
    before = server.rss_bytes()
    tag = f"{server.name}-mem"
    jobs = idle_jobs(server, total, config.client_processes, tag, config, compression)
    with client_group(jobs) as group:
        held = held_summary(group.gather(SETUP_TIMEOUT))
        if held.opened != total:
            raise RuntimeError(f"opened {held.opened}/{total} connections: {held.errors}")
        time.sleep(SETTLE_SECONDS)
        after = server.rss_bytes()
        group.send_all(CLOSE)
        group.gather(SETUP_TIMEOUT)
    per_connection = (after - before) / total / 1024
    progress(f"memory {server.name} compression={compression}: {per_connection:.1f} KiB/conn")
    return Memory(total, before, after, held.open_seconds)


# -- 10,000 held connections ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hold:
    """One registry process holding ``target`` idle registered connections."""

    target: int
    held: Held
    listed: int
    rss: int
    rss_idle: int
    rows_while_open: ConnectionRows
    close_seconds: float
    drain_seconds: float
    listed_after_close: int
    rows_after_close: ConnectionRows

    @property
    def ok(self) -> bool:
        return (
            self.held.opened == self.target
            and self.listed == self.target
            and self.rows_after_close.total == self.target
            and self.rows_after_close.still_open == 0
            and self.listed_after_close == 0
        )


def wait_all_closed(database: Path, timeout: float = DRAIN_TIMEOUT) -> ConnectionRows:
    """Poll the database until no connection row is open (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    rows = connection_rows(database)
    while rows.still_open and time.monotonic() < deadline:
        time.sleep(0.2)
        rows = connection_rows(database)
    return rows


def measure_hold(workdir: Path, config: Config) -> Hold:
    """Open ``hold_connections`` idle registered connections from ``hold_processes`` client
    processes, check ``/api/clients`` and the DB, close them all, check the DB again."""
    target = config.hold_connections
    with running(start_registry, workdir, config.log_level) as server:
        assert server.database is not None
        rss_idle = server.rss_bytes()
        jobs = idle_jobs(server, target, config.hold_processes, "hold", config)
        with client_group(jobs) as group:
            held = held_summary(group.gather(SETUP_TIMEOUT))
            progress(f"hold: {held.opened:,} open in {held.open_seconds:.1f}s")
            listed = len(online_clients(server))
            rss = server.rss_bytes()
            rows_open = connection_rows(server.database)
            closing = time.perf_counter()
            group.send_all(CLOSE)
            group.gather(SETUP_TIMEOUT)
            close_seconds = time.perf_counter() - closing
        rows_closed = wait_all_closed(server.database)
        drain_seconds = time.perf_counter() - closing
        listed_after = len(online_clients(server))
        server.check_alive()
    return Hold(
        target,
        held,
        listed,
        rss,
        rss_idle,
        rows_open,
        close_seconds,
        drain_seconds,
        listed_after,
        rows_closed,
    )


# -- report --------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    config: Config
    fd_limits: tuple[int, int]
    handshakes: dict[str, Throughput]
    heartbeats: dict[str, Throughput]
    durable: ConnectionRows  # the registry's connections table after the throughput windows
    memory: dict[str, dict[str, Memory]]  # client compression -> server -> memory
    hold: Hold
    seconds: float


def verdict(met: bool) -> str:
    return "**yes**" if met else "**no**"


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def load(part: Throughput) -> str:
    return f"{part.server_load:.2f} / {part.client_load:.2f} / {part.other_load:.2f}"


def throughput_rows(label: str, results: dict[str, Throughput], goal: float) -> list[str]:
    """The rate (the goal as set), the server CPU per operation (the same goal read as CPU
    efficiency, which does not depend on who else uses the cores), loads and latencies."""
    ours, bare = results["registry"], results["bare"]
    ratio = ours.rate / bare.rate if bare.rate else 0.0
    efficiency = bare.server_cpu_per_op / ours.server_cpu_per_op
    return [
        f"| {label} | {ours.rate:,.0f}/s | {bare.rate:,.0f}/s | {ratio:.0%} | "
        f"≥ {goal:.0%} | {verdict(ratio >= goal)} |",
        f"| ↳ server CPU per operation (ratio: bare ÷ ours) | "
        f"{milliseconds(ours.server_cpu_per_op)} | {milliseconds(bare.server_cpu_per_op)} | "
        f"{efficiency:.0%} | ≥ {goal:.0%} | {verdict(efficiency >= goal)} |",
        f"| ↳ CPU load in cores (of {os.cpu_count()}): server / clients / other processes | "
        f"{load(ours)} | {load(bare)} | | | |",
        f"| ↳ latency p50 / p99 | {milliseconds(percentile(ours.latencies, 0.5))} / "
        f"{milliseconds(percentile(ours.latencies, 0.99))} | "
        f"{milliseconds(percentile(bare.latencies, 0.5))} / "
        f"{milliseconds(percentile(bare.latencies, 0.99))} | | | |",
    ]


def durable_row(results: Results) -> str:
    """Registrations counted above must all be in the registry's database."""
    counted = results.handshakes["registry"].operations + (
        results.config.rounds * results.config.heartbeat_connections
    )
    rows = results.durable
    return (
        f"| ↳ registry DB after the windows above | {rows.total:,} connection rows "
        f"(≥ {counted:,} registrations counted), {rows.still_open} left open | | | | |"
    )


def memory_rows(memory: dict[str, Memory], clients: str) -> list[str]:
    ours, bare = memory["registry"], memory["bare"]
    ratio = ours.per_connection / bare.per_connection
    return [
        f"| Memory per idle registered connection (N={ours.connections:,}, {clients}) | "
        f"{ours.per_connection / 1024:.1f} KiB | {bare.per_connection / 1024:.1f} KiB | "
        f"{ratio:.3f}x | ≤ {MEMORY_GOAL:.2f}x | {verdict(ratio <= MEMORY_GOAL)} |",
        f"| ↳ server RSS before → after | {ours.rss_before / 2**20:.0f} → "
        f"{ours.rss_after / 2**20:.0f} MiB | {bare.rss_before / 2**20:.0f} → "
        f"{bare.rss_after / 2**20:.0f} MiB | | | |",
    ]


def hold_rows(hold: Hold) -> list[str]:
    held = hold.held
    codes = ", ".join(
        f"{key}: {count:,}" for key, count in sorted(hold.rows_after_close.close_codes.items())
    )
    return [
        f"| {hold.target:,} idle registered connections, one server process | "
        f"{held.opened:,} opened in {held.open_seconds:.1f}s "
        f"({held.opened / held.open_seconds:,.0f}/s), {held.failed} failed | | | "
        f"all held and recorded | {verdict(hold.ok)} |",
        f"| ↳ `/api/clients` while open / after close | {hold.listed:,} / "
        f"{hold.listed_after_close:,} | | | | |",
        f"| ↳ server RSS idle → with {hold.target:,} open | {hold.rss_idle / 2**20:.0f} → "
        f"{hold.rss / 2**20:.0f} MiB ({(hold.rss - hold.rss_idle) / hold.target / 1024:.1f} "
        f"KiB/connection) | | | | |",
        f"| ↳ DB `connections` rows while open | {hold.rows_while_open.total:,} rows, "
        f"{hold.rows_while_open.still_open:,} open | | | | |",
        f"| ↳ DB after close | {hold.rows_after_close.total:,} rows, "
        f"{hold.rows_after_close.still_open:,} open ({codes}); clients closed in "
        f"{hold.close_seconds:.1f}s, all rows closed {hold.drain_seconds:.1f}s after the "
        f"first close | | | | |",
    ]


def environment_lines(results: Results) -> list[str]:
    """Two lines on the set-up the numbers come from."""
    config = results.config
    soft, hard = results.fd_limits
    frames = "with" if config.system_info else "without"
    return [
        f"{config.label}. Python {platform.python_version()}, uvicorn {version('uvicorn')}, "
        f"websockets {version('websockets')}; {os.cpu_count()} CPU cores shared by the servers, "
        f"the clients and whatever else runs on the machine; RLIMIT_NOFILE {soft}/{hard}; "
        f"server log level `{config.log_level}`; register frames {frames} "
        f"`metadata.system_info`.",
        f"Throughput: {config.rounds} alternating window(s) of {config.window_seconds:g}s per "
        f"server; {config.handshake_connectors} connectors / {config.heartbeat_connections} "
        f"connections over {config.client_processes} client processes (uvloop). Load = CPU "
        f"seconds per wall second (1.00 = one core). {config.hold_connections:,} held "
        f"connections: {config.hold_processes} client processes, {config.open_concurrency} "
        f"concurrent opens each. Whole run: {results.seconds:.0f}s.",
    ]


def render(results: Results) -> str:
    """The results as a markdown table (plus two lines on the set-up)."""
    lines = [
        "| Measurement | registry | bare FastAPI | ratio | goal | met |",
        "|---|---|---|---|---|---|",
        *throughput_rows(
            f"Registration handshakes/s ({results.config.handshake_connectors} concurrent)",
            results.handshakes,
            HANDSHAKE_GOAL,
        ),
        *throughput_rows(
            f"Heartbeat round trips/s ({results.config.heartbeat_connections} connections)",
            results.heartbeats,
            HEARTBEAT_GOAL,
        ),
        durable_row(results),
        *memory_rows(results.memory["deflate"], "clients offer permessage-deflate"),
        *memory_rows(results.memory["none"], "clients without compression"),
        *hold_rows(results.hold),
        "",
        *environment_lines(results),
    ]
    failures = [
        f"{name} {kind}: {part.failed} failed ({'; '.join(part.errors[:2])})"
        for kind, parts in (("handshakes", results.handshakes), ("heartbeats", results.heartbeats))
        for name, part in parts.items()
        if part.failed
    ]
    if failures:
        lines += ["", "Failures: " + "; ".join(failures)]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------


def run(config: Config, workdir: Path) -> Results:
    started = time.perf_counter()
    fd_limits = raise_fd_limit(config.hold_connections + 4096)
    with (
        running(start_bare, workdir, config.log_level) as bare,
        running(start_registry, workdir, config.log_level) as ours,
    ):
        servers = (bare, ours)
        handshakes = compare_throughput("handshake", servers, config.handshake_connectors, config)
        heartbeats = compare_throughput("heartbeat", servers, config.heartbeat_connections, config)
        assert ours.database is not None
        durable = wait_all_closed(ours.database)
    memory: dict[str, dict[str, Memory]] = {"deflate": {}, "none": {}}
    for variant, compression in (("deflate", True), ("none", False)):
        for start in (start_bare, start_registry):
            with running(start, workdir, config.log_level) as server:
                memory[variant][server.name] = measure_memory(server, config, compression)
    hold = measure_hold(workdir, config)
    return Results(
        config,
        fd_limits,
        handshakes,
        heartbeats,
        durable,
        memory,
        hold,
        time.perf_counter() - started,
    )


def parse_config(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--log-level", help="uvicorn log level of both servers (default warning)")
    parser.add_argument(
        "--no-system-info",
        action="store_true",
        help="register without metadata.system_info (no device-info snapshot per registration)",
    )
    args = parser.parse_args(argv)
    config = QUICK if args.quick else Config()
    if args.log_level:
        config = replace(config, log_level=args.log_level)
    if args.no_system_info:
        config = replace(config, system_info=False)
    return config


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    with tempfile.TemporaryDirectory(prefix="bench-server-") as directory:
        results = run(config, Path(directory))
    print(render(results))


if __name__ == "__main__":
    main()
