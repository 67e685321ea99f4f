"""A Server-Sent Events reader for the tests: a real HTTP stream of ``/api/events`` (httpx),
parsed as the SSE format says, kept in a list as events arrive."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support import API_KEY, WAIT, Server, until


@dataclass
class Event:
    id: int
    kind: str
    data: dict[str, Any]


@dataclass
class EventStream:
    """Events received so far; ``ended`` once the server closed the stream."""

    events: list[Event] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ids(self) -> list[int]:
        return [event.id for event in self.events]

    async def wait_for(self, count: int, wait: float = WAIT) -> list[Event]:
        """Wait until at least ``count`` events have arrived."""
        await until(lambda: len(self.events) >= count, wait=wait)
        return self.events

    async def read(self, response: httpx.Response) -> None:
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line == ": subscribed":
                self.subscribed.set()
            elif line == "":
                if "data" in fields:
                    self.events.append(
                        Event(int(fields["id"]), fields["event"], json.loads(fields["data"]))
                    )
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        self.ended.set()


@asynccontextmanager
async def subscribe(
    server: Server,
    *,
    params: dict[str, Any] | None = None,
    last_event_id: int | None = None,
    api_key: str = API_KEY,
) -> AsyncIterator[EventStream]:
    """An open ``/api/events`` stream, live (its ``subscribed`` comment received) when the
    block starts; closed when it ends."""
    headers = {"X-API-Key": api_key}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    stream = EventStream()
    async with (
        httpx.AsyncClient(base_url=server.http_url, timeout=httpx.Timeout(WAIT, read=None)) as http,
        http.stream("GET", "/api/events", params=params, headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        reader = asyncio.create_task(stream.read(response))
        try:
            async with asyncio.timeout(WAIT):
                await stream.subscribed.wait()
            yield stream
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await reader
