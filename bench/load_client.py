"""Client worker processes of the load harness (:mod:`bench.load`).

Each worker process runs one event loop (uvloop when installed) with a share of the simulated
clients, each client a task of its own over a real WebSocket to the registry:

* a **device** registers (``metadata.platform`` and a small ``metadata.system_info``), sends a
  heartbeat every ``heartbeat_interval`` seconds and answers every ``command`` with
  ``command_results`` (``prev_response_id`` = the command's ``response_id``);
* a **constellation** registers with ``target_id`` = one of the worker's devices, heartbeats
  like the UFO constellation client (``client_type`` left at ``"device"``), and during the
  steady phase sends one ``task`` at a time to its device (``session_id`` =
  ``"<task_name>@<n>"``), waits for the ack and then the ``task_end`` of that session;
* **churn**: during the steady phase a scheduler asks ``churn`` times the worker's clients
  per minute, chosen at random among those online, to disconnect (a clean close, or for
  ``abrupt_fraction`` of them an aborted TCP connection) and register again with the same id.

Every client keeps a tally of what it saw (registrations acknowledged, refused or unanswered;
the close code the server must have recorded for each of its disconnects; every session it
started and how it ended), which :mod:`bench.load` reconciles with the database.

Phases, driven by the parent over a pipe: ramp (register everything, report :class:`RampDone`),
steady (from :class:`Start` until its ``end_at``), drain (no new tasks, no churn, in-flight
sessions finish, :class:`Drained`), close (on :data:`CLOSE`: every client closes cleanly,
:class:`Final`). :class:`Progress` goes to the parent every second. Every network operation is
bounded by a timeout and the whole worker by ``WorkerJob.deadline`` (wall clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from bench.client import CLOSE, Errors, heartbeat_frame, is_ack, open_websocket, register_frame

Role = Literal["device", "constellation"]
Phase = Literal["ramp", "steady", "drain", "close"]

PROGRESS_SECONDS = 1.0
CLOSE_CONCURRENCY = 100
MAX_ERRORS = 8
RETRY_DELAY = 0.5  # first back-off after a failed registration, doubled up to RETRY_MAX
RETRY_MAX = 5.0

#: The expected close code of a disconnect whose outcome the client could not observe.
UNKNOWN_CLOSE = -1


# -- messages between the parent and a worker ------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerJob:
    """One worker's share of the clients and how they behave."""

    index: int
    url: str
    devices: tuple[str, ...]
    constellations: tuple[tuple[str, str], ...]  # (constellation id, its target device id)
    churn: float  # fraction of the worker's clients churned per minute
    heartbeat_interval: float
    task_interval: float
    abrupt_fraction: float
    reconnect_delay: float  # offline after a churn disconnect: uniform in [delay/10, delay]
    command_delay: float  # a device "works" uniform(0, delay) seconds before its results
    ramp_concurrency: int
    compression: bool
    timeout: float  # one network operation: connect + register, a task's ack, a close
    session_timeout: float  # a session's task_end after its ack
    ramp_timeout: float
    drain_timeout: float
    deadline: float  # wall clock: the worker gives up on everything after this
    seed: int


@dataclass(frozen=True, slots=True)
class Start:
    """Begin the steady phase now; it ends at ``end_at`` (wall clock)."""

    end_at: float


@dataclass(frozen=True, slots=True)
class Progress:
    worker: int
    phase: Phase
    devices_online: int
    constellations_online: int
    registrations: int
    round_trips: int


@dataclass(frozen=True, slots=True)
class RampDone:
    worker: int
    seconds: float
    registered: int  # clients registered at least once
    missing: int  # clients that could not register within the ramp timeout


@dataclass(frozen=True, slots=True)
class Drained:
    worker: int
    seconds: float
    in_flight: int  # sessions still awaiting their task_end at the drain timeout
    offline: int  # clients not online at the end of the drain
    steady_cpu: float  # the worker's CPU seconds during the steady phase


@dataclass(slots=True)
class ClientTally:
    """What one client id saw, for the reconciliation with the ``connections`` table."""

    role: Role
    acked: int = 0  # registrations acknowledged: one connection row each
    ambiguous: int = 0  # register sent, no definite answer: a row may or may not exist
    refused: Counter[str] = field(default_factory=Counter)  # error answers: no row
    connect_failed: int = 0  # no WebSocket at all: no row
    closes: Counter[int] = field(default_factory=Counter)  # close code the server should record


