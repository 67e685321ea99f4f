"""The dashboard in a real browser (headless Chromium) against a real ``registry serve`` and
real WebSocket clients. Each test saves screenshots under ``test-artifacts/ui/``."""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from tests.support import Clients
from tests.ui.conftest import Browser, Served

pytestmark = pytest.mark.timeout(90)


async def test_overview_asks_for_the_key_once_and_shows_the_fleet(
    browser: Browser, served: Served, devices: Clients
) -> None:
    await devices.device("dev-1", system_info={"cpu": 4})
    await devices.constellation("const-1")
    page = await browser.open("/ui/")
    await expect(page.locator("#key-gate")).to_be_visible()
    await browser.enter_key()
    await expect(page.locator("[data-test=online-total]")).to_have_text("2")
    await expect(page.locator("[data-test=store]")).to_contain_text("healthy")
    await browser.screenshot("overview")
    assert browser.errors == []
