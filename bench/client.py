"""What the client processes of :mod:`bench.server` and :mod:`bench.load` share: the frames
their clients send, how they connect, and the worker processes on both ends of their pipes.

A worker process runs one coroutine on an event loop of its own (uvloop when it is installed: a
cheaper client) and talks to the parent over two one-way pipes: an inbox, which the worker's
event loop may watch (uvloop then makes it non-blocking), and an outbox, which stays blocking
so that a large message goes whole. An exception in a worker reaches the parent as
:class:`Failed`, and the parent raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import resource
import time
import traceback
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from websockets.asyncio.client import ClientConnection, connect

J = TypeVar("J")
T = TypeVar("T")

#: The parent's word to close every connection and report.
CLOSE = "close"

#: A device's system information as UFO device clients put it in ``metadata.system_info``.
SYSTEM_INFO: dict[str, Any] = {
    "platform": "linux",
    "os_version": "6.1.0",
    "cpu_count": 8,
    "memory_total_gb": 16.0,
    "hostname": "bench-host",
    "ip_address": "127.0.0.1",
    "supported_features": ["gui", "cli", "browser", "file_system", "office"],
    "platform_type": "computer",
    "schema_version": "1.0",
    "custom_metadata": {},
}


# -- frames and connections ------------------------------------------------------------------


def register_frame(
    client_id: str,
    client_type: str = "device",
    *,
    system_info: bool = True,
    target_id: str | None = None,
) -> str:
    """The ``register`` frame: ``metadata.platform``, and :data:`SYSTEM_INFO` unless
    ``system_info`` is false; ``target_id`` only when given."""
    metadata: dict[str, Any] = {"platform": "linux"}
    if system_info:
        metadata["system_info"] = SYSTEM_INFO
    frame: dict[str, Any] = {
        "type": "register",
        "status": "ok",
        "client_id": client_id,
        "client_type": client_type,
    }
    if target_id is not None:
        frame["target_id"] = target_id
    frame["metadata"] = metadata
    return json.dumps(frame)


def heartbeat_frame(client_id: str) -> str:
    # client_type left at its default ("device") also for constellations, as UFO's does.
    return json.dumps({"type": "heartbeat", "status": "ok", "client_id": client_id})


def is_ack(message: dict[str, Any]) -> bool:
    """Whether ``message`` is the ``heartbeat``/``ok`` frame that acknowledges a registration
    or a heartbeat."""
    return message.get("type") == "heartbeat" and message.get("status") == "ok"


async def open_websocket(
    url: str, *, compression: bool, wait: float, **options: Any
) -> ClientConnection:
    """Connect as the benchmarks' clients do: the server pings and the client only answers;
    permessage-deflate offered with ``compression`` (as the ``websockets`` default, and so
    UFO's clients); opening and closing each bounded by ``wait`` seconds."""
    return await connect(
        url,
        ping_interval=None,
        compression="deflate" if compression else None,
        open_timeout=wait,
        close_timeout=wait,
        **options,
    )


# -- the worker's side -----------------------------------------------------------------------


@dataclass(slots=True)
class Errors:
    """How many errors a worker met, and the texts of the first few distinct ones (a run can
    meet thousands of the same)."""

    keep: int
    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.first) < self.keep and text not in self.first:
            self.first.append(text)


@dataclass(frozen=True, slots=True)
class Failed:
    """A worker's exception, as its traceback."""

    traceback: str


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` towards ``wanted`` (capped by the hard limit); return
    the (soft, hard) limits now in force. Subprocesses started afterwards inherit them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when available (a cheaper client), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


Work = Callable[[J, Connection, Connection], Coroutine[Any, Any, None]]


def run_worker(work: Work[J], job: J, inbox: Connection, outbox: Connection) -> None:
    """Entry point of a worker process: ``work(job, inbox, outbox)`` with every file
    descriptor the hard limit allows; an exception goes to the parent as :class:`Failed`."""
    raise_fd_limit(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    try:
        run_loop(work(job, inbox, outbox))
    except BaseException:
        with contextlib.suppress(OSError):
            outbox.send(Failed(traceback.format_exc()))
    finally:
        inbox.close()
        outbox.close()


# -- the parent's side -----------------------------------------------------------------------


def reap(processes: Iterable[BaseProcess], timeout: float) -> None:
    """Join each process, terminating (then killing) one that outlives ``timeout``."""
    for process in processes:
        process.join(timeout=timeout)
        if process.is_alive():
            process.terminate()
            process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


#: What :meth:`Workers.receive` returns once a worker has closed its outbox (it exited).
GONE = object()


class Workers(Generic[J]):
    """One worker process per job, each running ``work``; a context manager that starts them
    and always reaps them (waiting ``reap_timeout`` seconds after a clean exit from the
    block, one second after an exception)."""

    def __init__(self, work: Work[J], jobs: Sequence[J], reap_timeout: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []  # from the workers
        self._commands: list[Connection] = []  # to the workers
        self._children: list[Connection] = []
        self.processes: list[BaseProcess] = []
        self._reap_timeout = reap_timeout
        for job in jobs:
            outbox_end, worker_outbox = context.Pipe(duplex=False)
            worker_inbox, command_end = context.Pipe(duplex=False)
            self.pipes.append(outbox_end)
            self._commands.append(command_end)
            self._children += [worker_inbox, worker_outbox]
            self.processes.append(
                context.Process(
                    target=run_worker, args=(work, job, worker_inbox, worker_outbox), daemon=True
                )
            )

    def __enter__(self) -> Self:
        for process in self.processes:
            process.start()
        for child_end in self._children:
            child_end.close()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback_: TracebackType | None,
    ) -> None:
        reap(self.processes, self._reap_timeout if exc is None else 1)
        for pipe in (*self.pipes, *self._commands):
            pipe.close()

    def send_all(self, message: Any) -> None:
        """``message`` to every worker (one that is gone is reported by the next read)."""
        for pipe in self._commands:
            with contextlib.suppress(OSError):
                pipe.send(message)

    def receive(self, index: int) -> Any:
        """Worker ``index``'s next message (waiting for it), or :data:`GONE` once it has
        closed its end; raises RuntimeError with its traceback if it sent :class:`Failed`."""
        try:
            message = self.pipes[index].recv()
        except EOFError:
            return GONE
        if isinstance(message, Failed):
            raise RuntimeError(f"worker {index} failed:\n{message.traceback}")
        return message

    def died(self, index: int) -> RuntimeError:
        """The error for worker ``index`` gone without its due message."""
        process = self.processes[index]
        process.join(timeout=5)
        return RuntimeError(
            f"worker {index} (pid {process.pid}) died, exit code {process.exitcode}"
        )

    def gather(self, timeout: float) -> list[Any]:
        """One message from every worker, in worker order, within ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        messages = []
        for index, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"worker {index} silent for {timeout:.0f}s")
            message = self.receive(index)
            if message is GONE:
                raise self.died(index)
            messages.append(message)
        return messages
