"""Sessions: the runner interface the embedding application implements, and the plumbing the
server gives it (commands to the executor, results by ``response_id``, ``task_end`` at the end).

A *runner* is the application's agent loop. For each accepted task the server calls
``await runner.run(context)``; the runner drives the executing device with
``await context.send_command(actions)`` and returns a :class:`SessionOutcome`. When a client
reconnects after a server restart, each session it owned that the restart interrupted is handed
to ``await runner.resume(context)``. :class:`RelayRunner`, the default, relays the request to the
device as one command round trip and ends interrupted sessions as failed.

A task dispatched over the HTTP API (:meth:`SessionManager.dispatch`) is a session owned and run
by the device it is sent to: recorded at once, it starts once the device takes it up with a
``task`` request of its own, as UFO's device client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from registry.errors import RegistryError
from registry.registry import Registry
from registry.server.durability import settle
from registry.server.peer import Peer
from registry.server.protocol import (
    ClientMessage,
    Command,
    Result,
    ResultStatus,
    ServerMessage,
    ServerMessageType,
    TaskStatus,
)
from registry.types import SessionState

logger = logging.getLogger(__name__)

DEVICE_DISCONNECTED = "Task was cancelled because target device disconnected"
NOT_TAKEN_UP = "device '{device}' did not take up the dispatched task within {seconds:g}s"
REQUESTER_DISCONNECTED = "Task was cancelled because the requester disconnected"
SERVER_RESTARTED = "server restarted"
TASK_RESULTS_KEPT = 10_000


class SessionError(RegistryError):
    """A session could not go on (its executor left, or a command timed out)."""


@dataclass(frozen=True, slots=True)
class SessionOutcome:
    """How a session ended: ``completed`` or ``failed``, with a result and/or an error."""

    status: TaskStatus
    result: Any = None
    error: str | None = None


@dataclass(slots=True)
class SessionContext:
    """One session as its runner sees it."""

    session_id: str
    task_name: str
    request: str | None
    owner_id: str
    executor_id: str
    _manager: SessionManager = field(repr=False)

    @property
    def from_constellation(self) -> bool:
        return self.owner_id != self.executor_id

    async def send_command(
        self,
        actions: list[Command],
        *,
        result_timeout: float | None = None,
        agent_name: str | None = None,
        process_name: str | None = None,
        root_name: str | None = None,
        user_request: str | None = None,
    ) -> list[Result]:
        """Send ``actions`` to the executor as one ``command`` frame and return its
        ``command_results``. Raises :class:`SessionError` if the executor is gone or does not
        answer within ``result_timeout`` (default: the server's ``command_timeout``).

        ``agent_name``, ``process_name`` and ``root_name`` go in the frame as they are: UFO's
        device client picks the tool set it runs ``actions`` with by them (and answers nothing
        for an action that set does not have). ``user_request`` is the frame's request text."""
        message = ServerMessage(
            type=ServerMessageType.COMMAND,
            status=TaskStatus.CONTINUE,
            user_request=user_request,
            agent_name=agent_name,
            process_name=process_name,
            root_name=root_name,
            actions=actions,
            session_id=self.session_id,
            task_name=self.task_name,
        )
        return await self._manager.command(self, message, result_timeout)


class SessionRunner(Protocol):
    """The embedding application's agent loop."""

    async def run(self, context: SessionContext) -> SessionOutcome:
        """Drive one session to its end."""
        ...

    async def resume(self, context: SessionContext) -> SessionOutcome:
        """Resume or end a session a server restart interrupted, when its owner is back."""
        ...


class RelayRunner:
    """Relays the request to the executing device as one ``command`` that calls no tool (the
    request in its ``user_request``) and ends the session with what the device answered:
    ``failed`` if a result failed, else ``completed`` with the results. Every AIP device answers
    it, whatever tools it has: UFO's device client answers a command without actions at once,
    with no results (it runs no agent loop of its own; a UFO deployment serves with a runner that
    drives its tools). Interrupted sessions end ``failed``."""

    async def run(self, context: SessionContext) -> SessionOutcome:
        results = await context.send_command([], user_request=context.request)
        payload = [result.model_dump() for result in results]
        failures = [result for result in results if result.status is ResultStatus.FAILURE]
        if failures:
            return SessionOutcome(TaskStatus.FAILED, payload, failures[0].error or "failed")
        return SessionOutcome(TaskStatus.COMPLETED, payload)

    async def resume(self, context: SessionContext) -> SessionOutcome:
        return SessionOutcome(TaskStatus.FAILED, error=SERVER_RESTARTED)


@dataclass(frozen=True, slots=True)
class _Ending:
    """A session to end: how, in which state, and whether its executor hears of it too."""

    context: SessionContext
    outcome: SessionOutcome
    state: SessionState
    notify_executor: bool


@dataclass(slots=True)
class _Pending:
    session_id: str
    executor_id: str
    future: asyncio.Future[list[Result]]


class SessionManager:
    """Runs sessions as tasks, routes ``command_results`` back, and ends sessions exactly once.

    Every session change goes through the registry, so it is persisted and audited; a session's
    end is announced once it is durable, or after ``store_timeout`` seconds if the store is not
    keeping up (it stays journalled: the result is not held back by an outage).
    """

    def __init__(
        self,
        registry: Registry,
        runner: SessionRunner,
        command_timeout: float,
        store_timeout: float,
    ) -> None:
        self._registry = registry
        self._runner = runner
        self._command_timeout = command_timeout
        self._store_timeout = store_timeout
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._contexts: dict[str, SessionContext] = {}
        self._pending: dict[str, _Pending] = {}
        self._owned: dict[str, set[str]] = {}
        #: Dispatched sessions waiting for their device to take them up (oldest first).
        self._untaken: dict[str, asyncio.Future[None]] = {}
        #: task name -> final result, for /api/task_result (bounded, oldest dropped).
        self.results: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def is_running(self, session_id: str) -> bool:
        return session_id in self._contexts

    def active_count(self, owner_id: str) -> int:
        return len(self._owned.get(owner_id, ()))

    def _peer(self, client_id: str) -> Peer | None:
        return cast(Peer | None, self._registry.get_client(client_id))

    def start(self, context: SessionContext) -> None:
        """Run ``context`` with the runner in a task of its own."""
        self._launch(context, resume=False)

    def _launch(
        self,
        context: SessionContext,
        *,
        resume: bool,
        taken_up: asyncio.Future[None] | None = None,
    ) -> None:
        self._contexts[context.session_id] = context
        self._owned.setdefault(context.owner_id, set()).add(context.session_id)
        self._tasks[context.session_id] = asyncio.get_running_loop().create_task(
            self._run(context, resume=resume, taken_up=taken_up),
            name=f"session-{context.session_id}",
        )

    async def dispatch(self, device_id: str, task_name: str, request: str) -> str | None:
        """Record a session of ``task_name`` owned and run by ``device_id`` (a task dispatched
        to it over the HTTP API), send the device its ``task`` frame and return the session
        id; the session runs once the device takes it up (:meth:`dispatched_to`), or fails if
        it does not within ``command_timeout``. None if the device is gone before the frame is
        sent (the session then ends ``failed``).

        Raises what :meth:`Registry.open_session` raises, and TimeoutError when the session is
        not durable within ``store_timeout`` (then it is not dispatched)."""
        session_id = str(uuid.uuid4())
        async with asyncio.timeout(self._store_timeout):
            await self._registry.open_session(
                session_id, owner_id=device_id, executor_id=device_id, task_name=task_name
            )
        context = self.context(session_id, task_name, request, device_id, device_id)
        taken_up: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Waiting before the frame goes out: the device may answer it at once.
        self._untaken[session_id] = taken_up
        self._launch(context, resume=False, taken_up=taken_up)
        peer = self._peer(device_id)
        sent = peer is not None and await peer.send(
            ServerMessage(
                type=ServerMessageType.TASK,
                status=TaskStatus.CONTINUE,
                user_request=request,
                task_name=task_name,
                session_id=session_id,
                response_id=str(uuid.uuid4()),
            )
        )
        if not sent:
            await self.executor_left(device_id, [session_id])
            return None
        return session_id

    def dispatched_to(self, device_id: str, session_id: str | None, task_name: str) -> str | None:
        """The dispatched session a ``task`` request of ``device_id`` takes up, if any: the
        one of ``session_id``, or, for a request that names no session (UFO's device client
        names none), the oldest not yet taken up of ``task_name``."""
        for candidate, taken_up in self._untaken.items():
            context = self._contexts.get(candidate)
            if (
                context is not None
                and not taken_up.done()
                and context.executor_id == device_id
                and (
                    candidate == session_id
                    if session_id is not None
                    else context.task_name == task_name
                )
            ):
                return candidate
        return None

    def take_up(self, session_id: str) -> None:
        """Start the runner on a dispatched session its device has taken up (once acked)."""
        taken_up = self._untaken.get(session_id)
        if taken_up is not None and not taken_up.done():
            taken_up.set_result(None)

    async def _taken_up(self, context: SessionContext, taken_up: asyncio.Future[None]) -> None:
        try:
            async with asyncio.timeout(self._command_timeout):
                await taken_up
        except TimeoutError:
            raise SessionError(
                NOT_TAKEN_UP.format(device=context.executor_id, seconds=self._command_timeout)
            ) from None
        finally:
            self._untaken.pop(context.session_id, None)

    def context(
        self,
        session_id: str,
        task_name: str,
        request: str | None,
        owner_id: str,
        executor_id: str,
    ) -> SessionContext:
        return SessionContext(session_id, task_name, request, owner_id, executor_id, self)

    async def _run(
        self,
        context: SessionContext,
        *,
        resume: bool,
        taken_up: asyncio.Future[None] | None,
    ) -> None:
        try:
            if taken_up is not None:
                await self._taken_up(context, taken_up)
            if resume:
                outcome = await self._runner.resume(context)
            else:
                outcome = await self._runner.run(context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("session %s failed in its runner: %s", context.session_id, exc)
            outcome = SessionOutcome(TaskStatus.FAILED, error=str(exc) or type(exc).__name__)
        await self._finish(context, outcome, notify_executor=context.from_constellation)

    def _claim(self, session_id: str) -> SessionContext | None:
        """Take a session out of the running set; only the first caller gets it."""
        context = self._contexts.pop(session_id, None)
        if context is not None:
            owned = self._owned.get(context.owner_id)
            if owned is not None:
                owned.discard(session_id)
                if not owned:
                    del self._owned[context.owner_id]
        return context

    async def _finish(
        self, context: SessionContext, outcome: SessionOutcome, *, notify_executor: bool
    ) -> None:
        if self._claim(context.session_id) is None:
            return  # ended already by a disconnect
        self._tasks.pop(context.session_id, None)
        state = (
            SessionState.COMPLETED
            if outcome.status is TaskStatus.COMPLETED
            else SessionState.FAILED
        )
        await self._end([_Ending(context, outcome, state, notify_executor)])

    async def _end(self, endings: list[_Ending]) -> None:
        """Record every end, wait (at most ``store_timeout``) for them all to be durable at
        once, then tell each owner (and executor, if asked)."""
        if not endings:
            return
        for ending in endings:
            context, outcome = ending.context, ending.outcome
            self._registry.remove_session(
                context.session_id, state=ending.state, reason=outcome.error
            )
            self.results[context.task_name] = {
                "status": outcome.status.value,
                "result": outcome.result,
                "error": outcome.error,
                "session_id": context.session_id,
            }
            self.results.move_to_end(context.task_name)
        while len(self.results) > TASK_RESULTS_KEPT:
            self.results.popitem(last=False)
        await settle(
            self._registry,
            self._store_timeout,
            f"the end of session(s) {', '.join(e.context.session_id for e in endings)}",
        )
        for ending in endings:
            context, outcome = ending.context, ending.outcome
            message = ServerMessage(
                type=ServerMessageType.TASK_END,
                status=outcome.status,
                session_id=context.session_id,
                task_name=context.task_name,
                result=outcome.result,
                error=outcome.error,
                response_id=str(uuid.uuid4()),
            )
            recipients = [context.owner_id]
            if ending.notify_executor:
                recipients.append(context.executor_id)
            for client_id in recipients:
                peer = self._peer(client_id)
                if peer is not None:
                    await peer.send(message)

    async def command(
        self, context: SessionContext, message: ServerMessage, result_timeout: float | None
    ) -> list[Result]:
        """Send ``message`` (a ``command`` of ``context``) to the executor under a fresh
        ``response_id`` and wait for the ``command_results`` that answer it."""
        peer = self._peer(context.executor_id)
        if peer is None:
            raise SessionError(f"executor '{context.executor_id}' is not connected")
        response_id = str(uuid.uuid4())
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        self._pending[response_id] = _Pending(context.session_id, context.executor_id, future)
        try:
            sent = await peer.send(message.model_copy(update={"response_id": response_id}))
            if not sent:
                raise SessionError(f"executor '{context.executor_id}' is not connected")
            try:
                async with asyncio.timeout(result_timeout or self._command_timeout):
                    return await future
            except TimeoutError:
                raise SessionError(
                    f"no command_results from '{context.executor_id}' within "
                    f"{result_timeout or self._command_timeout:g}s"
                ) from None
        finally:
            self._pending.pop(response_id, None)

    def deliver(self, client_id: str, message: ClientMessage) -> bool:
        """Hand ``command_results`` to the command awaiting them. Results for an unknown
        session or response, or from a client that is not the executor, are dropped."""
        pending = self._pending.get(message.prev_response_id or "")
        if (
            pending is None
            or pending.executor_id != client_id
            or pending.session_id != message.session_id
            or pending.future.done()
        ):
            return False
        pending.future.set_result(list(message.action_results or []))
        return True

    async def _abort(self, endings: list[_Ending]) -> None:
        """End running sessions from outside their tasks: claim each (one that has ended
        already is skipped), cancel its task, then end them all together."""
        claimed: list[_Ending] = []
        for ending in endings:
            session_id = ending.context.session_id
            # The same context, not just the same id: an await below may let one end and a
            # new session of that id start.
            if self._contexts.get(session_id) is not ending.context:
                continue
            self._claim(session_id)
            task = self._tasks.pop(session_id, None)
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            claimed.append(ending)
        await self._end(claimed)

    def executing(self, device_id: str) -> list[str]:
        """The running sessions ``device_id`` executes."""
        return [
            session_id
            for session_id in self._registry.get_device_sessions(device_id)
            if (context := self._contexts.get(session_id)) is not None
            and context.executor_id == device_id
        ]

    def owned(self, owner_id: str) -> list[str]:
        """The running sessions ``owner_id`` requested."""
        return list(self._owned.get(owner_id, ()))

    async def executor_left(self, device_id: str, session_ids: Iterable[str] | None = None) -> None:
        """Fail every session ``device_id`` was executing (or those of ``session_ids``); tell
        each requester."""
        outcome = SessionOutcome(TaskStatus.FAILED, error=DEVICE_DISCONNECTED)
        await self._abort(
            [
                _Ending(context, outcome, SessionState.FAILED, notify_executor=False)
                for session_id in (
                    self.executing(device_id) if session_ids is None else session_ids
                )
                if (context := self._contexts.get(session_id)) is not None
                and context.executor_id == device_id
            ]
        )

    async def owner_left(self, owner_id: str, session_ids: Iterable[str] | None = None) -> None:
        """Cancel every session ``owner_id`` requested (or those of ``session_ids``); tell the
        executing devices."""
        outcome = SessionOutcome(TaskStatus.FAILED, error=REQUESTER_DISCONNECTED)
        await self._abort(
            [
                _Ending(
                    context,
                    outcome,
                    SessionState.CANCELLED,
                    notify_executor=context.from_constellation,
                )
                for session_id in (self.owned(owner_id) if session_ids is None else session_ids)
                if (context := self._contexts.get(session_id)) is not None
                and context.owner_id == owner_id  # else ended meanwhile
            ]
        )

    async def resume_interrupted(self, owner_id: str) -> None:
        """Hand each session of ``owner_id`` that a restart interrupted to the runner, each in
        a task of its own: a runner may drive the owner's own connection (a device's own task),
        whose frames are read only once this has returned."""
        for session in self._registry.get_interrupted_sessions(owner_id):
            if session.session_id in self._contexts:
                continue  # already handed over, on an earlier connection of the same client
            context = self.context(
                session.session_id,
                session.task_name or session.session_id,
                None,
                owner_id,
                session.executor_id or owner_id,
            )
            self._launch(context, resume=True)

    async def close(self) -> None:
        """Cancel every running session task and wait for them."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
