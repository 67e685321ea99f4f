"""docs/protocol.md is what the server does: its example frames are a conversation held with a
real server as printed, its frames have the envelopes' fields, and it lists every close code."""

from __future__ import annotations

import re
from contextlib import aclosing
from pathlib import Path

import pytest

from registry.server import closecodes
from registry.server.protocol import ClientMessage, ServerMessage
from tests.examples import ROOT, SCREENSHOT_RUNNER, Conversation, checkout_files, conversation
from tests.support import SERVER_FIELDS, Clients, running_server

pytestmark = pytest.mark.timeout(60)

PROTOCOL = ROOT / "docs" / "protocol.md"


def test_every_frame_fits_its_envelope() -> None:
    steps = conversation(PROTOCOL)
    sent = [step for step in steps if step.action == "sends"]
    received = [step for step in steps if step.action == "receives"]
    assert len(sent) >= 5
    assert len(received) >= 5
    for step in sent:
        ClientMessage.model_validate(step.frame)
    for step in received:
        assert step.frame is not None
        assert list(step.frame) == SERVER_FIELDS, step.where
        ServerMessage.model_validate(step.frame)
    kinds = {step.frame["type"] for step in steps if step.frame is not None}
    assert {"register", "heartbeat", "task", "command", "command_results", "task_end"} <= kinds


async def test_the_conversation_runs_as_printed(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    async with (
        running_server(url, runner=SCREENSHOT_RUNNER) as server,
        aclosing(Clients(server)) as clients,
    ):
        await Conversation(clients).play(conversation(PROTOCOL))


def test_the_reference_is_cited_by_its_path() -> None:
    """The protocol is cited as docs/protocol.md; the README links it."""
    citing = [
        name for name in checkout_files() if re.search(rb"PROTOCOL\.md", (ROOT / name).read_bytes())
    ]
    assert citing == []
    assert "(docs/protocol.md)" in (ROOT / "README.md").read_text()


def test_every_close_code_is_listed() -> None:
    table = {
        int(match[1])
        for match in re.finditer(r"^\| (\d{4}) \|", PROTOCOL.read_text(), flags=re.MULTILINE)
    }
    codes = {
        value
        for name, value in vars(closecodes).items()
        if name.isupper() and isinstance(value, int)
    }
    assert codes | set(closecodes.REASONS) <= table
