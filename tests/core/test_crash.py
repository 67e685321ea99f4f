"""Crash test: a child process runs a stream of mutations on a registry, reporting each one and
each completed ``flush()``; it is killed with SIGKILL mid-stream, and a registry reopened on the
same database must find exactly a prefix of the reported mutations (at least everything reported
flushed), no connection left open, the sessions interrupted and back in memory, and the
recovery in the audit trail.

The child is ``crash_child.py`` next to this file; its stdout protocol is described there.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from registry import Registry, SessionOwnershipError, SessionState
from registry.store import models
from registry.store.dialect import create_engine

CHILD = Path(__file__).with_name("crash_child.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
NODE_NAME = "crash-test-node"  # the child's; the same name marks the restart of that server
DEVICES = tuple(f"dev-{n}" for n in range(6))
CONSTELLATIONS = tuple(f"con-{n}" for n in range(3))
ALL_CLIENTS = (*DEVICES, *CONSTELLATIONS)
HEARTBEAT_INTERVAL = 0.1
ROUND_TIMEOUT = 30.0

Op = list[Any]
AuditKey = tuple[str, str | None, str | None]


@dataclass
class ChildRun:
    node_id: str
    ops: list[Op]
    flushed: int  # the first ``flushed`` ops were reported durable
    seconds: float  # from the registry's start to the kill


async def run_child_until_killed(
    url: str, seed: int, kill_after_flushes: int, workdir: Path
) -> ChildRun:
    """Start the child, let it report ``kill_after_flushes`` flushes, wait a random moment and
    SIGKILL it; return everything it reported."""
    rng = random.Random(seed)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
        ),
    }
    stderr_path = workdir / f"child-{seed}.stderr"
    lines: list[bytes] = []
    started = seconds = 0.0
    with stderr_path.open("wb") as stderr:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CHILD),
            url,
            str(seed),
            str(HEARTBEAT_INTERVAL),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=workdir,
            env=env,
        )
    assert child.stdout is not None
    try:
        async with asyncio.timeout(ROUND_TIMEOUT):
            flushes = 0
            while flushes < kill_after_flushes:
                line = await child.stdout.readline()
                if not line:
                    await child.wait()
                    pytest.fail(
                        f"the child ended (code {child.returncode}) before {kill_after_flushes} "
                        f"flushes:\n{stderr_path.read_text()}"
                    )
                lines.append(line)
                flushes += b'"flushed"' in line
                if b'"node"' in line:
                    started = time.monotonic()
            await asyncio.sleep(rng.uniform(0.0, 0.02))  # mid-stream: past the last flush
            child.send_signal(signal.SIGKILL)
            seconds = time.monotonic() - started
            lines.extend((await child.stdout.read()).splitlines(keepends=True))
            await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode == -signal.SIGKILL, stderr_path.read_text()
    node_id, ops, flushed = "", [], 0
    for line in lines:
        if not line.endswith(b"\n"):
            continue  # cut short by the kill (lines are written whole, so never in practice)
        document = json.loads(line)
        if "node" in document:
            node_id = document["node"]
        elif "op" in document:
            ops.append(document["op"])
        else:
            flushed = max(flushed, document["flushed"])
    assert node_id, "the child never reported its node id"
    return ChildRun(node_id, ops, flushed, seconds)


@dataclass
class Replay:
    """The durable state the first n reported mutations leave (before recovery)."""

    connections: dict[str, tuple[str, str, str, dict[str, Any], str | None]] = field(
        default_factory=dict
    )
    live: dict[str, str] = field(default_factory=dict)  # client id -> open connection id
    clients: dict[str, tuple[str, str, dict[str, Any]]] = field(default_factory=dict)
    sessions: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)
    links: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # open, bind order
    device_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    snapshots: int = 0
    audit: list[AuditKey] = field(default_factory=lambda: [("node_started", None, None)])

    def apply(self, op: Op) -> None:
        match op:
            case ["add", client_id, kind, platform, metadata, connection_id]:
                self.connections[connection_id] = (client_id, kind, platform, metadata, None)
                self.live[client_id] = connection_id
                self.clients[client_id] = (kind, platform, metadata)
                self.audit.append(("client_registered", client_id, None))
            case ["remove", client_id]:
                connection_id = self.live.pop(client_id)
                self.connections[connection_id] = (*self.connections[connection_id][:4], "removed")
                self.audit.append(("client_removed", client_id, None))
            case ["open", session_id, owner, executor, task]:
                self.sessions[session_id] = (owner, executor, task, "active")
                self.audit.append(("session_opened", owner, session_id))
                links = [("device", executor)]
                if owner != executor:
                    links.insert(0, ("constellation", owner))
                self.links[session_id] = links
                self.audit.extend(("session_bound", client, session_id) for _, client in links)
            case ["end", session_id, state]:
                owner, executor, task, _ = self.sessions[session_id]
                self.sessions[session_id] = (owner, executor, task, state)
                for _, client in self.links.pop(session_id):
                    self.audit.append(("session_unbound", client, session_id))
                self.audit.append(("session_ended", owner, session_id))
            case ["info", device_id, info]:
                if self.device_info.get(device_id) != info:
                    self.device_info[device_id] = info
                    self.snapshots += 1
                    self.audit.append(("device_info_changed", device_id, None))
            case _:
                raise AssertionError(f"unknown op {op!r}")

    def active_sessions(self) -> dict[str, tuple[str, str, str, str]]:
        return {sid: row for sid, row in self.sessions.items() if row[3] == "active"}

    def after_recovery(self) -> dict[str, Any]:
        """The tables as recovery must leave them: open connections closed, active sessions
        interrupted; nothing else changes."""
        return {
            "connections": {
                cid: (*row[:4], row[4] or "server_restart") for cid, row in self.connections.items()
            },
            "clients": self.clients,
            "sessions": {
                sid: (*row[:3], "interrupted" if row[3] == "active" else row[3])
                for sid, row in self.sessions.items()
            },
            "open_links": sorted(
                (sid, role, client) for sid, links in self.links.items() for role, client in links
            ),
            "device_info": self.device_info,
            "snapshots": self.snapshots,
            "audit_of_dead_run": self.audit,
        }


async def read_tables(connection: AsyncConnection, dead_node: str) -> dict[str, Any]:
    """The same view as :meth:`Replay.after_recovery`, read from the database."""
    c, s, link, d, a = (
        models.connections.c,
        models.sessions.c,
        models.session_links.c,
        models.device_info_snapshots.c,
        models.audit_events.c,
    )
    cl = models.clients.c
    connections = await connection.execute(
        select(
            c.connection_id, c.client_id, c.client_type, c.platform, c["metadata"], c.close_reason
        )
    )
    clients = await connection.execute(
        select(cl.client_id, cl.client_type, cl.platform, cl["metadata"])
    )
    sessions = await connection.execute(
        select(s.session_id, s.owner_id, s.executor_id, s.task_name, s.state)
    )
    links = await connection.execute(
        select(link.session_id, link.role, link.client_id).where(link.unbound_at.is_(None))
    )
    snapshots = (
        await connection.execute(select(d.device_id, d.info).order_by(d.snapshot_id))
    ).all()
    audit = await connection.execute(
        select(a.kind, a.client_id, a.session_id).where(a.node_id == dead_node).order_by(a.event_id)
    )
    return {
        "connections": {row[0]: tuple(row[1:]) for row in connections},
        "clients": {row[0]: tuple(row[1:]) for row in clients},
        "sessions": {row[0]: tuple(row[1:]) for row in sessions},
        "open_links": sorted(tuple(row) for row in links),
        "device_info": {device_id: info for device_id, info in snapshots},
        "snapshots": len(snapshots),
        "audit_of_dead_run": [tuple(row) for row in audit],
    }


def committed_prefix(run: ChildRun, actual: dict[str, Any]) -> Replay:
    """The replay of the committed prefix of the child's mutations: it must reach at least the
    last reported flush, and the tables must be exactly its state after recovery."""
    replay = Replay()
    for op in run.ops[: run.flushed]:
        replay.apply(op)
    candidates = [replay.after_recovery()]
    if candidates[0] == actual:
        return replay
    for op in run.ops[run.flushed :]:
        replay.apply(op)
        expected = replay.after_recovery()
        if expected == actual:
            return replay
        candidates.append(expected)
    # No prefix matches: compare with the one whose audit trail is as long as the actual one.
    closest = next(
        (
            candidate
            for candidate in candidates
            if len(candidate["audit_of_dead_run"]) == len(actual["audit_of_dead_run"])
        ),
        candidates[0],
    )
    assert actual == closest, (
        f"the database is no prefix of the {len(run.ops)} reported mutations at or past the "
        f"{run.flushed} reported flushed"
    )
    raise AssertionError("unreachable")


async def check_recovery(url: str, run: ChildRun) -> None:
    engine = create_engine(url)
    reg = Registry(url, node_name=NODE_NAME, heartbeat_interval=HEARTBEAT_INTERVAL)
    await reg.start()
    try:
        n, c, a = models.nodes.c, models.connections.c, models.audit_events.c
        async with engine.connect() as connection:
            actual = await read_tables(connection, run.node_id)
            state = committed_prefix(run, actual)
            open_connections = state.live
            interrupted = state.active_sessions()
            assert open_connections, "choose another seed: nothing was open at the kill"
            assert interrupted, "choose another seed: no session was active at the kill"

            # No connection row is left open; those the child left open end at its last
            # heartbeat (or, if opened after it, at their own start), never before they began.
            assert (
                await connection.scalar(select(func.count()).where(c.disconnected_at.is_(None)))
                == 0
            )
            dead = (
                await connection.execute(select(models.nodes).where(n.node_id == run.node_id))
            ).one()
            assert dead.stop_reason == "server_restart"
            assert dead.stopped_at == dead.heartbeat_at
            assert dead.heartbeat_at >= dead.started_at
            if run.seconds > 3 * HEARTBEAT_INTERVAL:
                assert dead.heartbeat_at > dead.started_at, "no heartbeat reached the database"
            rows = (
                await connection.execute(
                    select(
                        c.connection_id,
                        c.node_id,
                        c.connected_at,
                        c.disconnected_at,
                        c.close_reason,
                    )
                )
            ).all()
            recovered: set[str] = set()
            for row in rows:
                assert row.node_id == run.node_id
                assert row.disconnected_at >= row.connected_at, row
                if row.close_reason == "server_restart":
                    recovered.add(row.connection_id)
                    assert row.disconnected_at == max(dead.heartbeat_at, row.connected_at), row
            assert recovered == set(open_connections.values())

            sessions = (
                await connection.execute(
                    select(models.sessions).where(
                        models.sessions.c.session_id.in_(list(interrupted))
                    )
                )
            ).all()
            assert {row.session_id for row in sessions} == set(interrupted)
            for row in sessions:
                assert row.state == "interrupted"
                assert row.end_reason == "server_restart"

            # The recovery is in the audit trail, in order, by the new run.
            events = (
                await connection.execute(
                    select(a.kind, a.client_id, a.session_id, a.details)
                    .where(a.node_id == reg.node_id)
                    .order_by(a.event_id)
                )
            ).all()
            nodes = {row.node_id: row for row in await connection.execute(select(models.nodes))}
        assert [row.kind for row in events] == [
            "node_started",
            *["connection_recovered"] * len(open_connections),
            *["session_interrupted"] * len(interrupted),
            "node_recovered",
        ]
        recovered_events = [row for row in events if row.kind == "connection_recovered"]
        assert {(row.client_id, row.details["connection_id"]) for row in recovered_events} == set(
            open_connections.items()
        )
        assert all(row.details["reason"] == "server_restart" for row in recovered_events)
        assert {
            (row.client_id, row.session_id) for row in events if row.kind == "session_interrupted"
        } == {(owner, sid) for sid, (owner, *_) in interrupted.items()}
        summary = events[-1].details
        assert summary["nodes"] == [run.node_id]
        assert summary["closed_connections"] == len(open_connections)
        assert summary["interrupted_sessions"] == len(interrupted)
        assert set(nodes) == {run.node_id, reg.node_id}
        assert nodes[reg.node_id].stopped_at is None

        # The interrupted sessions and their maps are back in memory; so is the device info.
        device_map: dict[str, set[str]] = {}
        constellation_map: dict[str, set[str]] = {}
        for sid in interrupted:
            for role, client in state.links[sid]:
                target = device_map if role == "device" else constellation_map
                target.setdefault(client, set()).add(sid)
        for client in ALL_CLIENTS:
            assert not reg.is_online(client)
            assert reg.get_device_sessions(client) == device_map.get(client, set()), client
            assert reg.get_constellation_sessions(client) == constellation_map.get(client, set()), (
                client
            )
            assert {s.session_id for s in reg.get_interrupted_sessions(client)} == {
                sid for sid, (owner, *_) in interrupted.items() if owner == client
            }, client
        for device in DEVICES:
            assert reg.get_device_info(device) == state.device_info.get(device), device
        assert reg.get_online_count() == 0
        for sid, (owner, executor, task, _) in interrupted.items():
            session = reg.get_session(sid)
            assert session is not None
            assert (session.owner_id, session.executor_id, session.task_name, session.state) == (
                owner,
                executor,
                task,
                SessionState.INTERRUPTED,
            )

        # Ownership holds across the restart: another client cannot take an old session id,
        # and its owner can resume it.
        sid, (owner, executor, task, _) = next(iter(interrupted.items()))
        with pytest.raises(SessionOwnershipError):
            await reg.open_session(sid, owner_id="intruder", executor_id="intruder")
        assert reg.get_device_sessions("intruder") == set()
        resumed = await reg.open_session(sid, owner_id=owner, executor_id=executor, task_name=task)
        assert resumed.state is SessionState.ACTIVE
        assert sid in reg.get_device_sessions(executor)
    finally:
        await reg.close()
        await engine.dispose()


@pytest.mark.parametrize(
    ("kill_after_flushes", "seed"), [(3, 11), (15, 22), (40, 33)], ids=["early", "middle", "late"]
)
async def test_sigkill_mid_stream_then_restart_recovers(
    database_url: str, tmp_path: Path, kill_after_flushes: int, seed: int
) -> None:
    run = await run_child_until_killed(database_url, seed, kill_after_flushes, tmp_path)
    assert run.flushed > 0
    await check_recovery(database_url, run)
