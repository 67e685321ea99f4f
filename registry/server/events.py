"""``GET /api/events``: the registry's changes as Server-Sent Events, read from the audit trail.

Every event is an audit row: its SSE ``id`` is the row's ``event_id``, so a consumer that lost
its stream sends the last id it saw as ``Last-Event-ID`` and gets exactly what it missed,
replayed from the store, before the live events resume.

One :class:`EventFeed` per server reads the rows for every subscriber together: it wakes when
the journal commits (a listener) and about once a second (for rows other nodes or tools
wrote), reads the audit rows after the last one it read, through :class:`~registry.History`,
and hands each to the subscribers that asked for its kind and client. With no subscriber it
reads nothing. A subscriber's buffer is bounded: one that does not keep up is dropped (its
stream ends; it may resume with ``Last-Event-ID``), and nobody else waits for it.

Ordering: events come in ``event_id`` order, which is commit order for one node. With several
nodes on PostgreSQL, ids are handed out before commit, so a row another node commits late
with a lower id than one already read is not sent live (it is in the audit trail).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from registry.audit import AuditKind
from registry.errors import InvalidArgumentError, StoreUnavailableError
from registry.history import MAX_LIMIT, History, encode_cursor
from registry.server.api import API_ERRORS, Text, require_api_key
from registry.types import AuditEvent

logger = logging.getLogger(__name__)

#: The event kinds a consumer can ask for, and the audit kinds each one carries.
KINDS: dict[str, frozenset[str]] = {
    "join": frozenset({AuditKind.CLIENT_REGISTERED}),
    "leave": frozenset(
        {AuditKind.CLIENT_REMOVED, AuditKind.CLIENT_REPLACED, AuditKind.CONNECTION_RECOVERED}
    ),
    "session_start": frozenset({AuditKind.SESSION_OPENED}),
    "session_end": frozenset({AuditKind.SESSION_ENDED, AuditKind.SESSION_INTERRUPTED}),
    "device_info": frozenset({AuditKind.DEVICE_INFO_CHANGED}),
}
_EVENT_KIND = {audit: kind for kind, audits in KINDS.items() for audit in audits}

#: Seconds between reads of the audit trail when no commit of this node asked for one.
POLL_SECONDS = 1.0
#: Events a subscriber may have waiting before it is dropped.
BUFFER = 1000
#: Seconds between keep-alive comments on an idle stream (proxies close silent ones).
PING_SECONDS = 15.0
#: Seconds a send to a subscriber may take before the stream is ended.
SEND_TIMEOUT = 30.0
#: Seconds a stream has to end by itself once the server shuts down.
SHUTDOWN_GRACE_SECONDS = 2.0


def event_kind(audit_kind: str) -> str | None:
    """The event kind an audit kind is sent as, or None if it is not sent."""
    return _EVENT_KIND.get(audit_kind)


def event_data(event: AuditEvent) -> dict[str, Any]:
    """The JSON document of one event (the SSE ``data`` field)."""
    return {
        "id": event.event_id,
        "kind": event_kind(event.kind),
        "audit_kind": event.kind,
        "at": event.at.isoformat(),
        "node_id": event.node_id,
        "client_id": event.client_id,
        "session_id": event.session_id,
        "details": event.details,
    }


@dataclass(eq=False)
class Subscription:
    """One consumer: what it asked for and its bounded buffer of events."""

    audit_kinds: frozenset[str]
    client_id: str | None
    #: The id of the last event read when it subscribed: every buffered event is newer.
    start_id: int
    buffer: asyncio.Queue[AuditEvent]
    #: Set when the feed ends this subscription (dropped for falling behind, or closing).
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False

    def wants(self, event: AuditEvent) -> bool:
        return event.kind in self.audit_kinds and (
            self.client_id is None or event.client_id == self.client_id
        )


class EventFeed:
    """Reads new audit rows once for all subscribers and hands them out (see the module)."""

    def __init__(
        self, history: History, *, poll_seconds: float = POLL_SECONDS, buffer: int = BUFFER
    ) -> None:
        self._history = history
        self._poll_seconds = poll_seconds
        #: Events each subscriber may have waiting before it is dropped.
        self.buffer = buffer
        self._subscriptions: set[Subscription] = set()
        self._last_id: int | None = None  # None: not read since the last subscriber left
        self._lock = asyncio.Lock()
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Subscriptions dropped for not reading, since start.
        self.dropped = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registry-events")

    async def close(self) -> None:
        """Stop reading and end every subscription."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for subscription in list(self._subscriptions):
            self._end(subscription)

    def poke(self, *_: Any) -> None:
        """Read now (a journal listener: called after each commit of this node)."""
        self._poked.set()

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    async def subscribe(self, kinds: Collection[str], client_id: str | None = None) -> Subscription:
        """A new subscription to ``kinds`` (of :data:`KINDS`), for one client or all; live
        from the last row read, which is its ``start_id``."""
        audit_kinds = frozenset().union(*(KINDS[kind] for kind in kinds))
        async with self._lock:
            if self._last_id is None:
                self._last_id = await self._newest_id()
            subscription = Subscription(
                audit_kinds, client_id, self._last_id, asyncio.Queue(self.buffer)
            )
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    async def _newest_id(self) -> int:
        page = await self._history.audit(newest_first=True, limit=1)
        return page.items[0].event_id if page.items else 0

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_seconds):
                    await self._poked.wait()
            self._poked.clear()
            try:
                await self._read()
            except StoreUnavailableError as exc:  # an outage: /api/health says so too
                logger.warning("/api/events: reading the audit trail failed: %s", exc)
                await asyncio.sleep(self._poll_seconds)
            except Exception:  # a bug: say so loudly, but keep the feed for every stream
                logger.exception("/api/events: reading the audit trail failed")
                await asyncio.sleep(self._poll_seconds)

    async def _read(self) -> None:
        async with self._lock:
            if not self._subscriptions:
                self._last_id = None  # nobody listens: read nothing until somebody does
                return
            assert self._last_id is not None
            while True:
                page = await self._history.audit(
                    cursor=encode_cursor(self._last_id), limit=MAX_LIMIT
                )
                self._hand_out(page.items)
                if page.next_cursor is None:
                    return

    def _hand_out(self, events: Sequence[AuditEvent]) -> None:
        for event in events:
            for subscription in list(self._subscriptions):
                if not subscription.wants(event):
                    continue
                try:
                    subscription.buffer.put_nowait(event)
                except asyncio.QueueFull:
                    subscription.dropped = True
                    self.dropped += 1
                    logger.warning(
                        "an /api/events subscriber fell %d events behind and was dropped",
                        subscription.buffer.qsize(),
                    )
                    self._end(subscription)
            self._last_id = event.event_id

    def _end(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        subscription.ended.set()


async def replay(
    history: History, subscription: Subscription, after: int
) -> AsyncIterator[AuditEvent]:
    """The events ``subscription`` wants with ids in ``(after, start_id]``, from the store."""
    cursor: str | None = encode_cursor(after)
    while cursor is not None:
        page = await history.audit(client_id=subscription.client_id, cursor=cursor, limit=MAX_LIMIT)
        for event in page.items:
            if event.event_id > subscription.start_id:
                return
            if subscription.wants(event):
                yield event
        cursor = page.next_cursor


async def stream(
    history: History,
    subscription: Subscription,
    after: int | None,
    shutdown: anyio.Event | None = None,
) -> AsyncIterator[ServerSentEvent]:
    """The SSE stream of one subscription: a ``subscribed`` comment once it is live, what it
    missed after ``after`` (if given), then live events until the feed ends it or the server
    shuts down (``shutdown``)."""
    yield ServerSentEvent(comment="subscribed", retry=2000)
    if after is not None:
        async for event in replay(history, subscription, after):
            yield _sse(event)
    while True:
        getter = asyncio.ensure_future(subscription.buffer.get())
        enders: set[asyncio.Future[Any]] = {asyncio.ensure_future(subscription.ended.wait())}
        if shutdown is not None:
            enders.add(asyncio.ensure_future(shutdown.wait()))
        try:
            await asyncio.wait({getter, *enders}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for ender in enders:
                ender.cancel()
        if not getter.done():
            getter.cancel()
            return
        yield _sse(getter.result())  # newer than start_id: the replay did not send it


def _sse(event: AuditEvent) -> ServerSentEvent:
    return ServerSentEvent(
        data=json.dumps(event_data(event), separators=(",", ":")),
        event=event_kind(event.kind),
        id=str(event.event_id),
    )


def _last_event_id(value: str | None) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        after = int(value)
    except ValueError:
        raise InvalidArgumentError("Last-Event-ID", "must be an event id (an integer)") from None
    if after < 0:
        raise InvalidArgumentError("Last-Event-ID", "must not be negative")
    return after


def create_events_router() -> APIRouter:
    router = APIRouter(prefix="/api", dependencies=[Depends(require_api_key)], responses=API_ERRORS)

    @router.get(
        "/events",
        response_class=EventSourceResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "An endless stream of events: `id` (the audit event id), "
                "`event` (the kind) and `data` (JSON: id, kind, audit_kind, at, node_id, "
                "client_id, session_id, details)",
            }
        },
    )
    async def events(
        request: Request,
        kind: Annotated[
            list[str] | None,
            Query(description=f"Only these kinds (repeat): {', '.join(KINDS)}; default all."),
        ] = None,
        client: Annotated[Text | None, Query(description="Only events of this client.")] = None,
        last_event_id: Annotated[
            str | None,
            Header(
                alias="Last-Event-ID",
                description="Resume after this event id: what was committed since is "
                "replayed from the audit trail first.",
            ),
        ] = None,
    ) -> EventSourceResponse:
        """Server-Sent Events as the registry commits them: client joins and leaves, session
        starts and ends, device-info changes, each with its audit event id."""
        kinds = kind or list(KINDS)
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise InvalidArgumentError(
                "kind", f"unknown event kind {unknown[0]!r}; one of {', '.join(KINDS)}"
            )
        after = _last_event_id(last_event_id)
        feed: EventFeed = request.app.state.events
        history: History = request.app.state.registry.history
        subscription = await feed.subscribe(kinds, client)
        # Set when the server begins to shut down: the stream then ends cleanly, instead of
        # holding the shutdown or being cut off mid-response.
        shutdown = anyio.Event()

        async def body() -> AsyncIterator[ServerSentEvent]:
            try:
                async for message in stream(history, subscription, after, shutdown):
                    yield message
            finally:
                feed.unsubscribe(subscription)

        return EventSourceResponse(
            body(),
            ping=PING_SECONDS,
            send_timeout=SEND_TIMEOUT,
            shutdown_event=shutdown,
            shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
        )

    return router
