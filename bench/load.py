"""Load harness: a fleet of devices and constellations with churn against ``registry serve``,
then a reconciliation of what the clients saw with what the database recorded.

Run from the repository root::

    python -m bench.load                 # 5,000 devices, 100 constellations, 5 min, 10 % churn
    python -m bench.load --quick         # 300 devices, 10 constellations, 1 min
    python -m bench.load --devices 2000 --minutes 2 --churn 0.2
    python -m bench.load --quick --churn 0.5 --command-delay 3   # sessions cut by churn
    python -m bench.load --trace-gc      # also log the server's full garbage collections
    python -m bench.load --database-url postgresql+asyncpg://user:pw@127.0.0.1/db

The server is ``registry serve --no-auth`` on 127.0.0.1 as a subprocess, on a fresh SQLite file in
a temporary directory (or on ``--database-url``, after ``registry db upgrade``; rows are told
apart by a per-run client id prefix, so a database that is not empty works too). The clients
run in separate worker processes (:mod:`bench.load_client`) over real WebSockets; the clients
and the server share the machine's cores, so on a small machine the clients' CPU competes with
the server's.

Phases: ramp (every client registers once), steady (``--minutes``: heartbeats, sessions from
every constellation to its device, churn), drain (in-flight sessions end, churned clients are
back), close (every client closes cleanly), then the server is stopped with SIGTERM (graceful)
and the database is reconciled with the clients' tallies. ``GET /metrics`` (open with
``--no-auth``) and ``/proc`` are sampled every second meanwhile; how long a scrape takes, the
client processes' own event-loop lag and (``--trace-gc``) the server's full collections tell
where a latency tail comes from. Every wait is bounded; the server
is killed if it does not stop in time.

The tables go to stdout (markdown), progress to stderr. Exit status 0 when every reconciliation
check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import re
import secrets
import signal
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bench.client import CLOSE, GONE, Workers, raise_fd_limit
from bench.load_client import (
    UNKNOWN_CLOSE,
    ClientTally,
    Drained,
    Final,
    Progress,
    RampDone,
    Start,
    WorkerJob,
    split_clients,
    work,
)
from bench.report import ms, percentile, progress_printer, table
from bench.server_procs import (
    MeasuredServer,
    machine_busy_seconds,
    proc_status_kib,
    start_registry,
)
from registry.store import models
from registry.store.dialect import create_engine
from tests.server_process import HOST

#: ``python -c`` bootstrap for ``--trace-gc``: ``registry serve`` unchanged (the same CLI
#: entry point), plus a gc callback appending each full collection (and any collection over
#: 10 ms) to the file named by the first argument: "wall-clock generation seconds".
GC_TRACE_BOOTSTRAP = """
import gc, sys, time
path = sys.argv.pop(1)
started = [0.0]
def trace(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
        return
    seconds = time.perf_counter() - started[0]
    if info["generation"] == 2 or seconds > 0.01:
        with open(path, "a") as out:
            out.write(f"{time.time():.3f} {info['generation']} {seconds:.6f}\\n")
gc.callbacks.append(trace)
sys.argv[0] = "registry"
from registry.cli import main
main()
"""
STOP_TIMEOUT = 60.0
SETTLE_TIMEOUT = 60.0
FINAL_STATES = ("completed", "failed", "cancelled")
REGISTRATION_GOAL_MS = 100.0


@dataclass(frozen=True, slots=True)
class Config:
    devices: int = 5_000
    constellations: int = 100
    minutes: float = 5.0
    churn: float = 0.10
    workers: int = 2
    heartbeat_interval: float = 30.0
    task_interval: float = 5.0
    abrupt_fraction: float = 0.5
    reconnect_delay: float = 1.0
    command_delay: float = 0.0
    ramp_concurrency: int = 50
    compression: bool = True
    timeout: float = 30.0
    session_timeout: float = 60.0
    ramp_timeout: float = 300.0
    database_url: str | None = None
    log_level: str = "warning"
    sample_interval: float = 1.0
    trace_gc: bool = False
    label: str = "Full run"

    @property
    def clients(self) -> int:
        return self.devices + self.constellations

    @property
    def steady_seconds(self) -> float:
        return self.minutes * 60.0

    @property
    def drain_timeout(self) -> float:
        return self.session_timeout + self.timeout


QUICK = Config(devices=300, constellations=10, minutes=1.0)


progress = progress_printer("bench.load")


# -- the server ----------------------------------------------------------------------------


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(port: int) -> dict[str, float] | None:
    """``GET /metrics`` as ``{"name{labels}": value}``, or None if it failed."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def online_total(metrics: dict[str, float]) -> int:
    return int(sum(v for k, v in metrics.items() if k.startswith("registry_online_clients{")))


# -- sampling ------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    at: float
    phase: str
    held: int  # clients online as the workers see it
    online: int | None  # as the server's /metrics sees it
    depth: int | None  # registry_journal_depth
    rss_kib: int | None
    scrape_seconds: float  # how long GET /metrics took: a probe of the server's event loop


@dataclass(slots=True)
class Monitor:
    server: MeasuredServer
    interval: float = 1.0
    started: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    scrape_failures: int = 0
    _next: float = 0.0
    _next_line: float = 0.0

    def sample(self, phase: str, held: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        metrics = scrape(self.server.port)
        scrape_seconds = time.monotonic() - now
        if metrics is None:
            self.scrape_failures += 1
        else:
            self.metrics = metrics
        online = None if metrics is None else online_total(metrics)
        depth = None
        if metrics is not None and "registry_journal_depth" in metrics:
            depth = int(metrics["registry_journal_depth"])
        rss = proc_status_kib(self.server.pid, "VmRSS")
        self.samples.append(
            Sample(now - self.started, phase, held, online, depth, rss, scrape_seconds)
        )
        if now >= self._next_line:
            self._next_line = now + 10.0
            progress(
                f"{phase}: held {held}, server online {online}, journal depth {depth}, "
                f"RSS {0 if rss is None else rss / 1024:.0f} MiB"
            )

    def of(self, phases: Iterable[str]) -> list[Sample]:
        wanted = set(phases)
        return [sample for sample in self.samples if sample.phase in wanted]


# -- the worker processes ------------------------------------------------------------------


class LoadWorkers(Workers[WorkerJob]):
    """The client worker processes (:mod:`bench.load_client`) and what they reported."""

    def __init__(self, jobs: Sequence[WorkerJob]) -> None:
        super().__init__(work, jobs, reap_timeout=10)
        self.progress: dict[int, Progress] = {}
        self.received: dict[type, dict[int, Any]] = {}
        self._ended: set[int] = set()

    @property
    def held(self) -> int:
        return sum(p.devices_online + p.constellations_online for p in self.progress.values())

    def _open_pipes(self) -> list[Connection]:
        return [pipe for index, pipe in enumerate(self.pipes) if index not in self._ended]

    def pump(
        self, kind: type, timeout: float, on_tick: Callable[[], None], check: Callable[[], None]
    ) -> dict[int, Any]:
        """Read every worker's messages until each has sent one of ``kind``; ``on_tick`` runs
        between reads (sampling), ``check`` raises if the run must stop (server gone)."""
        deadline = time.monotonic() + timeout
        got = self.received.setdefault(kind, {})
        while len(got) < len(self.pipes):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(self.pipes) - len(got)} worker(s) sent no {kind.__name__} "
                    f"within {timeout:.0f}s"
                )
            for pipe in wait(self._open_pipes(), timeout=0.2):
                assert isinstance(pipe, Connection)
                index = self.pipes.index(pipe)
                message = self.receive(index)
                if message is GONE:
                    self._ended.add(index)
                    if index in self.received.get(Final, {}):
                        continue  # done and gone
                    raise self.died(index)
                if isinstance(message, Progress):
                    self.progress[message.worker] = message
                else:
                    self.received.setdefault(type(message), {})[message.worker] = message
            on_tick()
            check()
        return got


