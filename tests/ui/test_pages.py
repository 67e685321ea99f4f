"""The dashboard in a real browser (headless Chromium) against a real ``registry serve`` and
real WebSocket clients. Each test saves screenshots of the pages it shows under
``test-artifacts/ui/``."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.support import API_KEY, Client, Clients
from tests.ui.conftest import Browser

pytestmark = pytest.mark.timeout(90)

#: No '/' (ids must be addressable over REST), but markup all the same.
HOSTILE_ID = '<img src=x onerror="window.pwned=1"><script>window.pwned=2<'
HOSTILE_VALUE = "<script>window.pwned=3</script>"


async def _session(constellation: Client, device: Client, session_id: str) -> None:
    """A session the device completes, run through the server like any other."""
    await constellation.send_as(
        "task", target_id=device.client_id, session_id=session_id, task_name="job", request="go"
    )
    await constellation.recv_type("heartbeat")
    await device.answer_command(session_id)
    await constellation.recv_type("task_end")


async def test_overview_asks_for_the_key_once_and_shows_the_fleet(
    browser: Browser, devices: Clients
) -> None:
    await devices.device("dev-1", system_info={"cpu": 4})
    await devices.constellation("const-1")
    lost = await devices.device("dev-lost")
    lost.ws.transport.abort()
    page = await browser.open("/ui/")
    await expect(page.locator("#key-gate")).to_be_visible()
    await browser.enter_key()
    await expect(page.locator("#key-gate")).to_be_hidden()
    await expect(page.locator("[data-test=online-total]")).to_have_text("2")
    await expect(page.locator("[data-test=store]")).to_contain_text("healthy")
    abnormal = page.locator("[data-test=abnormal] tbody tr")
    await expect(abnormal).to_have_count(1)
    await expect(abnormal).to_contain_text("connection_lost")
    await browser.screenshot("overview")
    # Kept for the tab's session, never in the URL: other pages do not ask again.
    assert API_KEY not in page.url
    await browser.open("/ui/audit")
    await expect(page.locator("[data-test=audit] tbody tr").first).to_be_visible()
    await expect(page.locator("#key-gate")).to_be_hidden()
    assert browser.errors == []


async def test_a_wrong_key_is_refused_and_shows_nothing(browser: Browser, devices: Clients) -> None:
    await devices.device("dev-1")
    page = await browser.open("/ui/audit")
    await browser.enter_key("not-the-key")
    gate = page.locator("#key-gate")
    await expect(gate).to_be_visible()
    await expect(gate.get_by_role("alert")).to_have_text("Invalid API key")
    await expect(page.locator("[data-test=audit] tbody tr")).to_have_count(0)
    await browser.screenshot("wrong-key")
    await browser.enter_key()
    await expect(gate).to_be_hidden()
    await expect(page.locator("[data-test=audit] tbody tr").first).to_be_visible()
    assert browser.errors == []


async def test_the_client_page_shows_its_timeline_info_sessions_and_audit(
    browser: Browser, devices: Clients
) -> None:
    for cpu in (2, 4):
        device = await devices.device("dev-1", system_info={"cpu": cpu})
        await device.close()
    device = await devices.device("dev-1", system_info={"cpu": 4, "gpu": True})
    constellation = await devices.constellation("const-1")
    await _session(constellation, device, "s-1")
    page = await browser.open("/ui/client?id=dev-1")
    await browser.enter_key()
    await expect(page.locator("[data-test=connection-count]")).to_have_text("3")
    await expect(page.locator("[data-test=connections] tbody tr")).to_have_count(3)
    bars = await page.evaluate(
        """() => Chart.getChart(document.querySelector("canvas"))
            .data.datasets.map((set) => set.data.length)"""
    )
    assert bars == [1, 2, 0]  # open, closed normally, closed abnormally
    await expect(page.locator("[data-test=summary]")).to_contain_text("online")
    snapshots = page.locator("[data-test=snapshots] tbody tr")
    await expect(snapshots).to_have_count(3)
    await expect(snapshots.first).to_contain_text("+ gpu = true")
    await expect(snapshots.nth(1)).to_contain_text("~ cpu: 2 → 4")
    session_link = page.locator("[data-test=client-sessions]").get_by_role("link", name="s-1")
    await expect(session_link).to_be_visible()
    await expect(page.locator("[data-test=audit]")).to_contain_text("client_registered")
    await browser.screenshot("client")

    await session_link.click()
    await expect(page.locator("[data-test=session-id]")).to_have_text("s-1")
    await expect(page.locator("main")).to_contain_text("completed")
    await expect(page.locator("[data-test=audit] tbody tr").first).to_contain_text("session_")
    await browser.screenshot("session")
    assert browser.errors == []


async def test_a_hostile_client_id_and_metadata_show_as_text(
    browser: Browser, devices: Clients
) -> None:
    await devices.register(HOSTILE_ID, metadata={"note": HOSTILE_VALUE})
    page = await browser.open("/ui/audit")
    await browser.enter_key()
    link = page.locator("[data-test=audit] tbody a", has_text="onerror")
    await expect(link).to_have_text(HOSTILE_ID)
    await link.click()
    await expect(page.locator("[data-test=client-id]")).to_have_text(HOSTILE_ID)
    await expect(page.locator("[data-test=metadata]")).to_contain_text(HOSTILE_VALUE)
    await browser.screenshot("hostile-id")
    assert await page.evaluate("() => window.pwned") is None
    assert await page.locator("main img, main script").count() == 0
    assert browser.errors == []


async def test_filters_are_in_the_url_and_survive_a_reload(
    browser: Browser, devices: Clients
) -> None:
    await devices.device("dev-1")
    await devices.device("dev-2")
    page = await browser.open("/ui/audit")
    await browser.enter_key()
    form = page.get_by_role("search")
    await form.get_by_label("Kind").select_option("client_registered")
    await form.get_by_label("Client", exact=True).fill("dev-2")
    await form.get_by_label("Client", exact=True).press("Enter")  # the keyboard is enough
    rows = page.locator("[data-test=audit] tbody tr")
    await expect(rows).to_have_count(1)
    assert "kind=client_registered" in page.url
    assert "client=dev-2" in page.url
    await page.reload()
    await expect(rows).to_have_count(1)
    await expect(rows).to_contain_text("dev-2")
    await expect(page.get_by_role("search").get_by_label("Client", exact=True)).to_have_value(
        "dev-2"
    )
    await browser.screenshot("audit")

    await browser.open("/ui/sessions?state=completed")
    await expect(page.get_by_role("search").get_by_label("State")).to_have_value("completed")
    await browser.screenshot("sessions")
    assert browser.errors == []


async def test_the_pages_work_with_the_keyboard(browser: Browser, devices: Clients) -> None:
    await devices.device("dev-1")
    page = await browser.open("/ui/audit")
    key = page.locator("#key-gate").get_by_label("Key")
    await expect(key).to_be_focused()  # asked for, the key field has the focus
    await page.keyboard.type(API_KEY)
    await page.keyboard.press("Enter")
    await expect(page.locator("[data-test=audit] tbody tr").first).to_be_visible()
    await expect(page.locator("#main")).to_be_focused()

    await page.reload()  # the key is kept: straight to the page, focus at its start
    await expect(page.locator("[data-test=audit] tbody tr").first).to_be_visible()
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    for _ in range(8):  # on through the navigation
        await page.keyboard.press("Tab")
        if await page.evaluate("() => document.activeElement.textContent") == "Sessions":
            break
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/ui/sessions")
    state = page.get_by_role("search").get_by_label("State")
    await state.focus()
    await page.keyboard.press("ArrowDown")  # any → active
    await expect(state).to_have_value("active")
    for _ in range(6):  # on to the Search button
        await page.keyboard.press("Tab")
        if await page.evaluate("() => document.activeElement.textContent") == "Search":
            break
    await page.keyboard.press("Enter")
    await page.wait_for_url("**/ui/sessions?state=active")
    assert browser.errors == []


async def test_clients_appear_and_go_live_without_reload(
    browser: Browser, devices: Clients
) -> None:
    await devices.device("dev-early")
    page = await browser.open("/ui/clients")
    await browser.enter_key()
    rows = page.locator("[data-test=clients] tbody tr")
    await expect(rows).to_have_count(1)
    await expect(page.locator(".badge", has_text="live")).to_have_text("live")
    await page.evaluate("() => { window.notReloaded = true; }")

    device = await devices.device("dev-live", system_info={"cpu": 2})
    live_row = rows.filter(has_text="dev-live")
    await expect(live_row).to_be_visible(timeout=2000)
    await expect(rows.first).to_contain_text("dev-live")  # newest first
    await browser.screenshot("clients")
    await device.close()
    await expect(live_row).to_have_count(0, timeout=2000)
    await expect(rows).to_have_count(1)
    assert await page.evaluate("() => window.notReloaded") is True
    assert browser.errors == []


async def test_the_clients_filter_survives_a_reload_and_applies_to_live_joins(
    browser: Browser, devices: Clients
) -> None:
    await devices.device("dev-1")
    await devices.constellation("const-1")
    page = await browser.open("/ui/clients")
    await browser.enter_key()
    rows = page.locator("[data-test=clients] tbody tr")
    await expect(rows).to_have_count(2)
    form = page.get_by_role("search")
    await form.get_by_label("Type").select_option("constellation")
    await form.get_by_role("button", name="Search").click()
    await expect(rows).to_have_count(1)
    assert "type=constellation" in page.url
    await page.reload()
    await expect(page.locator(".badge", has_text="live")).to_have_text("live")
    await expect(rows).to_have_count(1)
    await expect(rows).to_contain_text("const-1")
    await devices.device("dev-2")
    await devices.constellation("const-2")
    await expect(rows.first).to_contain_text("const-2")
    await expect(rows).to_have_count(2)  # dev-2 joined, but is not a constellation
    assert browser.errors == []


async def test_docs_render_swagger_ui_from_the_package(browser: Browser) -> None:
    """The browser here has no internet: what /docs shows came from the server."""
    requested: list[str] = []
    browser.page.on("request", lambda request: requested.append(request.url))
    page = await browser.open("/docs")
    await expect(page.locator(".swagger-ui .title")).to_contain_text("registry")
    await expect(page.locator(".opblock-summary-path", has_text="/api/events")).to_be_visible()
    await browser.screenshot("docs")
    assert all(url.startswith(browser.base_url) for url in requested), requested
    assert browser.errors == []


async def test_tables_export_as_csv_without_formulas(browser: Browser, devices: Clients) -> None:
    await devices.device("=HYPERLINK(1)")
    await devices.device("dev, with comma")
    page = await browser.open("/ui/clients")
    await browser.enter_key()
    await expect(page.locator("[data-test=clients] tbody tr")).to_have_count(2)
    async with page.expect_download() as download_info:
        await page.get_by_role("button", name="Export this page as CSV").click()
    download = await download_info.value
    assert download.suggested_filename == "clients.csv"
    text = await asyncio.to_thread(Path(await download.path()).read_text)
    header, *rows = csv.reader(io.StringIO(text))
    assert header == ["client_id", "client_type", "platform", "node_id", "connected_at (UTC)"]
    # A comma is quoted; a cell a spreadsheet would run as a formula is text.
    assert sorted(row[0] for row in rows) == ["'=HYPERLINK(1)", "dev, with comma"]
    assert {row[1] for row in rows} == {"device"}
    assert browser.errors == []
