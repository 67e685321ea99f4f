"""Documentation that runs: the fenced blocks of a Markdown file, read as printed, and the means
to run them (tests/test_readme.py, tests/test_protocol_doc.py).

Every ``python`` and ``sh`` block runs unless the HTML comment on the line before it says
otherwise, with a reason where it is not run:

- ``<!-- example: skip: REASON -->``: not run, only parsed (compiled, ``bash -n``);
- ``<!-- example: install -->`` (sh): run in a fresh copy of the checkout, by the install test;
- ``<!-- example: runner -->`` (python): a session runner class, served by a real server.

JSON frames make conversations with a real server: ``<!-- frame: NAME sends -->`` before a
``json`` block sends it on the connection called NAME (opened by its first frame),
``<!-- frame: NAME receives -->`` expects it as the next frame there, and
``<!-- frame: NAME closed CODE -->`` (no block) expects the server to close NAME with CODE.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from registry.server.protocol import Command, TaskStatus
from registry.server.sessions import SessionContext, SessionOutcome
from tests.support import Client, Clients

ROOT = Path(__file__).resolve().parents[1]

_MARKER = re.compile(r"<!--\s*(?P<family>example|frame):\s*(?P<text>.*?)\s*-->")
_FENCE = re.compile(r"(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
_FRAME = re.compile(r"(?P<name>[\w.-]+) (?:(?P<action>sends|receives)|closed (?P<code>\d+))")
#: Languages run as Python or as shell lines; other blocks (sql, json, text) are not examples.
LANGUAGES = {"python": "python", "py": "python", "sh": "sh", "bash": "sh", "shell": "sh"}
KINDS = {"python": {"script", "runner", "skip"}, "sh": {"lines", "install", "skip"}}


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts (``README.md:12``), its language and its text, with
    the marker comment just before it (``family`` ``example`` or ``frame``), if any."""

    where: str
    lang: str
    body: str
    family: str | None = None
    marker: str | None = None


@dataclass(frozen=True)
class Example:
    """A python or sh block and how it is run: ``kind`` is ``script`` or ``lines`` by default,
    else the marker's; ``reason`` is a skip's justification."""

    block: Block
    language: str
    kind: str
    reason: str | None = None


@dataclass(frozen=True)
class Frame:
    """One step of a conversation: connection ``name`` ``sends``/``receives`` ``frame``, or is
    ``closed`` with ``code``."""

    where: str
    name: str
    action: str
    frame: dict[str, Any] | None = None
    code: int | None = None


def checkout_files() -> list[Path]:
    """The checkout's files (relative) as a fresh clone has them: tracked ones, and new ones
    that are not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [Path(name) for name in listed.split("\0") if name and (ROOT / name).is_file()]


def blocks(path: Path) -> list[Block | Frame]:
    """The fenced blocks of ``path`` in order, and the bodiless ``frame: NAME closed`` steps.

    A fence may be indented (in a list item). A marker applies to the fence on the next
    non-blank line; a marker that no fence follows is only allowed for ``closed`` (any other is
    an error, as is an unclosed fence)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block | Frame] = []
    marker: tuple[str, str, int] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        where = f"{path.name}:{index + 1}"
        fence = _FENCE.match(line)
        if fence:
            end = next((i for i in range(index + 1, len(lines)) if lines[i].strip() == "```"), None)
            if end is None:
                raise AssertionError(f"{where}: fence not closed")
            indent = len(fence["indent"])  # a block in a list item is indented as a whole
            body = "\n".join(text[indent:] for text in lines[index + 1 : end]) + "\n"
            family, text = (marker[0], marker[1]) if marker else (None, None)
            found.append(Block(where, fence["lang"], body, family, text))
            marker, index = None, end + 1
            continue
        comment = _MARKER.search(line)
        if comment or line.strip():
            if marker is not None:
                found.append(_bodiless(marker, path.name))
            marker = (comment["family"], comment["text"], index + 1) if comment else None
        index += 1
    if marker is not None:
        found.append(_bodiless(marker, path.name))
    return found


def _bodiless(marker: tuple[str, str, int], name: str) -> Frame:
    """A marker that no block follows: only a ``frame: NAME closed CODE`` step may be one."""
    family, text, line = marker
    where = f"{name}:{line}"
    if family != "frame" or not text.partition(" ")[2].startswith("closed"):
        raise AssertionError(f"{where}: marker without a block")
    return _frame_step(text, where, None)


def examples(path: Path) -> list[Example]:
    """The python and sh blocks of ``path``, each with how it is run. An unknown kind, or a
    skip without a reason, is an error."""
    found = []
    for block in blocks(path):
        if not isinstance(block, Block) or block.lang not in LANGUAGES:
            continue
        language = LANGUAGES[block.lang]
        kind, reason = ("script" if language == "python" else "lines"), None
        if block.family == "example":
            assert block.marker is not None
            kind, _, reason = block.marker.partition(":")
            kind, reason = kind.strip(), reason.strip() or None
            if kind not in KINDS[language]:
                raise AssertionError(f"{block.where}: unknown {language} example kind {kind!r}")
            if kind == "skip" and reason is None:
                raise AssertionError(f"{block.where}: a skipped example must say why")
        elif block.family is not None:
            raise AssertionError(f"{block.where}: a {block.family} marker on a {block.lang} block")
        found.append(Example(block, language, kind, reason))
    return found