# -- reconciliation ------------------------------------------------------------------------


@dataclass(slots=True)
class Database:
    """The run's rows, read after the server stopped."""

    connections: list[Any]
    sessions: dict[str, tuple[str, str | None]]  # session id -> (state, end reason)
    clients: int
    snapshots: dict[str, int]  # device id -> device info snapshots
    nodes: list[Any]


async def _read_database(url: str, prefix: str, since: float) -> Database:
    c, s, n = models.connections.c, models.sessions.c, models.nodes.c
    d = models.device_info_snapshots.c
    pattern = f"{prefix}%"
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            connections = (
                await connection.execute(
                    select(
                        c.client_id,
                        c.connection_id,
                        c.connected_at,
                        c.disconnected_at,
                        c.close_code,
                        c.close_reason,
                    ).where(c.client_id.like(pattern))
                )
            ).all()
            sessions = {
                row.session_id: (row.state, row.end_reason)
                for row in await connection.execute(
                    select(s.session_id, s.state, s.end_reason).where(s.session_id.like(pattern))
                )
            }
            clients = (
                await connection.execute(
                    select(func.count())
                    .select_from(models.clients)
                    .where(models.clients.c.client_id.like(pattern))
                )
            ).scalar_one()
            snapshots = {
                device_id: count
                for device_id, count in await connection.execute(
                    select(d.device_id, func.count())
                    .where(d.device_id.like(pattern))
                    .group_by(d.device_id)
                )
            }
            started = (
                await connection.execute(select(n.node_id, n.started_at, n.stopped_at))
            ).all()
            nodes = [row for row in started if row.started_at.timestamp() >= since - 5.0]
    finally:
        await engine.dispose()
    return Database(list(connections), sessions, clients, snapshots, nodes)


