"""The write path: an in-memory journal drained by one writer task in group commits.

Mutations append operations synchronously (no I/O, no await). The writer task takes everything
queued, applies it in one transaction and then resolves every waiter whose operations are now
durable. While a commit runs, new operations queue up and go into the next transaction, so the
batch size follows the load.

When a commit fails (database down, read-only, disk full) the batch stays at the head of the
journal and the writer retries with capped exponential backoff: nothing queued is dropped.

The journal has a *limit*: while that many operations wait for the store, :meth:`Journal.admit`
refuses whatever would start something new (a registration, a session) with
:class:`JournalFullError`, so a long outage costs bounded memory and a clear error instead of
lost history. Operations that record an end (a disconnect, a session's end) are always
accepted: they happened, and they are bounded by what is live.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from registry.errors import JournalFullError, RegistryClosedError, StoreUnavailableError, describe
from registry.store.writes import Op, Row, apply

logger = logging.getLogger(__name__)

Applier = Callable[[AsyncConnection, Sequence[tuple[Op, Row]]], Awaitable[None]]
#: Called after each commit with the committed batch and the commit's duration in seconds.
Listener = Callable[[Sequence[tuple[Op, Row]], float], None]

RETRY_INITIAL_SECONDS = 0.05
RETRY_MAX_SECONDS = 5.0
#: Default :attr:`Journal.limit`. An operation takes about 0.6 KB of memory (measured over
#: registrations with device info and their disconnects), so a full journal holds ~60 MB.
DEFAULT_LIMIT = 100_000
DEFAULT_STALL_SECONDS = 10.0


class Journal:
    """Ordered queue of row operations with one writer task.

    Sequence numbers count appended operations from 1; :meth:`wait` returns once the operation
    with that number (and so every earlier one) is committed. Each of :attr:`listeners` is
    called in the writer task after every commit, with the batch and the commit's duration:
    keep listeners quick and free of I/O. One that raises is logged; the writer carries on.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        applier: Applier = apply,
        *,
        limit: int = DEFAULT_LIMIT,
        stall_after: float = DEFAULT_STALL_SECONDS,
    ) -> None:
        self._engine = engine
        self._apply = applier
        #: Depth at which :meth:`admit` refuses new work.
        self.limit = limit
        #: Seconds after which a commit still running counts as a fault (logged, in
        #: :meth:`fault`): a database that hangs instead of failing.
        self.stall_after = stall_after
        #: How many times :meth:`admit` refused, by what it refused.
        self.refused: dict[str, int] = {}
        self._pending: list[tuple[Op, Row]] = []
        self._appended = 0
        self._committed = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap
        self._tiebreak = itertools.count()
        self._wakeup = asyncio.Event()
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
        """Operations queued and not yet committed."""
        return self._appended - self._committed

    @property
    def last_sequence(self) -> int:
        return self._appended

    def is_committed(self, sequence: int) -> bool:
        """Whether operation ``sequence`` (and every one before it) is committed."""
        return sequence <= self._committed

    def admit(self, what: str) -> None:
        """Raise :class:`JournalFullError` naming ``what`` if the journal is at its limit.

        Called before anything new is started, so a refusal changes nothing; counted in
        :attr:`refused`.
        """
        if self.depth < self.limit:
            return
        self.refused[what] = self.refused.get(what, 0) + 1
        cause = f"; last error: {self.last_error}" if self.last_error is not None else ""
        raise JournalFullError(
            f"{what} refused: {self.depth} operations are waiting for the store "
            f"(journal limit {self.limit}){cause}"
        )

    def fault(self) -> str | None:
        """Why the store is not keeping up, or None while it is.

        A fault is a commit that failed and is being retried, a full journal, or a commit that
        has been running for more than :attr:`stall_after` seconds.
        """
        if self.last_error is not None:
            return str(self.last_error)
        if self.depth >= self.limit:
            return f"the journal is full: {self.depth} operations wait for the store"
        started = self._commit_started
        running = 0.0 if started is None else time.perf_counter() - started
        if running > self.stall_after:
            return f"a commit of {self.depth} operations has been running for {running:.0f}s"
        return None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="registry-journal-writer"
            )

    def append(self, op: Op, row: Row) -> int:
        """Queue one operation; returns its sequence number."""
        if self._closing and self._task is None:
            raise RegistryClosedError("the registry is closed")
        self._pending.append((op, row))
        self._appended += 1
        if not self._wakeup.is_set():
            self._wakeup.set()
        return self._appended

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

        Raises :class:`StoreUnavailableError` if the journal could not be drained within
        ``drain_timeout`` seconds; the undrained operations are then reported, not silently dropped.
        """
        self._closing = True
        if self._task is None:
            return
        try:
            async with asyncio.timeout(drain_timeout):
                await self.flush()
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

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await self._commit_pending()

    async def _commit_pending(self) -> None:
        """Commit everything queued in one transaction; on failure put it back and back off.

        The batch lives only in this frame (and in the journal while it is retried), so an idle
        writer holds no rows.
        """
        batch, self._pending = self._pending, []
        started = self._commit_started = time.perf_counter()
        watchdog = asyncio.get_running_loop().call_later(
            self.stall_after, self._report_stall, len(batch)
        )
        failure: Exception | None = None
        try:
            async with self._engine.begin() as connection:
                await self._apply(connection, batch)
        except Exception as exc:  # never let one failure stop the writer (Cancelled passes)
            failure = exc
        finally:
            watchdog.cancel()
            self._commit_started = None
        if failure is not None:
            self._pending = batch + self._pending
            self.last_error = StoreUnavailableError(
                f"committing {len(batch)} operations failed: {describe(failure)}"
            )
            logger.error("%s; retrying in %.2fs", self.last_error, self._delay)
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, RETRY_MAX_SECONDS)
            return
        self._done(batch, time.perf_counter() - started)

    def _report_stall(self, operations: int) -> None:
        logger.error(
            "a commit of %d operations has been running for %gs: the store is not answering",
            operations,
            self.stall_after,
        )

    def _done(self, batch: Sequence[tuple[Op, Row]], seconds: float) -> None:
        """Account for a committed batch, wake its waiters and tell the listeners."""
        self._delay = RETRY_INITIAL_SECONDS
        if self.last_error is not None:
            logger.warning("store writable again after: %s", self.last_error)
            self.last_error = None
        elif seconds > self.stall_after:
            logger.warning("store writable again after a commit of %.1fs", seconds)
        self._committed += len(batch)
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
