"""Session runners for the server tests, loaded by import string like any runner."""

from __future__ import annotations

from registry.server.protocol import Command, TaskStatus
from registry.server.sessions import RelayRunner, SessionContext, SessionOutcome


class AskAgainRunner(RelayRunner):
    """Resumes an interrupted session by asking its executor once more (a command round trip
    on the reconnected client's own connection)."""

    async def resume(self, context: SessionContext) -> SessionOutcome:
        results = await context.send_command(
            [Command(tool_name="resume", parameters={}, tool_type="action", call_id="again")],
            result_timeout=3,
        )
        return SessionOutcome(TaskStatus.COMPLETED, [result.model_dump() for result in results])


class UfoToolsRunner(RelayRunner):
    """Drives a UFO device the way a UFO deployment's runner does: it names the agent whose
    tool set the device is to use, and calls a tool of that set (the meta tool listing it)."""

    async def run(self, context: SessionContext) -> SessionOutcome:
        results = await context.send_command(
            [
                Command(
                    tool_name="list_tools", parameters={"tool_type": "action"}, tool_type="action"
                )
            ],
            agent_name="HostAgent",
        )
        return SessionOutcome(TaskStatus.COMPLETED, [result.model_dump() for result in results])