async def _open_rows(url: str, prefix: str) -> int:
    c = models.connections.c
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            count: int = (
                await connection.execute(
                    select(func.count()).where(
                        c.client_id.like(f"{prefix}%"), c.disconnected_at.is_(None)
                    )
                )
            ).scalar_one()
            return count
    finally:
        await engine.dispose()


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


def _examples(items: Iterable[str], limit: int = 3) -> str:
    listed = list(items)
    shown = ", ".join(listed[:limit])
    return f" (e.g. {shown})" if listed else ""


def reconcile(
    db: Database, tallies: dict[str, ClientTally], sessions: dict[str, str]
) -> list[Check]:
    checks: list[Check] = []
    rows_by_client: dict[str, list[Any]] = {}
    for row in db.connections:
        rows_by_client.setdefault(row.client_id, []).append(row)

    # Connections: one row per acknowledged registration, none lost, none duplicated.
    acked = sum(t.acked for t in tallies.values())
    ambiguous = sum(t.ambiguous for t in tallies.values())
    missing, extra = [], []
    for client_id, tally in tallies.items():
        rows = len(rows_by_client.get(client_id, []))
        if rows < tally.acked:
            missing.append(f"{client_id}: {rows} rows < {tally.acked} acks")
        elif rows > tally.acked + tally.ambiguous:
            extra.append(f"{client_id}: {rows} rows > {tally.acked}+{tally.ambiguous}")
    strangers = [client_id for client_id in rows_by_client if client_id not in tallies]
    checks.append(
        Check(
            "every acknowledged registration is in `connections` exactly once",
            not missing and not extra and not strangers,
            f"{acked:,} acks (+{ambiguous} unanswered registrations), "
            f"{len(db.connections):,} rows; clients with rows missing: {len(missing)}, "
            f"with extra rows: {len(extra)}{_examples(missing + extra)}",
        )
    )
    overlaps = []
    for client_id, client_rows in rows_by_client.items():
        ordered = sorted(client_rows, key=lambda row: row.connected_at)
        for earlier, later in itertools.pairwise(ordered):
            if earlier.disconnected_at is None or later.connected_at < earlier.disconnected_at:
                overlaps.append(client_id)
                break
    checks.append(
        Check(
            "no client id has two overlapping connection rows",
            not overlaps,
            f"{len(overlaps)} clients with overlaps{_examples(overlaps)}",
        )
    )
    still_open = [row.client_id for row in db.connections if row.disconnected_at is None]
    shutdown = [row.client_id for row in db.connections if row.close_reason == "server_shutdown"]
    checks.append(
        Check(
            "every disconnect recorded (no row open, none closed by the shutdown)",
            not still_open and not shutdown,
            f"open: {len(still_open)}, closed as server_shutdown: {len(shutdown)}"
            f"{_examples(still_open + shutdown)}",
        )
    )
    wrong_codes = []
    compared = 0
    for client_id, tally in tallies.items():
        if tally.ambiguous or UNKNOWN_CLOSE in tally.closes:
            continue
        compared += 1
        recorded = Counter(row.close_code for row in rows_by_client.get(client_id, []))
        if recorded != tally.closes:
            wrong_codes.append(f"{client_id}: db {dict(recorded)} vs seen {dict(tally.closes)}")
    db_codes = Counter(f"{r.close_code} {r.close_reason}" for r in db.connections)
    checks.append(
        Check(
            "close codes in `connections` match how each client left",
            not wrong_codes,
            f"{compared:,} clients compared, {len(wrong_codes)} differ{_examples(wrong_codes, 2)}; "
            f"rows by code: {dict(sorted(db_codes.items()))}",
        )
    )
    registered = sum(1 for tally in tallies.values() if tally.acked)
    devices = sum(1 for t in tallies.values() if t.acked and t.role == "device")
    several = [device for device, count in db.snapshots.items() if count != 1]
    checks.append(
        Check(
            "one `clients` row per client id, one device info snapshot per device",
            db.clients == registered and len(db.snapshots) == devices and not several,
            f"clients rows {db.clients:,} for {registered:,} registered ids; snapshots for "
            f"{len(db.snapshots):,} of {devices:,} devices, {len(several)} with more than one",
        )
    )

    # Sessions: every session started has a final state.
    outcomes = Counter(sessions.values())
    started = {sid for sid, outcome in sessions.items() if outcome != "unacked"}
    absent = sorted(sid for sid in started if sid not in db.sessions)
    not_final = sorted(sid for sid, (state, _) in db.sessions.items() if state not in FINAL_STATES)
    contradicting = sorted(
        f"{sid}: task_end {outcome}, db {db.sessions[sid][0]}"
        for sid, outcome in sessions.items()
        if outcome in ("completed", "failed")
        and sid in db.sessions
        and db.sessions[sid][0] != outcome
    )
    unknown = sorted(sid for sid in db.sessions if sid not in sessions)
    states = Counter(state for state, _ in db.sessions.values())
    checks.append(
        Check(
            "every session the constellations started has a row in a final state",
            not absent and not not_final and not unknown,
            f"{len(started):,} acked sessions, {len(db.sessions):,} rows "
            f"{dict(sorted(states.items()))}; missing {len(absent)}, not final "
            f"{len(not_final)}, never sent {len(unknown)}{_examples(absent + not_final + unknown)}",
        )
    )
    left = Counter(
        db.sessions[sid][0] if sid in db.sessions else "no row"
        for sid, outcome in sessions.items()
        if outcome in ("abandoned", "unacked")
    )
    checks.append(
        Check(
            "each task_end the constellations got matches the session row",
            not contradicting,
            f"client outcomes {dict(sorted(outcomes.items()))}; "
            f"{len(contradicting)} differ{_examples(contradicting)}; sessions whose owner left "
            f"first: {dict(sorted(left.items()))} in the db",
        )
    )
    stopped = [node for node in db.nodes if node.stopped_at is not None]
    checks.append(
        Check(
            "the server's node row was closed by a clean shutdown",
            len(db.nodes) == 1 and len(stopped) == 1,
            f"{len(db.nodes)} node run(s) of this run, {len(stopped)} stopped",
        )
    )
    return checks