@dataclass(slots=True)
class Final:
    """Everything a worker measured and saw."""

    worker: int
    clients: dict[str, ClientTally]
    #: session id -> outcome: completed | failed (task_end status), abandoned (its owner was
    #: disconnected before the task_end), lost (no task_end in time), unacked (sent, but the
    #: connection went before an answer), sent (still waiting at the end).
    sessions: dict[str, str]
    task_refusals: Counter[str]
    registration_latency: dict[str, list[float]]  # per phase, seconds connect -> ack
    registration_at: dict[str, int]  # registrations acknowledged per phase
    session_latency: dict[str, list[float]]  # per task_end status, seconds task -> task_end
    round_trips: dict[str, int]  # task_end received per phase
    heartbeat_latency: list[float]
    commands: int  # command frames received by devices
    command_results: int  # command_results sent
    device_task_ends: int  # task_end frames devices received (constellation sessions)
    churn_clean: int
    churn_abrupt: int
    server_closes: Counter[int]  # disconnects the server initiated, by close code
    errors: list[str]
    cpu_seconds: float
    loop_lag: list[float]  # the worker's event loop, oversleep of a 50 ms tick (steady phase)
    gc_pauses: list[float]  # the worker's full collections in the steady phase, seconds


# -- frames --------------------------------------------------------------------------------


def task_frame(client_id: str, target: str, task_name: str, session_id: str) -> str:
    return json.dumps(
        {
            "type": "task",
            "status": "continue",
            "client_type": "constellation",
            "client_id": client_id,
            "target_id": target,
            "task_name": task_name,
            "session_id": session_id,
            "request": f"load test task {session_id}",
        }
    )


def results_frame(client_id: str, command: dict[str, Any]) -> str:
    actions = command.get("actions") or [{}]
    return json.dumps(
        {
            "type": "command_results",
            "status": "continue",
            "client_type": "device",
            "client_id": client_id,
            "session_id": command.get("session_id"),
            "prev_response_id": command.get("response_id"),
            "action_results": [
                {"status": "success", "result": "done", "call_id": action.get("call_id")}
                for action in actions
            ],
        }
    )


def refusal_kind(text: str) -> str:
    if "already registered" in text:
        return "duplicate_id"
    if "is not connected" in text:
        return "target_offline"
    return "other"


# -- one simulated client ------------------------------------------------------------------


