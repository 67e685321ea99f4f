"""A device that answers the server as UFO's device client does (microsoft/UFO,
``ufo/client/websocket.py``, ``ufo/client/ufo_client.py`` and the ``CommandRouter`` of
``ufo/client/computer.py``), frame for frame:

- On a server ``task`` frame it resets its session (its ``session_id`` becomes None) and sends
  a ``task`` request of its own: the frame's ``user_request`` as ``request``, the same
  ``task_name``, ``session_id`` null, its ``client_id``, a fresh ``request_id`` and
  ``metadata`` ``{"platform": ...}``.
- On a ``command`` it runs the ``actions`` and sends ``command_results`` with the command's
  ``session_id``, ``status`` and ``response_id`` (as ``prev_response_id``). No actions: it
  answers at once with no results. Otherwise the router first picks the tool set of the
  command's ``agent_name`` from its configuration (no such agent: "Agent configuration for
  None not found."), then runs each action: an empty ``tool_name`` is "No action taken.", the
  meta tool ``list_tools`` lists the tools of the set, and a tool the set does not have fails
  the lookup. Any such failure raises out of the handler, which only logs it: the command is
  never answered.
- ``task_end`` and ``error`` frames are logged, nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from websockets.exceptions import ConnectionClosed

from tests.support import Client

#: A tool configuration like UFO's default one: agent name -> tool type -> tool names.
AGENTS: dict[str, dict[str, list[str]]] = {
    "HostAgent": {
        "data_collection": ["get_desktop_app_info", "capture_window_screenshot"],
        "action": ["select_application_window", "run_shell"],
    },
}


class _Unanswered(Exception):
    """What UFO's router raises; its WebSocket client logs it and sends nothing."""


@dataclass
class UfoDevice:
    """Runs UFO's device behaviour on a registered :class:`Client` until :meth:`stop`."""

    client: Client
    platform: str = "linux"
    agents: dict[str, dict[str, list[str]]] = field(default_factory=lambda: AGENTS)
    #: What the client's logger would have said: unanswered commands, task ends, errors.
    log: list[str] = field(default_factory=list)
    task_ends: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def task_end(self, wait: float) -> dict[str, Any]:
        return await asyncio.wait_for(self.task_ends.get(), wait)

    async def request(self, request: str, task_name: str) -> None:
        """A task of its own (``ufo.client.client --request ... --task_name ...``)."""
        await self._send_task(request, task_name)

    async def _listen(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await self.client.recv(wait=3600)
                try:
                    await self._handle(frame)
                except _Unanswered as exc:
                    self.log.append(f"[WS] Error handling message: {exc}")

    async def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "task":
            await self._send_task(frame["user_request"], frame["task_name"])
        elif kind == "command":
            results = self._execute(frame["agent_name"], frame["actions"])
            await self.client.send(
                type="command_results",
                session_id=frame["session_id"],
                request_id=str(uuid.uuid4()),
                action_results=results,
                client_id=self.client.client_id,
                prev_response_id=frame["response_id"],
                status=frame["status"],
                timestamp=datetime.now(UTC).isoformat(),
            )
        elif kind == "task_end":
            await self.task_ends.put(frame)
        elif kind == "error":
            self.log.append(f"[WS] Server error: {frame['error']}")

    async def _send_task(self, request: str, task_name: str | None) -> None:
        await self.client.send(
            type="task",
            request=request,
            task_name=task_name or str(uuid.uuid4()),
            session_id=None,
            client_id=self.client.client_id,
            target_id=None,
            client_type="device",
            status="continue",
            timestamp=datetime.now(UTC).isoformat(),
            request_id=str(uuid.uuid4()),
            metadata={"platform": self.platform},
        )

    def _execute(
        self, agent_name: str | None, actions: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        if not actions:
            return []
        tools = self.agents.get(agent_name or "")
        if not tools:
            raise _Unanswered(f"Agent configuration for {agent_name} not found.")
        results = []
        for action in actions:
            name, kind = action["tool_name"], action["tool_type"]
            if not name:
                results.append(
                    {
                        "status": "success",
                        "result": "No action taken.",
                        "error": "",
                        "call_id": action["call_id"],
                    }
                )
                continue
            if name == "list_tools":
                listed = [
                    tool
                    for tool_type, names in tools.items()
                    if (action["parameters"] or {}).get("tool_type") in (None, tool_type)
                    for tool in names
                ]
                result: Any = listed
            elif name in tools.get(kind, []):
                result = f"{name} done"
            else:
                raise _Unanswered(f"Tool {kind}::{name} is not registered in current computer")
            results.append(
                {
                    "status": "success",
                    "result": result,
                    "error": None,
                    "call_id": action["call_id"],
                    "namespace": kind,
                }
            )
        return results
