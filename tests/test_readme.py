"""Every Python and shell example of README.md runs as printed (tests/examples.py says how a
block is marked when it runs otherwise; the SQL recipes run in tests/operator/test_sql.py).

- Python blocks run as scripts in an empty directory; a ``runner`` block is served by a real
  server, where a constellation's task must complete on a device.
- Shell blocks run line by line, each line in a ``bash`` of its own (``set -o pipefail``; a
  variable set on one line is not seen by the next), in a directory whose ``registry.db`` a real
  server has filled (a device ``dev-1``, a constellation ``const-1``, a completed session
  ``report@1``), with the checkout's ``registry`` first on ``PATH``. Each line must exit 0, or
  the code its comment gives (``# ... exits 1``).
- A line that runs ``registry serve`` is started in the background on a free port
  (``REGISTRY_PORT``) with a known key (``REGISTRY_API_KEY``); it must answer ``/api/health``
  before the block's next lines run, and stop on SIGINT (Ctrl-C) at the end of the block.
- The ``install`` block runs in a fresh copy of the checkout: a new virtual environment, the
  package installed into it, and its own ``registry`` console script serving.
- The JSON frames marked in README.md are a conversation with a real server.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest

from tests.examples import (
    ROOT,
    SCREENSHOT_RUNNER,
    Conversation,
    Example,
    checkout_files,
    conversation,
    examples,
)
from tests.support import API_KEY, HOST, WAIT, Clients, free_port, running_server

pytestmark = pytest.mark.timeout(300)  # a CLI line takes seconds on a busy machine

README = ROOT / "README.md"
EXAMPLES = examples(README)
#: Seconds one command line may take.
LINE_TIMEOUT = 60.0
#: Seconds a serving line may take to answer /api/health (the install line creates a virtual
#: environment and installs the package and its dependencies first).
SERVE_WAIT = {"lines": 30.0, "install": 400.0}
_SERVES = re.compile(r"\bregistry serve\b")
_EXIT_CODE = re.compile(r"#.*\bexits (\d+)\b")


def _of(kind: str) -> list[pytest.ParameterSet]:
    return [pytest.param(ex, id=ex.block.where) for ex in EXAMPLES if ex.kind == kind]


def environment() -> dict[str, str]:
    """This process's environment without ``REGISTRY_*`` settings, with the interpreter's
    scripts (the checkout's ``registry``) first on ``PATH``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("REGISTRY_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def command_lines(body: str) -> list[str]:
    """The commands of a shell block: backslash continuations joined, blank lines and comment
    lines left out."""
    lines = body.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def expected_code(line: str) -> int:
    match = _EXIT_CODE.search(line)
    return int(match[1]) if match else 0


# -- parsing ------------------------------------------------------------------------------------


def test_every_example_parses() -> None:
    """Skipped blocks included: a Python block compiles, a shell block passes ``bash -n``."""
    assert {ex.kind for ex in EXAMPLES} >= {"script", "runner", "lines", "install"}
    for example in EXAMPLES:
        if example.language == "python":
            compile(example.block.body, example.block.where, "exec")
        else:
            result = subprocess.run(
                ["bash", "-n"], input=example.block.body, capture_output=True, text=True
            )
            assert result.returncode == 0, f"{example.block.where}: {result.stderr}"


def test_readme_names_the_distribution() -> None:
    """``pip install`` of the distribution's name must get this project, and say so."""
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert name != "registry"  # an unrelated package on the package index
    assert f"`{name}`" in README.read_text()


# -- Python ---------------------------------------------------------------------------------


@pytest.mark.parametrize("example", _of("script"))
def test_python_example(example: Example, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(example.block.body)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=LINE_TIMEOUT,
    )
    assert result.returncode == 0, f"{example.block.where}:\n{result.stdout}\n{result.stderr}"


def runner_class(source: str) -> str:
    """The one class of ``source`` that defines ``run`` and ``resume``."""
    names = [
        node.name
        for node in ast.parse(source).body
        if isinstance(node, ast.ClassDef)
        and {"run", "resume"}
        <= {item.name for item in node.body if isinstance(item, ast.AsyncFunctionDef)}
    ]
    assert len(names) == 1, f"expected one runner class, found {names}"
    return names[0]


@pytest.mark.parametrize("example", _of("runner"))
async def test_runner_example(
    example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = "readme_runner_" + re.sub(r"\W", "_", example.block.where)
    (tmp_path / f"{module}.py").write_text(example.block.body)
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = f"{module}:{runner_class(example.block.body)}"
    url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    try:
        async with (
            running_server(url, runner=runner) as server,
            aclosing(Clients(server)) as clients,
        ):
            device = await clients.device("dev-1")
            constellation = await clients.constellation("const-1", target_id="dev-1")
            await constellation.task("task@1", "task", target_id="dev-1")

            # The device answers every command with success until its task_end comes.
            frame = await device.recv()
            while frame["type"] == "command":
                await device.send_as(
                    "command_results",
                    session_id="task@1",
                    prev_response_id=frame["response_id"],
                    action_results=[
                        {"status": "success", "result": "done", "call_id": action["call_id"]}
                        for action in frame["actions"]
                    ],
                )
                frame = await device.recv()
            assert frame["type"] == "task_end", frame
            end = await constellation.recv_type("task_end")
            assert (end["status"], end["error"]) == ("completed", None), end
    finally:
        sys.modules.pop(module, None)


# -- shell ----------------------------------------------------------------------------------


async def seed(database_url: str) -> None:
    """Fill the database through a real server: ``dev-1``, ``const-1`` and one session."""
    async with (
        running_server(database_url, runner=SCREENSHOT_RUNNER) as server,
        aclosing(Clients(server)) as clients,
    ):
        device = await clients.device("dev-1", system_info={"os": "Windows 11"})
        constellation = await clients.constellation("const-1", target_id="dev-1")
        await constellation.task("report@1", "report", target_id="dev-1")
        await device.answer_command("report@1")
        end = await constellation.recv_type("task_end")
        assert end["status"] == "completed", end


def start(line: str, cwd: Path, settings: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``line`` run by bash in a process group of its own, its output appended to ``log``."""
    with log.open("ab") as output:
        return subprocess.Popen(
            ["bash", "-c", line],
            cwd=cwd,
            env=environment() | settings,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def serving(line: str, cwd: Path, wait: float, log: Path) -> subprocess.Popen[bytes]:
    """Start a ``registry serve`` line in a process group of its own; return once
    ``/api/health`` answers 200 (failing if the line exits or ``wait`` seconds pass)."""
    port = free_port()
    process = start(line, cwd, {"REGISTRY_PORT": str(port), "REGISTRY_API_KEY": API_KEY}, log)
    deadline = time.monotonic() + wait
    async with httpx.AsyncClient(
        base_url=f"http://{HOST}:{port}", headers={"X-API-Key": API_KEY}, timeout=2
    ) as http:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"{line!r} exited {process.returncode}:\n{tail(log)}")
            with contextlib.suppress(httpx.TransportError):
                if (await http.get("/api/health")).status_code == 200:
                    return process
            if time.monotonic() > deadline:
                await interrupt(process)
                raise AssertionError(f"{line!r} did not answer /api/health within {wait:g}s")
            await asyncio.sleep(0.1)


async def interrupt(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C for the line's whole process group; it must be gone within WAIT * 3 seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        await asyncio.to_thread(process.wait, WAIT * 3)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError("the serving line did not stop on SIGINT") from None


async def run_lines(
    example: Example,
    cwd: Path,
    log: Path,
    while_serving: Callable[[subprocess.Popen[bytes]], Awaitable[None]] | None = None,
) -> None:
    """Run the block's lines in ``cwd``, in order; a serving line serves until the end."""
    server: subprocess.Popen[bytes] | None = None
    try:
        for line in command_lines(example.block.body):
            if _SERVES.search(line):
                assert server is None, f"{example.block.where}: two serving lines"
                server = await serving(line, cwd, SERVE_WAIT[example.kind], log)
                if while_serving is not None:
                    await while_serving(server)
                continue
            result = await asyncio.to_thread(
                subprocess.run,
                ["bash", "-o", "pipefail", "-c", line],
                cwd=cwd,
                env=environment(),
                capture_output=True,
                text=True,
                timeout=LINE_TIMEOUT,
            )
            assert result.returncode == expected_code(line), (
                f"{example.block.where}: {line!r} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
    finally:
        if server is not None:
            await interrupt(server)


@pytest.mark.parametrize("example", _of("lines"))
async def test_shell_example(example: Example, tmp_path: Path) -> None:
    await seed(f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    await run_lines(example, tmp_path, tmp_path / "serve.log")


def group_commands(group: int) -> list[list[bytes]]:
    """The command lines of the processes in process group ``group`` (Linux)."""
    commands = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == group:
                commands.append((entry / "cmdline").read_bytes().split(b"\0"))
    return commands


def copy_checkout(target: Path) -> None:
    for name in checkout_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("example", _of("install"))
async def test_install_example(example: Example, tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    copy_checkout(checkout)
    script = checkout / ".venv" / "bin" / "registry"

    async def serves_installed_script(process: subprocess.Popen[bytes]) -> None:
        """The server answering is the new environment's ``registry`` console script."""
        commands = await asyncio.to_thread(group_commands, process.pid)
        assert any(str(script).encode() in command[:2] for command in commands), commands

    await run_lines(example, checkout, tmp_path / "serve.log", serves_installed_script)
    name = tomllib.loads((checkout / "pyproject.toml").read_text())["project"]["name"]
    shown = await asyncio.to_thread(
        subprocess.run,
        [str(checkout / ".venv" / "bin" / "python"), "-m", "pip", "show", name],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr


# -- frames ---------------------------------------------------------------------------------


async def test_readme_frames(tmp_path: Path) -> None:
    steps = conversation(README)
    assert {step.frame["type"] for step in steps if step.frame} >= {"register", "heartbeat"}
    url = f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}"
    async with running_server(url) as server, aclosing(Clients(server)) as clients:
        await Conversation(clients).play(steps)
