"""The write path: an in-memory journal drained by one writer task in group commits.

Mutations append operations synchronously (no I/O, no await). The writer task takes everything
queued (up to :data:`MAX_BATCH` operations), applies it in one transaction and then resolves
every waiter whose operations are now durable. While a commit runs, new operations queue up and
go into the next transaction, so the batch size follows the load.

When a commit fails (database down, read-only, disk full) the batch stays at the head of the
journal and the writer retries with capped exponential backoff: nothing queued is dropped.

The journal has two *limits*, on the operations waiting for the store and on the bytes they
hold (the JSON size of the documents each carries, plus :data:`OPERATION_BYTES`): at either,
:meth:`Journal.admit` refuses whatever would start something new (a registration, a session)
with :class:`JournalFullError`, so a long outage costs bounded memory and a clear error
instead of lost history. Operations that record an end (a disconnect, a session's end) are
always accepted: they happened, and they are bounded by what is live. A caller that only
outruns a healthy writer (a bulk load) awaits :meth:`Journal.room` instead of hitting the
limit.

A change its caller gave up on before it was durable (a registration refused because its
commit did not come in time) is *retracted*: its operations still queued are never written.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from registry.errors import JournalFullError, RegistryClosedError, StoreUnavailableError, describe
from registry.store.writes import Op, Row, apply

logger = logging.getLogger(__name__)

Entry = tuple[Op, Row]
Applier = Callable[[AsyncConnection, Sequence[Entry]], Awaitable[None]]
#: Called after each commit with the committed batch and the commit's duration in seconds.
Listener = Callable[[Sequence[Entry], float], None]
#: Raises (StoreUnavailableError) when the store must not be written, e.g. it is no longer the
#: database the journal was opened on; called before each commit and again just before it ends.
Guard = Callable[[], None]

RETRY_INITIAL_SECONDS = 0.05
RETRY_MAX_SECONDS = 5.0
#: Default :attr:`Journal.limit`. An operation takes about 0.6 KB of memory (measured over
#: registrations with device info and their disconnects), so a full journal holds ~60 MB.
DEFAULT_LIMIT = 100_000
#: Default :attr:`Journal.limit_bytes`.
DEFAULT_LIMIT_BYTES = 64 * 1024 * 1024
#: What an operation is counted to hold besides its documents (its row, ids and times).
OPERATION_BYTES = 600
DEFAULT_STALL_SECONDS = 10.0
#: Most operations in one commit: a long queue (the store back after an outage, a close with
#: many thousands of live clients) is written in steps of bounded time and memory, instead of
#: one transaction that holds the store (and every waiter) for many seconds.
MAX_BATCH = 20_000


def _no_guard() -> None:
    pass


def _release_frames(exc: BaseException) -> None:
    """Clear the locals of the frames that ``exc`` and the exceptions it chains hold.

    A driver's exception sits in reference cycles (a traceback kept in a local of a frame it
    holds) that only a full garbage collection frees, and those frames' locals are the failed
    batch: every document in it. During an outage that is memory the journal no longer counts.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def _size(size: int) -> str:
    """``size`` bytes in MiB, or KiB when under one MiB."""
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


@dataclass(slots=True)
class _Retraction:
    """A retraction waiting for the outcome of the commit its operations are in."""

    sequences: Sequence[int]
    committed: Callable[[], object]
    dropped: Callable[[], object]


