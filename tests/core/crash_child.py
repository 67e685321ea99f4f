"""Child process of ``test_crash.py``: a registry running a stream of mutations until killed.

Usage: ``python crash_child.py DATABASE_URL SEED HEARTBEAT_INTERVAL``

It writes one JSON document a line to stdout:

- ``{"node": NODE_ID}`` once the registry is started;
- ``{"op": [...]}`` for each mutation, written before the mutation can be committed (after a
  synchronous call, which appends to the journal with no await in between; before an
  ``await``-ed one), so every committed mutation has been reported;
- ``{"flushed": N}`` after ``flush()`` returned: the first N reported mutations are durable.

The ops: ``["add", client_id, client_type, platform, metadata, connection_id]``,
``["remove", client_id]``, ``["open", session_id, owner_id, executor_id, task_name]``,
``["end", session_id, state]`` and ``["info", device_id, info]``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
from typing import Any

from registry import ClientType, Registry

NODE_NAME = "crash-test-node"
DEVICES = tuple(f"dev-{n}" for n in range(6))
CONSTELLATIONS = tuple(f"con-{n}" for n in range(3))
OPS_PER_FLUSH = 6


def emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


class Stream:
    def __init__(self, reg: Registry, seed: int) -> None:
        self.reg = reg
        self.rng = random.Random(seed)
        self.live: set[str] = set()
        self.active: list[str] = []
        self.serial = itertools.count()
        self.reported = 0

    def report(self, *op: Any) -> None:
        self.reported += 1
        emit({"op": list(op)})

    def add(self) -> None:
        offline = [c for c in (*DEVICES, *CONSTELLATIONS) if c not in self.live]
        client_id = self.rng.choice(offline)
        kind = ClientType.DEVICE if client_id in DEVICES else ClientType.CONSTELLATION
        platform = self.rng.choice(("windows", "linux"))
        metadata = {"seq": next(self.serial)}
        self.reg.add_client(client_id, platform, object(), kind, metadata)
        info = self.reg.get_client_info(client_id)
        assert info is not None
        self.live.add(client_id)
        self.report("add", client_id, kind.value, platform, metadata, info.connection_id)

    def remove(self) -> None:
        client_id = self.rng.choice(sorted(self.live))
        self.reg.remove_client(client_id)
        self.live.discard(client_id)
        self.report("remove", client_id)

    async def open(self) -> None:
        devices = sorted(c for c in self.live if c in DEVICES)
        constellations = sorted(c for c in self.live if c in CONSTELLATIONS)
        executor = self.rng.choice(devices)
        owner = executor
        if constellations and self.rng.random() < 0.7:
            owner = self.rng.choice(constellations)
        number = next(self.serial)
        session_id, task = f"session-{number}", f"task-{number}"
        self.report("open", session_id, owner, executor, task)
        await self.reg.open_session(
            session_id, owner_id=owner, executor_id=executor, task_name=task
        )
        self.active.append(session_id)

    def end(self) -> None:
        session_id = self.active.pop(self.rng.randrange(len(self.active)))
        state = self.rng.choice(("completed", "failed", "cancelled"))
        self.reg.remove_session(session_id, state=state)
        self.report("end", session_id, state)

    def info(self) -> None:
        device_id = self.rng.choice(DEVICES)
        info = {"os": "windows", "cpu": self.rng.randint(0, 2)}
        self.reg.set_device_info(device_id, info)
        self.report("info", device_id, info)

    async def step(self) -> None:
        devices = [c for c in self.live if c in DEVICES]
        if len(devices) < 2 or len(self.live) < 3:
            self.add()
            return
        choice = self.rng.random()
        if choice < 0.2 and len(self.live) < len(DEVICES) + len(CONSTELLATIONS):
            self.add()
        elif choice < 0.45:
            await self.open()
        elif choice < 0.6 and len(self.active) > 2:
            self.end()
        elif choice < 0.8 or len(self.live) <= 3:
            self.info()
        else:
            self.remove()


async def main(url: str, seed: int, heartbeat_interval: float) -> None:
    reg = Registry(url, node_name=NODE_NAME, heartbeat_interval=heartbeat_interval)
    await reg.start()
    emit({"node": reg.node_id})
    stream = Stream(reg, seed)
    while True:  # until SIGKILL
        for _ in range(OPS_PER_FLUSH):
            await stream.step()
        await reg.flush()
        emit({"flushed": stream.reported})
        await asyncio.sleep(0.01)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