# -- the run -------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    config: Config
    prefix: str
    ramp: dict[int, RampDone] = field(default_factory=dict)
    ramp_seconds: float = 0.0
    steady_started: float = 0.0
    steady_wall: tuple[float, float] = (0.0, 0.0)
    server_gc: list[tuple[float, int, float]] = field(default_factory=list)
    steady_seconds: float = 0.0
    drained: dict[int, Drained] = field(default_factory=dict)
    finals: dict[int, Final] = field(default_factory=dict)
    held_at_end: int | None = None
    online_at_end: int | None = None
    server_cpu: float = 0.0
    machine_cpu: float = 0.0
    peak_rss_kib: int | None = None
    open_rows_live: int | None = None
    settle: str = ""
    exit_code: int | None = None
    killed: bool = False
    stopped_cleanly: bool = False
    aborted: str | None = None
    monitor: Monitor | None = None
    checks: list[Check] = field(default_factory=list)
    log_tail: str = ""


def jobs_for(config: Config, url: str, prefix: str, deadline: float) -> list[WorkerJob]:
    devices = [f"{prefix}-d{index:05d}" for index in range(config.devices)]
    constellations = [f"{prefix}-c{index:04d}" for index in range(config.constellations)]
    shares = split_clients(devices, constellations, config.workers)
    return [
        WorkerJob(
            index=index,
            url=url,
            devices=share_devices,
            constellations=share_constellations,
            churn=config.churn,
            heartbeat_interval=config.heartbeat_interval,
            task_interval=config.task_interval,
            abrupt_fraction=config.abrupt_fraction,
            reconnect_delay=config.reconnect_delay,
            command_delay=config.command_delay,
            ramp_concurrency=config.ramp_concurrency,
            compression=config.compression,
            timeout=config.timeout,
            session_timeout=config.session_timeout,
            ramp_timeout=config.ramp_timeout,
            drain_timeout=config.drain_timeout,
            deadline=deadline,
            seed=index + 1,
        )
        for index, (share_devices, share_constellations) in enumerate(shares)
    ]