class Journal:
    """Ordered queue of row operations with one writer task.

    Sequence numbers count appended operations from 1; :meth:`wait` returns once the operation
    with that number (and so every earlier one) is committed or retracted. Each of
    :attr:`listeners` is called in the writer task after every commit, with the batch and the
    commit's duration: keep listeners quick and free of I/O. One that raises is logged; the
    writer carries on.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        applier: Applier = apply,
        *,
        limit: int = DEFAULT_LIMIT,
        limit_bytes: int = DEFAULT_LIMIT_BYTES,
        stall_after: float = DEFAULT_STALL_SECONDS,
        guard: Guard | None = None,
    ) -> None:
        self._engine = engine
        self._apply = applier
        self._guard = guard or _no_guard
        #: Depth at which :meth:`admit` refuses new work.
        self.limit = limit
        #: Bytes held (see :attr:`depth_bytes`) at which :meth:`admit` refuses new work.
        self.limit_bytes = limit_bytes
        #: Seconds after which a commit still running counts as a fault (logged, in
        #: :meth:`fault`): a database that hangs instead of failing.
        self.stall_after = stall_after
        #: How many times :meth:`admit` refused, by what it refused.
        self.refused: dict[str, int] = {}
        #: Queued operations, oldest first; None marks a retracted one, which keeps its place
        #: (its sequence number) until the writer passes it, but nothing else.
        self._pending: list[Entry | None] = []
        #: The bytes each queued operation is counted to hold (0 once retracted).
        self._weights: list[int] = []
        self._bytes = 0
        self._retracted = 0  # Nones among the queued operations (not the batch in flight)
        self._in_flight = 0  # operations in the commit running now
        self._deferred: list[_Retraction] = []
        self._appended = 0
        self._committed = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap
        self._tiebreak = itertools.count()
        self._wakeup = asyncio.Event()
        self._progress: asyncio.Event | None = None  # set after the next commit attempt
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._delay = RETRY_INITIAL_SECONDS
        self.listeners: list[Listener] = []
        self.last_error: StoreUnavailableError | None = None
        self._commit_started: float | None = None
        self.commits = 0
        self.committed_operations = 0

    @property
    def depth(self) -> int:
        """Operations queued and not yet committed (retracted ones until the writer passes
        them)."""
        return self._appended - self._committed

    @property
    def depth_bytes(self) -> int:
        """Bytes the queued operations are counted to hold: the JSON size of the documents
        each carries plus :data:`OPERATION_BYTES` apiece."""
        return self._bytes

    @property
    def in_flight(self) -> int:
        """Operations in the commit running now (0 between commits)."""
        return self._in_flight

    @property
    def last_sequence(self) -> int:
        return self._appended

    def is_committed(self, sequence: int) -> bool:
        """Whether operation ``sequence`` (and every one before it) is committed."""
        return sequence <= self._committed

    def _full(self) -> bool:
        return self.depth >= self.limit or self._bytes >= self.limit_bytes

    def _failure(self) -> str | None:
        """Why commits are not getting through (failing, or one hanging), or None."""
        if self.last_error is not None:
            return str(self.last_error)
        started = self._commit_started
        running = 0.0 if started is None else time.perf_counter() - started
        if running > self.stall_after:
            return f"a commit of {self.depth} operations has been running for {running:.0f}s"
        return None

    def admit(self, what: str) -> None:
        """Raise :class:`JournalFullError` naming ``what`` if the journal is at a limit.

        Called before anything new is started, so a refusal changes nothing; counted in
        :attr:`refused`. The message says whether the store is failing or merely slower than
        the caller (then it names :meth:`room`, the way to keep pace).
        """
        if not self._full():
            return
        self.refused[what] = self.refused.get(what, 0) + 1
        held = f"{self.depth} operations holding {_size(self._bytes)}"
        limits = f"journal limits {self.limit} operations, {_size(self.limit_bytes)}"
        failure = self._failure()
        if failure is not None:
            raise JournalFullError(
                f"{what} refused: {held} are waiting for the store ({limits}); {failure}"
            )
        raise JournalFullError(
            f"{what} refused: {held} are queued ({limits}); the store is healthy but slower "
            "than the caller: a bulk load should `await registry.room()` before each call, "
            "which waits while the writer catches up"
        )

    def fault(self) -> str | None:
        """Why the store is not keeping up, or None while it is.

        A fault is a commit that failed and is being retried, a full journal (by operations
        or by bytes), or a commit that has been running for more than :attr:`stall_after`
        seconds.
        """
        failure = self._failure()
        if failure is not None:
            return failure
        if self.depth >= self.limit:
            return f"the journal is full: {self.depth} operations wait for the store"
        if self._bytes >= self.limit_bytes:
            return (
                f"the journal is full: {self.depth} operations holding {_size(self._bytes)} "
                f"wait for the store (limit {_size(self.limit_bytes)})"
            )
        return None

    async def room(self) -> None:
        """Return once the journal is at most half full (by operations and by bytes): at once
        while it is, otherwise when the writer has caught up that far.

        The pace-keeper for bulk work: ``await room()`` before each of a long run of
        mutations and they go as fast as the store writes, never into :class:`JournalFullError`.
        Raises :class:`StoreUnavailableError` if it would have to wait while the store is
        failing (a commit failed and is being retried, or one hangs), and
        :class:`RegistryClosedError` once the writer has stopped.
        """
        while self.depth > self.limit // 2 or self._bytes > self.limit_bytes // 2:
            if self._task is None:
                raise RegistryClosedError("the registry's writer is not running")
            failure = self._failure()
            if failure is not None:
                raise StoreUnavailableError(f"the store is failing: {failure}")
            if self._progress is None:
                self._progress = asyncio.Event()
            await self._progress.wait()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="registry-journal-writer"
            )

    def append(self, op: Op, row: Row, weight: int = 0) -> int:
        """Queue one operation carrying ``weight`` bytes of documents (their JSON size);
        returns its sequence number."""
        if self._closing and self._task is None:
            raise RegistryClosedError("the registry is closed")
        size = OPERATION_BYTES + weight
        self._pending.append((op, row))
        self._weights.append(size)
        self._bytes += size
        self._appended += 1
        if not self._wakeup.is_set():
            self._wakeup.set()
        return self._appended

    def retract(
        self,
        sequences: Sequence[int],
        *,
        committed: Callable[[], object],
        dropped: Callable[[], object],
    ) -> None:
        """Withdraw the operations numbered ``sequences``: one change that its caller gave up
        on before it was durable.

        If none of them is committed or in the commit running now, they are dropped (never
        written) and ``dropped`` is called. If one is committed, none is dropped and
        ``committed`` is called, for the caller to record the change's undoing. If they are in
        the commit running now, which of the two happens (and when its callback is called, by
        the writer) depends on whether that commit succeeds. Either callback is called once.
        """
        if any(sequence <= self._committed for sequence in sequences):
            committed()
        elif any(sequence <= self._committed + self._in_flight for sequence in sequences):
            self._deferred.append(_Retraction(sequences, committed, dropped))
        else:
            self._drop(sequences)
            dropped()

    def _drop(self, sequences: Sequence[int]) -> None:
        """Replace queued operations by None (they keep their sequence numbers)."""
        first = self._committed + self._in_flight + 1
        for sequence in sequences:
            index = sequence - first
            if self._pending[index] is not None:
                self._pending[index] = None
                self._bytes -= self._weights[index]
                self._weights[index] = 0
                self._retracted += 1

    def _settle_retractions(self, committed: bool) -> None:
        """Decide the retractions that waited for the commit just ended (now queued again if
        it failed)."""
        deferred, self._deferred = self._deferred, []
        for retraction in deferred:
            if not committed:
                self._drop(retraction.sequences)
            callback = retraction.committed if committed else retraction.dropped
            try:
                callback()
            except Exception:
                logger.exception("retraction callback %r failed", callback)

    async def wait(self, sequence: int) -> None:
        """Return once operation ``sequence`` and all before it are committed."""
        if sequence <= self._committed:
            return
        if self._task is None:
            raise RegistryClosedError("the registry's writer is not running")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (sequence, next(self._tiebreak), future))
        await future

    async def flush(self) -> None:
        """Return once everything appended so far is committed."""
        await self.wait(self._appended)

    async def close(self, drain_timeout: float | None) -> None:
        """Drain the journal and stop the writer.

        Raises :class:`StoreUnavailableError` if the writer committed nothing for
        ``drain_timeout`` seconds while draining (a long queue that it is writing is waited
        for); the undrained operations are then reported, not silently dropped.
        """
        self._closing = True
        if self._task is None:
            return
        try:
            target = self._appended
            while True:
                progress = self._committed
                try:
                    async with asyncio.timeout(drain_timeout):
                        await self.wait(target)
                    break
                except TimeoutError:
                    if self._committed == progress:
                        raise
        except TimeoutError:
            lost = self.depth
            raise StoreUnavailableError(
                f"could not write {lost} journalled operations before closing: {self.last_error}"
            ) from None
        finally:
            task, self._task = self._task, None
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            self._signal_progress()  # a room() waiting sees the writer gone

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await self._commit_pending()

    async def _commit_pending(self) -> None:
        """Commit everything queued in one transaction; on failure put it back and back off.

        The batch lives only in this frame (and in the journal while it is retried), so an idle
        writer holds no rows. Retracted operations are skipped (a batch of nothing else needs
        no transaction).
        """
        if len(self._pending) <= MAX_BATCH:
            batch, self._pending = self._pending, []
            weights, self._weights = self._weights, []
        else:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            weights, self._weights = self._weights[:MAX_BATCH], self._weights[MAX_BATCH:]
        entries = cast(
            list[Entry],
            [entry for entry in batch if entry is not None] if self._retracted else batch,
        )
        self._retracted -= len(batch) - len(entries)
        if not entries:  # retracted, every one: nothing to write
            self._committed += len(batch)
            self._release()
            self._signal_progress()
            return
        self._in_flight = len(batch)
        started = self._commit_started = time.perf_counter()
        watchdog = asyncio.get_running_loop().call_later(
            self.stall_after, self._report_stall, len(entries)
        )
        failure: str | None = None
        try:
            self._guard()  # before connecting: never open a file that took the store's place
            async with self._engine.begin() as connection:
                await self._apply(connection, entries)
                self._guard()
        except Exception as exc:  # never let one failure stop the writer (Cancelled passes)
            failure = describe(exc)
            _release_frames(exc)
        finally:
            watchdog.cancel()
            self._commit_started = None
            self._in_flight = 0
        if failure is not None:
            self._pending = batch + self._pending
            self._weights = weights + self._weights
            self._retracted += len(batch) - len(entries)
            self._settle_retractions(committed=False)
            self.last_error = StoreUnavailableError(
                f"committing {len(entries)} operations failed: {failure}"
            )
            logger.error("%s; retrying in %.2fs", self.last_error, self._delay)
            self._signal_progress()
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, RETRY_MAX_SECONDS)
            return
        self._bytes -= sum(weights)
        self._done(len(batch), entries, time.perf_counter() - started)
        self._settle_retractions(committed=True)
        self._signal_progress()

    def _signal_progress(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.set()

    def _report_stall(self, operations: int) -> None:
        logger.error(
            "a commit of %d operations has been running for %gs: the store is not answering",
            operations,
            self.stall_after,
        )

    def _done(self, operations: int, batch: Sequence[Entry], seconds: float) -> None:
        """Account for ``operations`` passed (``batch`` of them committed), wake their
        waiters and tell the listeners."""
        self._delay = RETRY_INITIAL_SECONDS
        if self.last_error is not None:
            logger.warning("store writable again after: %s", self.last_error)
            self.last_error = None
        elif seconds > self.stall_after:
            logger.warning("store writable again after a commit of %.1fs", seconds)
        self._committed += operations
        self.commits += 1
        self.committed_operations += len(batch)
        self._release()
        for listener in self.listeners:
            try:
                listener(batch, seconds)
            except Exception:
                logger.exception("journal listener %r failed", listener)

    def _release(self) -> None:
        waiters, committed = self._waiters, self._committed
        while waiters and waiters[0][0] <= committed:
            future = heapq.heappop(waiters)[2]
            if not future.done():
                future.set_result(None)