def _frame_step(text: str, where: str, body: str | None) -> Frame:
    match = _FRAME.fullmatch(text)
    if match is None:
        raise AssertionError(
            f"{where}: frame marker {text!r} is not 'NAME sends|receives|closed N'"
        )
    if match["code"] is not None:
        if body is not None:
            raise AssertionError(f"{where}: a 'closed' step has no frame")
        return Frame(where, match["name"], "closed", code=int(match["code"]))
    if body is None:
        raise AssertionError(f"{where}: '{match['action']}' needs a json block")
    return Frame(where, match["name"], match["action"], frame=json.loads(body))


def conversation(path: Path) -> list[Frame]:
    """The frame steps of ``path`` in document order."""
    steps = []
    for item in blocks(path):
        if isinstance(item, Frame):
            steps.append(item)
        elif item.family == "frame":
            assert item.marker is not None
            if item.lang != "json":
                raise AssertionError(f"{item.where}: a frame is a json block, not {item.lang!r}")
            steps.append(_frame_step(item.marker, item.where, item.body))
    return steps


# -- conversations with a real server ----------------------------------------------------------

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _is_time(value: str) -> bool:
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


class Conversation:
    """Plays the frame steps of a document against a server, connection by connection.

    What the server makes up is matched by form: an aware ISO 8601 time for a time, any uuid
    for a uuid. A uuid of the document is bound to the one the server used the first time it
    appears, must be that same one wherever else it appears, and is replaced by it in the frames
    sent afterwards (a ``prev_response_id`` answering a ``response_id``)."""

    def __init__(self, clients: Clients) -> None:
        self._clients = clients
        self._open: dict[str, Client] = {}
        self._bound: dict[str, str] = {}

    async def play(self, steps: list[Frame]) -> None:
        for step in steps:
            client = self._open.get(step.name)
            if client is None:
                if step.action != "sends":
                    raise AssertionError(f"{step.where}: {step.name} has not sent anything yet")
                client = self._open[step.name] = await self._clients.open()
            if step.action == "sends":
                await client.send(**self._substitute(step.frame))
            elif step.action == "receives":
                assert step.frame is not None
                actual = await client.recv()
                self._match(step.frame, actual, f"{step.where} ({step.name} receives)")
            else:
                received = len(client.frames)
                code, _reason = await client.closed()
                assert client.frames[received:] == [], f"{step.where}: frames before the close"
                assert code == step.code, f"{step.where}: closed with {code}, not {step.code}"

    def _substitute(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: self._substitute(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._substitute(item) for item in value]
        if isinstance(value, str):
            return self._bound.get(value, value)
        return value

    def _match(self, expected: Any, actual: Any, where: str, path: str = "frame") -> None:
        if isinstance(expected, dict):
            assert isinstance(actual, dict), f"{where}: {path} is {actual!r}"
            if path == "frame":  # a server frame's fields come in a fixed order
                assert list(actual) == list(expected), f"{where}: fields {list(actual)}"
            assert set(actual) == set(expected), f"{where}: {path} has {sorted(actual)}"
            for key, item in expected.items():
                self._match(item, actual[key], where, f"{path}.{key}")
        elif isinstance(expected, list):
            assert isinstance(actual, list), f"{where}: {path} is {actual!r}"
            assert len(actual) == len(expected), f"{where}: {path} is {actual!r}"
            for number, (item, got) in enumerate(zip(expected, actual, strict=True)):
                self._match(item, got, where, f"{path}[{number}]")
        elif isinstance(expected, str) and _UUID.fullmatch(expected):
            assert isinstance(actual, str), f"{where}: {path}={actual!r}"
            assert _UUID.fullmatch(actual), f"{where}: {path}={actual!r}"
            bound = self._bound.setdefault(expected, actual)
            assert bound == actual, f"{where}: {path} is {actual!r}, earlier {bound!r}"
            others = [doc for doc, value in self._bound.items() if value == actual]
            assert others == [expected], f"{where}: {path} {actual!r} is also {others}"
        elif isinstance(expected, str) and _is_time(expected):
            assert isinstance(actual, str), f"{where}: {path}={actual!r}"
            assert _is_time(actual), f"{where}: {path}={actual!r}"
        else:
            assert actual == expected, f"{where}: {path} is {actual!r}, not {expected!r}"


class ScreenshotRunner:
    """The session runner of docs/protocol.md's example: one screenshot command, and the
    session ends with what the device answered."""

    async def run(self, context: SessionContext) -> SessionOutcome:
        results = await context.send_command(
            [
                Command(
                    tool_name="screenshot", tool_type="data_collection", call_id=str(uuid.uuid4())
                )
            ]
        )
        return SessionOutcome(TaskStatus.COMPLETED, [result.model_dump() for result in results])

    async def resume(self, context: SessionContext) -> SessionOutcome:
        return SessionOutcome(TaskStatus.FAILED, error="server restarted")


SCREENSHOT_RUNNER = f"{__name__}:{ScreenshotRunner.__name__}"