def drive(run: Run, server: MeasuredServer, workers: LoadWorkers) -> None:
    """Ramp, steady phase, drain, close; fills ``run`` as far as it gets."""
    config = run.config
    monitor = run.monitor
    assert monitor is not None
    phase = "ramp"

    def tick() -> None:
        monitor.sample(phase, workers.held)

    run.ramp = workers.pump(RampDone, config.ramp_timeout + 60, tick, server.check_alive)
    # The workers' own clock: from their first connection, not from process start-up.
    run.ramp_seconds = max(ramp.seconds for ramp in run.ramp.values())
    progress(
        f"ramp done in {run.ramp_seconds:.1f}s: "
        f"{sum(r.registered for r in run.ramp.values())} registered, "
        f"{sum(r.missing for r in run.ramp.values())} missing"
    )
    phase = "steady"
    cpu_started, machine_started = server.cpu_seconds(), machine_busy_seconds()
    run.steady_started = time.monotonic()
    run.steady_wall = (time.time(), time.time() + config.steady_seconds)
    workers.send_all(Start(time.time() + config.steady_seconds))
    steady_end = run.steady_started + config.steady_seconds

    def end_steady() -> None:
        nonlocal phase
        run.server_cpu = server.cpu_seconds() - cpu_started
        run.machine_cpu = machine_busy_seconds() - machine_started
        run.steady_seconds = time.monotonic() - run.steady_started
        run.held_at_end = workers.held
        metrics = scrape(server.port)
        run.online_at_end = None if metrics is None else online_total(metrics)
        phase = "drain"
        progress(f"steady phase over: held {run.held_at_end}; draining")

    def steady_tick() -> None:
        if phase == "steady" and time.monotonic() >= steady_end:
            end_steady()
        tick()

    run.drained = workers.pump(
        Drained, config.steady_seconds + config.drain_timeout + 60, steady_tick, server.check_alive
    )
    if phase == "steady":
        end_steady()
    progress(
        f"drained: {sum(d.in_flight for d in run.drained.values())} sessions in flight, "
        f"{sum(d.offline for d in run.drained.values())} clients offline"
    )
    phase = "close"
    workers.send_all(CLOSE)
    run.finals = workers.pump(Final, 3 * config.timeout + 60, tick, server.check_alive)
    progress("every client closed")


