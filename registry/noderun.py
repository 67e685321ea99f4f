"""The node run: one run of this node against the store, from :meth:`NodeRun.start` to
:meth:`NodeRun.stop`.

It owns what a run holds: the SQLite file's lock, the engine, the journal and its writer, the
history queries, the ``nodes`` row with its heartbeat, and start-up recovery of the runs that
went before (:mod:`registry.recovery`). A run started again is a new row in ``nodes``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, update
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from registry import closes
from registry.audit import AuditKind
from registry.errors import RegistryClosedError, store_errors
from registry.history import History
from registry.journal import Journal
from registry.recorder import Recorder
from registry.recovery import RecoveredState, close_gone_runs, load_state
from registry.store import models
from registry.store.dialect import checkpoint_deferred, create_engine, is_sqlite
from registry.store.schema import ensure_schema
from registry.store.sqlite_file import DatabaseFile, database_path
from registry.store.writes import Stamp

_NOT_STARTED = "the registry is not started; await registry.start()"


class NodeRun:
    """This node's run: lock, engine, journal, heartbeat and recovery (see the module)."""

    def __init__(
        self,
        url: URL,
        *,
        node_name: str | None,
        auto_migrate: bool,
        heartbeat_interval: float,
        node_timeout: float,
        close_timeout: float | None,
        journal_limit: int,
        journal_limit_bytes: int,
        stall_timeout: float,
    ) -> None:
        self.url = url
        self._node_name = node_name
        self._auto_migrate = auto_migrate
        self._heartbeat_interval = heartbeat_interval
        self._node_timeout = timedelta(seconds=node_timeout)
        self._close_timeout = close_timeout
        self._journal_limits = (journal_limit, journal_limit_bytes, stall_timeout)
        path = database_path(url)
        self.file = None if path is None else DatabaseFile(path)
        self._engine: AsyncEngine | None = None
        self._journal: Journal | None = None
        self._history: History | None = None
        self._recorder: Recorder | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        #: How many runs have started: a registry closed after one finds nothing live.
        self.runs = 0
        #: This run's row in ``nodes``; a run started again gets a new one.
        self.node_id = str(uuid.uuid4())

    @property
    def database_url(self) -> str:
        return self.url.render_as_string(hide_password=True)

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RegistryClosedError(_NOT_STARTED)
        return self._engine

    @property
    def history(self) -> History:
        if self._history is None:
            raise RegistryClosedError(_NOT_STARTED)
        return self._history

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise RegistryClosedError(_NOT_STARTED)
        return self._journal

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            raise RegistryClosedError(_NOT_STARTED)
        return self._recorder

    @property
    def started(self) -> bool:
        return self._journal is not None

    def check_open(self) -> None:
        if self._journal is None:
            raise RegistryClosedError(_NOT_STARTED)

    def check_removable(self) -> None:
        """Removals raise on a registry never started; once it has been closed they find
        nothing live (close removed everything), so a late removal is a harmless no-op."""
        if self._journal is None and not self.runs:
            raise RegistryClosedError(_NOT_STARTED)

    async def durable(self, sequence: int | None) -> None:
        """Wait for ``sequence``, or, when the call appended nothing, for everything queued
        so far: what made it a no-op (an earlier call) may not be durable yet."""
        if sequence is not None:
            await self.journal.wait(sequence)
        elif self._journal is not None:
            await self._journal.flush()

    async def start(self) -> RecoveredState:
        """Lock a SQLite database, migrate (or refuse), register this run, recover from earlier
        runs; returns the state to load. On failure nothing is left open (see
        :meth:`Registry.start` for the errors)."""
        if self._engine is not None:
            raise RegistryClosedError("the registry is already started")
        if self.runs:
            self.node_id = str(uuid.uuid4())  # each run is its own row in ``nodes``
        started = datetime.now(UTC)
        engine = create_engine(self.url)
        try:
            with store_errors(
                f"cannot open the registry database {self.database_url}", also=(OSError,)
            ):
                if self.file is not None:
                    # Before recovery: it takes every unstopped run of this file for a dead one.
                    self.file.acquire(
                        f"pid {os.getpid()} on host {socket.gethostname()}, node {self._name}, "
                        f"started at {started.isoformat(timespec='seconds')}"
                    )
                await ensure_schema(engine, auto_migrate=self._auto_migrate)
                if self.file is not None:
                    self.file.remember()
                state = await self._recover(engine, started)
        except BaseException:
            if self.file is not None:
                self.file.release()
            await engine.dispose()
            raise
        self.runs += 1
        self._engine = engine
        limit, limit_bytes, stall_after = self._journal_limits
        self._journal = Journal(
            engine,
            limit=limit,
            limit_bytes=limit_bytes,
            stall_after=stall_after,
            guard=None if self.file is None else self.file.check,
        )
        self._journal.start()
        self._history = History(engine)
        self._recorder = Recorder(self._journal, self.node_id)
        self._heartbeat_task = asyncio.get_running_loop().create_task(
            self._heartbeat(), name="registry-node-heartbeat"
        )
        return state

    @property
    def _name(self) -> str:
        return self._node_name or self.node_id

    async def _recover(self, engine: AsyncEngine, now: datetime) -> RecoveredState:
        async with engine.connect() as outer, checkpoint_deferred(outer) as connection:
            await connection.execute(
                insert(models.nodes).values(
                    node_id=self.node_id,
                    name=self._name,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    started_at=now,
                    heartbeat_at=now,
                )
            )
            await connection.execute(
                insert(models.audit_events).values(
                    at=now,
                    node_id=self.node_id,
                    kind=AuditKind.NODE_STARTED,
                    details={"name": self._name, "pid": os.getpid()},
                )
            )
            await close_gone_runs(
                connection,
                node_id=self.node_id,
                node_name=self._name,
                now=now,
                node_timeout=self._node_timeout,
                single_node=is_sqlite(self.url),
            )
            return await load_state(connection)

    async def _heartbeat(self) -> None:
        """Beat every ``heartbeat_interval``. While a beat waits for the store (an outage) no
        other is queued behind it: its time is brought up to date instead, so an outage does
        not grow the journal here and the beat written when the store is back is fresh."""
        journal, recorder = self.journal, self.recorder
        row: Stamp = {"b_id": self.node_id, "b_at": datetime.now(UTC)}
        sequence = 0
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            now = datetime.now(UTC)
            if journal.is_committed(sequence):
                row = {"b_id": self.node_id, "b_at": now}
                sequence = recorder.beat(row)
            else:
                row["b_at"] = now  # still queued (the writer reads rows as it builds a commit)

    async def stop_heartbeat(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
            self._heartbeat_task = None

    async def stop(self) -> None:
        """Audit the stop, drain the journal, mark this run stopped, release the engine and the
        lock. Raises :class:`StoreUnavailableError` if the journal cannot be drained."""
        await self.stop_heartbeat()
        self.recorder.audit(AuditKind.NODE_STOPPED, datetime.now(UTC))
        engine, journal = self.engine, self.journal
        try:
            await journal.close(self._close_timeout)
            with store_errors("cannot mark the node stopped"):
                async with engine.begin() as connection:
                    now = datetime.now(UTC)
                    await connection.execute(
                        update(models.nodes)
                        .where(models.nodes.c.node_id == self.node_id)
                        .values(heartbeat_at=now, stopped_at=now, stop_reason=closes.NODE_STOPPED)
                    )
        finally:
            self._engine = self._journal = self._history = self._recorder = None
            await engine.dispose()
            if self.file is not None:
                self.file.release()
