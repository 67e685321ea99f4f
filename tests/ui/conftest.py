"""Fixtures for the dashboard tests: a real ``registry serve`` process, real WebSocket clients
against it, and headless Chromium (Debian's ``chromium``) driven by Playwright.

Playwright cannot download its own browser here, so the system Chromium is launched by path.
Without it the browser tests skip, saying why, unless ``REGISTRY_TEST_REQUIRE_BROWSER=1``
(CI installs Chromium and sets it), which fails them instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.server_process import ROOT
from tests.support import API_KEY, HOST, Clients, Serve, free_port

CHROMIUM = Path(os.environ.get("REGISTRY_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Screenshots of every page the tests visit (ignored by git).
ARTIFACTS = ROOT / "test-artifacts" / "ui"


def _browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    probe = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"{CHROMIUM} --version failed: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def chromium() -> Path:
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("REGISTRY_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"REGISTRY_TEST_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(f"browser tests need Chromium and Playwright: {missing}")
    return CHROMIUM


@dataclass
class Served:
    """A ``registry serve`` process: where to reach it (what ``Clients`` needs too)."""

    port: int
    database_url: str

    @property
    def http_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def ws_url(self, token: str | None = API_KEY) -> str:
        base = f"ws://{HOST}:{self.port}/ws"
        return base if token is None else f"{base}?token={token}"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'ui.db'}"
    port = free_port()
    process = Serve(database_url, port, tmp_path / "serve.log")
    try:
        await process.ready()
        yield Served(port, database_url)
    finally:
        await process.stop(signal.SIGTERM)


@pytest.fixture
async def devices(served: Served) -> AsyncIterator[Clients]:
    """Real WebSocket clients of the served process, closed after the test."""
    async with aclosing(Clients(served)) as opened:  # type: ignore[arg-type]
        yield opened


class Browser:
    """A Chromium page with what went wrong in it recorded: console errors (a Content
    Security Policy violation is one) and uncaught exceptions."""

    def __init__(self, page: Any, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _console(self, message: Any) -> None:
        # A 401 is how a page learns that it needs the key: expected, not an error.
        if message.type == "error" and "status of 401" not in message.text:
            self.errors.append(message.text)

    async def open(self, path: str) -> Any:
        await self.page.goto(self.base_url + path)
        return self.page

    async def enter_key(self, key: str = API_KEY) -> None:
        gate = self.page.locator("#key-gate")
        await gate.get_by_label("Key").fill(key)
        await gate.get_by_role("button", name="Use this key").click()

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=path, full_page=True)
        return path


@pytest.fixture
async def browser(chromium: Path, served: Served) -> AsyncIterator[Browser]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await instance.new_context(
                viewport={"width": 1280, "height": 900}, timezone_id="Europe/Paris"
            )
            yield Browser(await context.new_page(), served.http_url)
        finally:
            await instance.close()