def settle(run: Run, server: MeasuredServer, url: str) -> None:
    """After the clients left: wait for the server to see nobody online and an empty journal,
    then count the run's open connection rows while it still runs."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    metrics: dict[str, float] | None = None
    while time.monotonic() < deadline:
        metrics = scrape(server.port)
        if (
            metrics is not None
            and online_total(metrics) == 0
            and metrics.get("registry_journal_depth") == 0
        ):
            break
        time.sleep(0.5)
    if metrics is None:
        run.settle = "server did not answer /metrics"
    else:
        run.settle = (
            f"online {online_total(metrics)}, journal depth {metrics.get('registry_journal_depth')}"
        )
    run.open_rows_live = asyncio.run(_open_rows(url, run.prefix))


def execute(config: Config) -> Run:
    raise_fd_limit(2 * config.clients + 4096)
    prefix = "L" + secrets.token_hex(3)
    run = Run(config, prefix)
    since = time.time()
    with tempfile.TemporaryDirectory(prefix="registry-load-") as tmp:
        workdir = Path(tmp)
        gc_trace = workdir / "server-gc.log" if config.trace_gc else None
        entry = ["-m", "registry"]
        if gc_trace is not None:  # the same CLI, behind a bootstrap that traces collections
            entry = ["-c", GC_TRACE_BOOTSTRAP, str(gc_trace)]
        server = start_registry(
            workdir, config.log_level, database_url=config.database_url, entry=entry
        )
        url = server.database_url
        assert url is not None
        progress(f"server pid {server.pid} on port {server.port}; client ids {prefix}-*")
        run.monitor = Monitor(server, config.sample_interval)
        budget = config.ramp_timeout + config.steady_seconds + config.drain_timeout + 600
        jobs = jobs_for(config, server.ws_url, prefix, time.time() + budget)
        try:
            try:
                with LoadWorkers(jobs) as workers:
                    drive(run, server, workers)
            except Exception as exc:
                run.aborted = f"{type(exc).__name__}: {exc}"
                progress(f"run aborted: {run.aborted}")
            if server.process.poll() is None:
                settle(run, server, url)
                run.peak_rss_kib = proc_status_kib(server.pid, "VmHWM")
        finally:
            run.exit_code = server.halt(signal.SIGTERM, STOP_TIMEOUT)
            run.killed, run.stopped_cleanly = server.killed, server.stopped_cleanly
            run.log_tail = server.log_tail(15)
        progress(f"server stopped (exit code {run.exit_code}, killed: {run.killed})")
        if gc_trace is not None and gc_trace.exists():
            for line in gc_trace.read_text().splitlines():
                at, generation, seconds = line.split()
                run.server_gc.append((float(at), int(generation), float(seconds)))
        if run.finals and len(run.finals) == len(jobs):
            tallies = {k: v for final in run.finals.values() for k, v in final.clients.items()}
            sessions = {k: v for final in run.finals.values() for k, v in final.sessions.items()}
            database = asyncio.run(_read_database(url, prefix, since))
            run.checks = reconcile(database, tallies, sessions)
            if run.open_rows_live is not None:
                run.checks.insert(
                    3,
                    Check(
                        "no connection row open once all clients left (server still up)",
                        run.open_rows_live == 0,
                        f"{run.open_rows_live} open rows; server saw {run.settle}",
                    ),
                )
            run.checks.append(
                Check(
                    "the server stopped by itself on SIGTERM",
                    run.stopped_cleanly,
                    f"exit code {run.exit_code}, killed: {run.killed}",
                )
            )
    return run


# -- the report ----------------------------------------------------------------------------


def quantile_ms(values: Sequence[float], fraction: float) -> str:
    return "n/a" if not values else ms(percentile(values, fraction))


def p50_p99(values: Sequence[float]) -> str:
    return f"{quantile_ms(values, 0.50)} / {quantile_ms(values, 0.99)} (n={len(values):,})"


def rate(count: float, seconds: float) -> str:
    return "n/a" if seconds <= 0 else f"{count / seconds:,.1f}/s"


def merged(finals: Iterable[Final], get: Callable[[Final], Sequence[float]]) -> list[float]:
    return [value for final in finals for value in get(final)]


def report(run: Run) -> str:
    config = run.config
    finals = list(run.finals.values())
    monitor = run.monitor
    samples = monitor.samples if monitor else []
    steady = monitor.of(["steady"]) if monitor else []
    out: list[str] = [f"## {config.label}", ""]
    delay = config.reconnect_delay
    backend = "PostgreSQL" if config.database_url else "SQLite (fresh file, temp dir)"
    out.append(
        f"{config.devices:,} devices + {config.constellations:,} constellations in "
        f"{config.workers} client processes; steady phase {config.minutes:g} min; churn "
        f"{config.churn:.0%}/min ({config.abrupt_fraction:.0%} of churned connections aborted "
        f"without a close frame; offline {delay / 10:g}-{delay:g}s before reconnecting); "
        f"heartbeat every {config.heartbeat_interval:g}s; devices answer commands "
        f"{f'after 0-{config.command_delay:g}s' if config.command_delay else 'at once'}; "
        "one task per "
        f"constellation every ~{config.task_interval:g}s; store {backend}; "
        f"{os.cpu_count()} CPU cores shared by the server and the client processes."
    )
    out.append("")
    if run.aborted:
        out += [f"**Run aborted:** {run.aborted}", ""]

    ramp_registered = sum(r.registered for r in run.ramp.values())
    registrations_at: Counter[str] = Counter()
    round_trips: Counter[str] = Counter()
    for final in finals:
        registrations_at.update(final.registration_at)
        round_trips.update(final.round_trips)
    ramp_latency = merged(finals, lambda f: f.registration_latency.get("ramp", []))
    steady_latency = merged(finals, lambda f: f.registration_latency.get("steady", []))
    completed = merged(finals, lambda f: f.session_latency.get("completed", []))
    failed = merged(finals, lambda f: f.session_latency.get("failed", []))
    heartbeat = merged(finals, lambda f: f.heartbeat_latency)
    refused: Counter[str] = Counter()
    task_refusals: Counter[str] = Counter()
    server_closes: Counter[int] = Counter()
    ambiguous = connect_failed = 0
    for final in finals:
        task_refusals.update(final.task_refusals)
        server_closes.update(final.server_closes)
        for tally in final.clients.values():
            refused.update(tally.refused)
            ambiguous += tally.ambiguous
            connect_failed += tally.connect_failed
    outcomes = Counter(v for final in finals for v in final.sessions.values())
    held_peak = max((s.held for s in samples), default=0)
    online_values = [s.online for s in samples if s.online is not None]
    depths = [s.depth for s in samples if s.depth is not None]
    steady_depths = [s.depth for s in steady if s.depth is not None]
    rss_values = [s.rss_kib for s in samples if s.rss_kib is not None]
    metrics = monitor.metrics if monitor else {}
    commits = metrics.get("registry_commit_seconds_count", 0.0)
    commit_seconds = metrics.get("registry_commit_seconds_sum", 0.0)
    batch_ops = metrics.get("registry_commit_batch_size_sum", 0.0)
    steady_s = run.steady_seconds
    client_cpu = sum(final.cpu_seconds for final in finals)
    steady_client_cpu = sum(drained.steady_cpu for drained in run.drained.values())
    scrapes = [sample.scrape_seconds for sample in steady]
    lags = merged(finals, lambda f: f.loop_lag)
    client_gc = merged(finals, lambda f: f.gc_pauses)
    begin, end = run.steady_wall
    full = [sec for at, gen, sec in run.server_gc if gen == 2 and begin <= at <= end]
    server_gc = (
        f"{len(full)}, max {max(full, default=0) * 1000:.0f} ms, "
        f"total {sum(full):.1f}s in {steady_s:.0f}s"
        if config.trace_gc
        else "not traced (--trace-gc)"
    )

    def load(cpu_seconds: float) -> str:
        return f"{max(0.0, cpu_seconds) / steady_s:.2f}" if steady_s else "n/a"

    elapsed = samples[-1].at if samples else 0.0
    rows = [
        (
            "clients held, peak (client view / server /metrics)",
            f"{held_peak:,} / {max(online_values, default=0):,}",
        ),
        (
            "clients held at end of steady phase (client / server)",
            f"{run.held_at_end if run.held_at_end is not None else 'n/a'} / "
            f"{run.online_at_end if run.online_at_end is not None else 'n/a'}",
        ),
        (
            "ramp: clients registered / time / rate",
            f"{ramp_registered:,} of {config.clients:,} in {run.ramp_seconds:.1f}s = "
            f"{rate(ramp_registered, run.ramp_seconds)}",
        ),
        (
            "registrations/s in steady phase (churn reconnects)",
            f"{registrations_at['steady']:,} in {steady_s:.0f}s = "
            f"{rate(registrations_at['steady'], steady_s)}",
        ),
        (
            "registration latency p50 / p99, ramp "
            f"({config.ramp_concurrency * config.workers} in parallel)",
            p50_p99(ramp_latency),
        ),
        ("registration latency p50 / p99, steady phase", p50_p99(steady_latency)),
        (
            "registrations refused (no row expected)",
            ", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "0",
        ),
        ("registrations unanswered / connects failed", f"{ambiguous} / {connect_failed}"),
        (
            "churn disconnects: clean close / aborted",
            f"{sum(f.churn_clean for f in finals):,} / {sum(f.churn_abrupt for f in finals):,}",
        ),
        (
            "session round trips/s, steady phase (task -> task_end)",
            f"{round_trips['steady']:,} in {steady_s:.0f}s = "
            f"{rate(round_trips['steady'], steady_s)}",
        ),
        ("session round-trip latency p50 / p99, completed", p50_p99(completed)),
        ("session round-trip latency p50 / p99, failed (device left)", p50_p99(failed)),
        (
            "sessions by client-side outcome",
            ", ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items())) or "0",
        ),
        (
            "tasks refused (no session)",
            ", ".join(f"{k} {v}" for k, v in sorted(task_refusals.items())) or "0",
        ),
        (
            "commands received / command_results sent (devices)",
            f"{sum(f.commands for f in finals):,} / {sum(f.command_results for f in finals):,}",
        ),
        ("heartbeat round trip p50 / p99", p50_p99(heartbeat)),
        (
            "server RSS peak (VmHWM) / sampled max / at end",
            f"{(run.peak_rss_kib or 0) / 1024:,.0f} MiB / {max(rss_values, default=0) / 1024:,.0f} "
            f"MiB / {(rss_values[-1] if rss_values else 0) / 1024:,.0f} MiB",
        ),
        (
            "journal depth (/metrics, every 1 s): max / mean, steady phase max",
            f"{max(depths, default=0):,} / {sum(depths) / max(1, len(depths)):.1f}, "
            f"{max(steady_depths, default=0):,}",
        ),
        (
            "group commits: count / ops per commit / mean commit time",
            f"{commits:,.0f} / {batch_ops / max(1.0, commits):.1f} / "
            f"{commit_seconds / max(1.0, commits) * 1000:.1f} ms",
        ),
        (
            "CPU in steady phase, cores busy: server / our clients / other processes",
            f"{load(run.server_cpu)} / {load(steady_client_cpu)} / "
            f"{load(run.machine_cpu - run.server_cpu - steady_client_cpu)} "
            f"of {os.cpu_count()} cores",
        ),
        (
            "client processes CPU, whole run (cores busy)",
            f"{client_cpu:,.0f}s over {elapsed:.0f}s = {client_cpu / max(1.0, elapsed):.2f}",
        ),
        (
            "disconnects the server initiated (by code)",
            ", ".join(f"{k}: {v}" for k, v in sorted(server_closes.items())) or "0",
        ),
        (
            "GET /metrics duration p50 / p99 / max, steady (probe of the server loop)",
            f"{quantile_ms(scrapes, 0.5)} / {quantile_ms(scrapes, 0.99)} / "
            f"{max(scrapes, default=0) * 1000:.0f} ms"
            f" ({monitor.scrape_failures if monitor else 0} failed)",
        ),
        (
            "client event-loop lag p99 / max, steady (50 ms ticks)",
            f"{quantile_ms(lags, 0.99)} / {max(lags, default=0) * 1000:.0f} ms",
        ),
        (
            "full GC pauses, steady: client processes (after gc.freeze) / server",
            f"{len(client_gc)}, max {max(client_gc, default=0) * 1000:.0f} ms / {server_gc}",
        ),
    ]
    out += [table(["measure", "value"], rows), ""]
    errors = [error for final in finals for error in final.errors]
    if errors:
        out += ["Client-side errors (first few per worker):", ""]
        out += [f"- `{error}`" for error in errors]
        out.append("")

    out += ["### Reconciliation with the database (after SIGTERM)", ""]
    if run.checks:
        out.append(
            table(
                ["check", "result", "detail"],
                [(c.name, "PASS" if c.ok else "**FAIL**", c.detail) for c in run.checks],
            )
        )
    else:
        out.append("Not done: the clients' tallies are incomplete (see the abort above).")
    out.append("")

    all_checks = bool(run.checks) and all(c.ok for c in run.checks)
    p99_steady = percentile(steady_latency, 0.99) * 1000 if steady_latency else math.nan
    p99_ramp = percentile(ramp_latency, 0.99) * 1000 if ramp_latency else math.nan
    held_ok = held_peak >= 5_000 and (run.held_at_end or 0) >= 0.97 * 5_000
    churn_ok = config.churn >= 0.10 and config.minutes >= 5 and not run.aborted
    goals = [
        (
            "5,000 concurrent clients, 10 %/min churn, 5 minutes",
            f"peak {held_peak:,} held, {run.held_at_end} at end; churn {config.churn:.0%}/min "
            f"for {steady_s / 60:.1f} min",
            "yes" if held_ok and churn_ok else "no",
        ),
        (
            "zero lost or duplicated rows",
            "all checks pass" if all_checks else "see FAIL rows above",
            "yes" if all_checks else "no",
        ),
        (
            f"p99 registration < {REGISTRATION_GOAL_MS:g} ms",
            f"steady {p99_steady:.1f} ms; ramp {p99_ramp:.1f} ms",
            f"steady: {'yes' if p99_steady < REGISTRATION_GOAL_MS else 'no'}; "
            f"ramp burst: {'yes' if p99_ramp < REGISTRATION_GOAL_MS else 'no'}",
        ),
    ]
    out += ["### Goals", "", table(["goal", "measured", "met"], goals), ""]
    if run.aborted or not all_checks:
        out += ["Server log tail:", "", "```", run.log_tail, "```", ""]
    return "\n".join(out)


def parse(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--devices", type=int, help="devices (default 5000; --quick 300)")
    parser.add_argument("--constellations", type=int, help="constellations (default 100; 10)")
    parser.add_argument("--minutes", type=float, help="steady phase (default 5; --quick 1)")
    parser.add_argument(
        "--churn", type=float, default=0.10, help="fraction of clients reconnecting per minute"
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--workers", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--heartbeat-interval", type=float, default=30.0)
    parser.add_argument("--task-interval", type=float, default=5.0, help="per constellation")
    parser.add_argument(
        "--abrupt-fraction",
        type=float,
        default=0.5,
        help="of the churn disconnects, the fraction that abort the TCP connection",
    )
    parser.add_argument(
        "--reconnect-delay",
        type=float,
        default=1.0,
        help="a churned client is offline uniform(delay/10, delay) seconds (default 1)",
    )
    parser.add_argument(
        "--ramp-concurrency", type=int, default=50, help="registrations in flight per process"
    )
    parser.add_argument(
        "--command-delay",
        type=float,
        default=0.0,
        help="devices answer a command after uniform(0, delay) seconds (default 0: at once); "
        "longer sessions are more often cut by churn",
    )
    parser.add_argument("--no-compression", action="store_true", help="no permessage-deflate")
    parser.add_argument("--database-url", help="e.g. a PostgreSQL URL (default: fresh SQLite)")
    parser.add_argument("--log-level", default="warning", help="the server's log level")
    parser.add_argument(
        "--sample-interval", type=float, default=1.0, help="seconds between /metrics scrapes"
    )
    parser.add_argument(
        "--trace-gc",
        action="store_true",
        help="log the server's full garbage collections (gc callback in a -c bootstrap)",
    )
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Config()
    config = Config(
        devices=base.devices if args.devices is None else args.devices,
        constellations=base.constellations if args.constellations is None else args.constellations,
        minutes=base.minutes if args.minutes is None else args.minutes,
        churn=args.churn,
        workers=args.workers,
        heartbeat_interval=args.heartbeat_interval,
        task_interval=args.task_interval,
        abrupt_fraction=args.abrupt_fraction,
        reconnect_delay=args.reconnect_delay,
        command_delay=args.command_delay,
        ramp_concurrency=args.ramp_concurrency,
        compression=not args.no_compression,
        database_url=args.database_url,
        log_level=args.log_level,
        sample_interval=args.sample_interval,
        trace_gc=args.trace_gc,
        label="Quick run (--quick)" if args.quick else "Full run",
    )
    if config.devices < 1 or config.constellations < 0 or config.minutes <= 0:
        parser.error("--devices must be >= 1, --constellations >= 0, --minutes > 0")
    if config.constellations > config.devices:
        parser.error("each constellation needs a device of its own")
    if not 0 <= config.churn <= 1 or not 0 <= config.abrupt_fraction <= 1:
        parser.error("--churn and --abrupt-fraction are fractions in [0, 1]")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    config = parse(argv)
    run = execute(config)
    print(report(run), flush=True)
    return 0 if run.checks and all(check.ok for check in run.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