class Client:
    """One client id: registers, serves its connection, reconnects after churn."""

    def __init__(self, worker: Worker, client_id: str, role: Role, target: str | None) -> None:
        self.worker = worker
        self.client_id = client_id
        self.role: Role = role
        self.target = target
        self.tally = ClientTally(role)
        self.online = asyncio.Event()
        self.registered_once = asyncio.Event()
        self.churn = asyncio.Event()
        self.task_number = 0
        self._beats: deque[float] = deque()
        self._ack: tuple[str, asyncio.Future[str | None]] | None = None
        self._ends: dict[str, asyncio.Future[str]] = {}
        self._current: str | None = None  # the session in flight
        self._answers: set[asyncio.Task[None]] = set()  # delayed command_results

    # -- the client's life

    async def life(self) -> None:
        worker = self.worker
        delay = RETRY_DELAY
        while not worker.stopping.is_set():
            if self.role == "constellation" and self.target is not None:
                target = worker.clients[self.target]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(worker.job.timeout):
                        await target.online.wait()
            websocket = await self.register()
            if websocket is None:
                await worker.pause(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_DELAY
            reason = await self.serve(websocket)
            if reason == "churn":
                offline = worker.job.reconnect_delay
                await worker.pause(random.uniform(offline / 10, offline))
            elif reason == "server":
                await worker.pause(RETRY_DELAY)

    async def register(self) -> ClientConnection | None:
        worker, job, tally = self.worker, self.worker.job, self.tally
        async with worker.gate:
            if worker.stopping.is_set():
                return None
            phase = worker.phase
            started = time.perf_counter()
            try:
                async with asyncio.timeout(job.timeout):
                    websocket = await open_websocket(
                        job.url, compression=job.compression, wait=job.timeout, max_size=None
                    )
            except Exception as exc:
                tally.connect_failed += 1
                worker.error(f"connect: {type(exc).__name__}: {exc}")
                return None
            try:
                async with asyncio.timeout(job.timeout):
                    await websocket.send(self._register_frame())
                    frame = await websocket.recv()
                answer = json.loads(frame)
            except Exception as exc:
                tally.ambiguous += 1
                worker.error(f"register: {type(exc).__name__}: {exc}")
                websocket.transport.abort()
                return None
            if is_ack(answer):
                elapsed = time.perf_counter() - started
                tally.acked += 1
                worker.registration_latency.setdefault(phase, []).append(elapsed)
                worker.registration_at[phase] += 1
                worker.registrations += 1
                self.registered_once.set()
                return websocket
            text = str(answer.get("error"))
            if "could not be recorded" in text:
                tally.ambiguous += 1  # the server wrote the row, then closed it
            else:
                tally.refused[refusal_kind(text)] += 1
            if refusal_kind(text) == "other":
                worker.error(f"registration refused: {text}")
            await self._close(websocket)
            return None

    def _register_frame(self) -> str:
        """Devices register with their system information, constellations with their target."""
        system_info = self.role == "device"
        return register_frame(
            self.client_id, self.role, system_info=system_info, target_id=self.target
        )

    async def serve(self, websocket: ClientConnection) -> str:
        """Serve one registered connection until churn, the end of the run or the server
        closes it; returns which of ``churn``, ``stop`` or ``server``."""
        worker = self.worker
        worker.online[self.role] += 1
        self.online.set()
        reader = asyncio.create_task(self._read(websocket))
        helpers = [asyncio.create_task(self._heartbeats(websocket))]
        if self.role == "constellation":
            helpers.append(asyncio.create_task(self._tasks(websocket)))
        churned = asyncio.create_task(self.churn.wait())
        stopping = asyncio.create_task(worker.stopping.wait())
        try:
            await asyncio.wait({reader, churned, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.online.clear()
            worker.online[self.role] -= 1
            for task in (*helpers, churned, stopping):
                task.cancel()
            await asyncio.gather(*helpers, churned, stopping, return_exceptions=True)
        self.churn.clear()
        if reader.done() and reader.exception() is not None:
            reason = "server"  # a bug of this client: say so, leave cleanly, carry on
            worker.error(f"reader of {self.role} failed: {reader.exception()!r}")
            self.tally.closes[await self._close(websocket)] += 1
        elif reader.done():
            reason = "server"
            received = websocket.protocol.close_rcvd
            code = received.code if received is not None else 1006
            self.tally.closes[code] += 1
            worker.server_closes[code] += 1
        elif worker.stopping.is_set():
            reason = "stop"
            async with worker.close_gate:
                self.tally.closes[await self._close(websocket)] += 1
        else:
            reason = "churn"
            if random.random() < worker.job.abrupt_fraction:
                worker.churn_abrupt += 1
                websocket.transport.abort()  # no close frame: recorded as connection_lost
                self.tally.closes[1006] += 1
            else:
                worker.churn_clean += 1
                self.tally.closes[await self._close(websocket)] += 1
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(worker.job.timeout):
                await asyncio.gather(reader, return_exceptions=True)
        reader.cancel()
        answers = list(self._answers)
        for answer in answers:
            answer.cancel()
        await asyncio.gather(*answers, return_exceptions=True)
        self._give_up_sessions()
        return reason

    async def _close(self, websocket: ClientConnection) -> int:
        """Close cleanly; the code the server should record (1000, or what it sent first)."""
        try:
            async with asyncio.timeout(self.worker.job.timeout):
                await websocket.close()
        except Exception as exc:
            self.worker.error(f"close: {type(exc).__name__}: {exc}")
            websocket.transport.abort()
            return UNKNOWN_CLOSE
        protocol = websocket.protocol
        sent, received = protocol.close_sent, protocol.close_rcvd
        if protocol.close_rcvd_then_sent and received is not None:
            return received.code  # the server closed first
        return sent.code if sent is not None else UNKNOWN_CLOSE

    def _give_up_sessions(self) -> None:
        """The connection is gone: the session in flight (if any) will get no answer here."""
        sessions = self.worker.sessions
        if self._current is not None:
            state = sessions.get(self._current)
            if state == "sent":
                sessions[self._current] = "unacked"
            elif state == "acked":
                sessions[self._current] = "abandoned"
        self._current = None
        self._ack = None
        self._ends.clear()
        self._beats.clear()

    # -- the connection's tasks

    async def _read(self, websocket: ClientConnection) -> None:
        worker = self.worker
        try:
            async for frame in websocket:
                message = json.loads(frame)
                kind = message.get("type")
                session_id = message.get("session_id")
                if kind == "heartbeat":
                    if session_id is None:
                        if self._beats:
                            worker.heartbeat_latency.append(
                                time.perf_counter() - self._beats.popleft()
                            )
                    elif self._ack is not None and self._ack[0] == session_id:
                        self._ack[1].set_result(None)
                elif kind == "command" and self.role == "device":
                    worker.commands += 1
                    if worker.job.command_delay > 0:
                        answer = asyncio.create_task(self._answer_later(websocket, message))
                        self._answers.add(answer)
                        answer.add_done_callback(self._answers.discard)
                    else:
                        await websocket.send(results_frame(self.client_id, message))
                        worker.command_results += 1
                elif kind == "task_end":
                    if self.role == "device":
                        worker.device_task_ends += 1
                        continue
                    future = self._ends.get(session_id)
                    if future is not None and not future.done():
                        future.set_result(str(message.get("status")))
                    else:
                        worker.error(f"task_end for an unknown session {session_id}")
                elif kind == "error":
                    text = str(message.get("error"))
                    if self._ack is not None and not self._ack[1].done():
                        self._ack[1].set_result(text)
                    else:
                        worker.error(f"error frame to {self.role}: {text}")
                else:
                    worker.error(f"unexpected {kind} frame to {self.role}")
        except ConnectionClosed:
            pass

    async def _answer_later(self, websocket: ClientConnection, command: dict[str, Any]) -> None:
        await asyncio.sleep(random.uniform(0, self.worker.job.command_delay))
        with contextlib.suppress(ConnectionClosed):
            await websocket.send(results_frame(self.client_id, command))
            self.worker.command_results += 1

    async def _heartbeats(self, websocket: ClientConnection) -> None:
        interval = self.worker.job.heartbeat_interval
        frame = heartbeat_frame(self.client_id)
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            self._beats.append(time.perf_counter())
            await websocket.send(frame)
            await asyncio.sleep(interval)

    async def _tasks(self, websocket: ClientConnection) -> None:
        """One task at a time: send, await the ack (or a refusal), await the task_end."""
        worker, job = self.worker, self.worker.job
        assert self.target is not None
        await worker.tasks_go.wait()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(random.uniform(0.5, 1.5) * job.task_interval)
            if worker.tasks_stop.is_set():
                return
            self.task_number += 1
            task_name = f"{self.client_id}.t{self.task_number}"
            session_id = f"{task_name}@{self.task_number}"
            acked: asyncio.Future[str | None] = loop.create_future()
            ended: asyncio.Future[str] = loop.create_future()
            self._current = session_id
            self._ack = (session_id, acked)
            self._ends[session_id] = ended
            worker.sessions[session_id] = "sent"
            phase = worker.phase
            started = time.perf_counter()
            await websocket.send(task_frame(self.client_id, self.target, task_name, session_id))
            outcome = await self._await_session(session_id, acked, ended)
            self._current = self._ack = None
            self._ends.pop(session_id, None)
            if outcome is None:
                continue
            elapsed = time.perf_counter() - started
            worker.sessions[session_id] = outcome
            worker.session_latency.setdefault(outcome, []).append(elapsed)
            worker.round_trips[phase] += 1
            worker.round_trip_count += 1

    async def _await_session(
        self, session_id: str, acked: asyncio.Future[str | None], ended: asyncio.Future[str]
    ) -> str | None:
        """The task_end status, or None (refused, or no answer in time: recorded here)."""
        worker, job = self.worker, self.worker.job
        try:
            async with asyncio.timeout(job.timeout):
                refusal = await acked
        except TimeoutError:
            worker.sessions[session_id] = "unacked"
            worker.error(f"no ack for task {session_id}")
            return None
        if refusal is not None:
            del worker.sessions[session_id]  # refused: no session
            worker.task_refusals[refusal_kind(refusal)] += 1
            if refusal_kind(refusal) == "other":
                worker.error(f"task refused: {refusal}")
            return None
        worker.sessions[session_id] = "acked"
        try:
            async with asyncio.timeout(job.session_timeout):
                return await ended
        except TimeoutError:
            worker.sessions[session_id] = "lost"
            worker.error(f"no task_end for {session_id} in {job.session_timeout:g}s")
            return None


# -- the worker ----------------------------------------------------------------------------


class Worker:
    def __init__(self, job: WorkerJob, inbox: Connection, outbox: Connection) -> None:
        self.job = job
        self.pipe = inbox
        self.outbox = outbox
        self.phase: Phase = "ramp"
        self.gate = asyncio.Semaphore(job.ramp_concurrency)
        self.close_gate = asyncio.Semaphore(CLOSE_CONCURRENCY)
        self.stopping = asyncio.Event()
        self.tasks_go = asyncio.Event()
        self.tasks_stop = asyncio.Event()
        self.online: Counter[str] = Counter()
        self.registrations = 0
        self.round_trip_count = 0
        self.registration_latency: dict[str, list[float]] = {}
        self.registration_at: Counter[str] = Counter()
        self.session_latency: dict[str, list[float]] = {}
        self.round_trips: Counter[str] = Counter()
        self.heartbeat_latency: list[float] = []
        self.sessions: dict[str, str] = {}
        self.task_refusals: Counter[str] = Counter()
        self.server_closes: Counter[int] = Counter()
        self.commands = self.command_results = self.device_task_ends = 0
        self.churn_clean = self.churn_abrupt = 0
        self.errors = Errors(MAX_ERRORS)
        self.loop_lag: list[float] = []
        self.gc_pauses: list[float] = []
        self._gc_started = 0.0
        self.clients: dict[str, Client] = {}
        for device_id in job.devices:
            self.clients[device_id] = Client(self, device_id, "device", None)
        for constellation_id, target in job.constellations:
            self.clients[constellation_id] = Client(self, constellation_id, "constellation", target)
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()

    def error(self, text: str) -> None:
        self.errors.add(text)

    async def pause(self, seconds: float) -> None:
        """Sleep, but wake up when the run is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()

    def send(self, message: Any) -> None:
        self.outbox.send(message)

    async def receive(self, seconds: float) -> Any:
        async with asyncio.timeout(seconds):
            return await self._inbox.get()

    def _readable(self) -> None:
        while self.pipe.poll():
            try:
                self._inbox.put_nowait(self.pipe.recv())
            except EOFError:
                self._inbox.put_nowait(CLOSE)  # the parent is gone: wind down
                asyncio.get_running_loop().remove_reader(self.pipe.fileno())
                return

    async def _report(self) -> None:
        while True:
            self.send(
                Progress(
                    self.job.index,
                    self.phase,
                    self.online["device"],
                    self.online["constellation"],
                    self.registrations,
                    self.round_trip_count,
                )
            )
            await asyncio.sleep(PROGRESS_SECONDS)

    async def _lag(self, tick: float = 0.05) -> None:
        """How late this worker's loop wakes up (client-side stalls inflate every latency)."""
        while True:
            started = time.perf_counter()
            await asyncio.sleep(tick)
            if self.phase == "steady":
                self.loop_lag.append(time.perf_counter() - started - tick)

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self.phase == "steady":
            self.gc_pauses.append(time.perf_counter() - self._gc_started)

    async def _churn(self, end_at: float) -> None:
        """Ask ``churn`` times the clients per minute, evenly spaced, to leave and come back."""
        clients = list(self.clients.values())
        rate = self.job.churn * len(clients) / 60.0
        if rate <= 0:
            return
        interval = 1.0 / rate
        next_at = time.time() + random.uniform(0, interval)
        while next_at < end_at:
            await asyncio.sleep(max(0.0, next_at - time.time()))
            next_at += interval
            for _ in range(50):  # a random online client not already leaving
                client = random.choice(clients)
                if client.online.is_set() and not client.churn.is_set():
                    client.churn.set()
                    break

    async def run(self) -> None:
        job = self.job
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._readable)
        reporter = asyncio.create_task(self._report())
        lag = asyncio.create_task(self._lag())
        gc.callbacks.append(self._gc)
        lives: list[asyncio.Task[None]] = []
        try:
            started = time.monotonic()
            # Devices first, so that the constellations find their targets online.
            for client in self.clients.values():
                lives.append(asyncio.create_task(client.life(), name=client.client_id))
            waits = [client.registered_once.wait() for client in self.clients.values()]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(job.ramp_timeout):
                    await asyncio.gather(*waits)
            registered = sum(c.registered_once.is_set() for c in self.clients.values())
            gc.freeze()  # the fleet is long-lived: keep it out of full collections
            self.send(
                RampDone(
                    job.index,
                    time.monotonic() - started,
                    registered,
                    len(self.clients) - registered,
                )
            )
            message = await self.receive(max(1.0, job.deadline - time.time()))
            if isinstance(message, Start):
                await self._steady(message.end_at)
                message = await self.receive(max(1.0, job.deadline - time.time()))
            if message != CLOSE:
                raise RuntimeError(f"expected {CLOSE!r}, got {message!r}")
            self.phase = "close"
            self.stopping.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(job.timeout * 3, 30.0)):
                    await asyncio.gather(*lives, return_exceptions=True)
        finally:
            for task in lives:
                task.cancel()
            await asyncio.gather(*lives, return_exceptions=True)
            reporter.cancel()
            lag.cancel()
            await asyncio.gather(reporter, lag, return_exceptions=True)
            gc.callbacks.remove(self._gc)
            loop.remove_reader(self.pipe.fileno())
        self.send(self.final())

    async def _steady(self, end_at: float) -> None:
        job = self.job
        self.phase = "steady"
        self.tasks_go.set()
        cpu_started = time.process_time()
        churn = asyncio.create_task(self._churn(end_at))
        await asyncio.sleep(max(0.0, end_at - time.time()))
        steady_cpu = time.process_time() - cpu_started
        self.phase = "drain"
        self.tasks_stop.set()
        churn.cancel()
        await asyncio.gather(churn, return_exceptions=True)
        drain_started = time.monotonic()
        deadline = drain_started + job.drain_timeout
        while time.monotonic() < deadline:
            waiting = self._in_flight()
            offline = sum(not client.online.is_set() for client in self.clients.values())
            if not waiting and not offline:
                break
            await asyncio.sleep(0.2)
        offline = sum(not client.online.is_set() for client in self.clients.values())
        drained = time.monotonic() - drain_started
        self.send(Drained(job.index, drained, self._in_flight(), offline, steady_cpu))

    def _in_flight(self) -> int:
        return sum(state in ("sent", "acked") for state in self.sessions.values())

    def final(self) -> Final:
        return Final(
            worker=self.job.index,
            clients={client_id: client.tally for client_id, client in self.clients.items()},
            sessions=dict(self.sessions),
            task_refusals=self.task_refusals,
            registration_latency=self.registration_latency,
            registration_at=dict(self.registration_at),
            session_latency=self.session_latency,
            round_trips=dict(self.round_trips),
            heartbeat_latency=self.heartbeat_latency,
            commands=self.commands,
            command_results=self.command_results,
            device_task_ends=self.device_task_ends,
            churn_clean=self.churn_clean,
            churn_abrupt=self.churn_abrupt,
            server_closes=self.server_closes,
            errors=[*self.errors.first, f"({self.errors.count} client errors in all)"]
            if self.errors.count
            else [],
            cpu_seconds=time.process_time(),
            loop_lag=self.loop_lag,
            gc_pauses=self.gc_pauses,
        )


async def work(job: WorkerJob, inbox: Connection, outbox: Connection) -> None:
    random.seed(job.seed)
    async with asyncio.timeout(max(1.0, job.deadline - time.time())):
        await Worker(job, inbox, outbox).run()


def split_clients(
    devices: Sequence[str], constellations: Sequence[str], workers: int
) -> list[tuple[tuple[str, ...], tuple[tuple[str, str], ...]]]:
    """Devices round-robin over the workers; constellation ``i`` targets device ``i * step``
    (distinct devices, spread over the fleet) and runs in the same worker as its target."""
    shares: list[tuple[list[str], list[tuple[str, str]]]] = [([], []) for _ in range(workers)]
    for index, device_id in enumerate(devices):
        shares[index % workers][0].append(device_id)
    step = max(1, len(devices) // max(1, len(constellations)))
    for index, constellation_id in enumerate(constellations):
        target_index = (index * step) % len(devices)
        shares[target_index % workers][1].append((constellation_id, devices[target_index]))
    return [(tuple(d), tuple(c)) for d, c in shares]
