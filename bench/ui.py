"""Dashboard figures: the pages in headless Chromium against ``registry serve``.

Run from the repository root::

    python -m bench.ui            # 1,000,000 connection rows and 10,000 connected clients
    python -m bench.ui --quick    # 100,000 rows and 1,000 clients (a smoke run)

1. **Overview over 1,000,000 connection rows**: the data set of :mod:`bench.queries` (5,000
   clients over 30 days, SQLite), served by ``registry serve --no-auth``.
2. **Clients with 10,000 connected clients**: real registered WebSocket connections held by
   client processes (:mod:`bench.server_client`), on a fresh SQLite file.

For each page: *first render* is the first contentful paint and *data shown* the moment the
page's data is on screen (the ``registry:data-shown`` performance mark, set once the page's
``/api`` answers are rendered), both from navigation start, median of several loads, each in
a fresh browser context (nothing cached). The goal is under 1 s for both. Then the time of
each JSON route behind the page, as an HTTP client on the same machine sees it (median and
p95). For the Clients page also: how long a new registration takes to appear on the open
page (pushed over ``/api/events``). Chromium is Debian's (``/usr/bin/chromium``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from playwright.async_api import Browser, async_playwright
from websockets.asyncio.client import connect

from bench import queries, seed
from bench.client import CLOSE, Workers, raise_fd_limit
from bench.report import ms, percentile, progress_printer, table, yes_no
from bench.server import SETUP_TIMEOUT, held_summary, split
from bench.server_client import ClientJob, client_group
from bench.server_procs import MeasuredServer, start_registry
from registry.store import rollups
from registry.store.dialect import create_engine

CHROMIUM = "/usr/bin/chromium"
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
GOAL_SECONDS = 1.0
#: Where the first load of each page leaves its screenshot (ignored by git).
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "bench"


@dataclass(frozen=True, slots=True)
class Config:
    rows: int
    clients: int
    client_processes: int
    loads: int
    calls: int

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(rows=100_000, clients=1_000, client_processes=2, loads=3, calls=5)
        return cls(rows=1_000_000, clients=10_000, client_processes=4, loads=5, calls=20)


@dataclass(frozen=True, slots=True)
class PageTiming:
    page: str
    first_render: float
    data_shown: float


@dataclass(frozen=True, slots=True)
class RouteTiming:
    route: str
    median: float
    p95: float


progress = progress_printer("ui")


async def load_page(browser: Browser, url: str, name: str, screenshot: bool) -> PageTiming:
    """One cold load of ``url``: first contentful paint and data shown, in seconds."""
    context = await browser.new_context(viewport={"width": 1200, "height": 760})
    try:
        page = await context.new_page()
        await page.goto(url)
        await page.wait_for_function(
            "() => performance.getEntriesByName('registry:data-shown').length > 0"
            " && performance.getEntriesByName('first-contentful-paint').length > 0",
            timeout=60_000,
        )
        marks = await page.evaluate(
            """() => [performance.getEntriesByName('first-contentful-paint')[0].startTime,
                      performance.getEntriesByName('registry:data-shown')[0].startTime]"""
        )
        error = await page.locator("p.error").all_inner_texts()
        if any(text.strip() for text in error):
            raise RuntimeError(f"{url}: {error}")
        if screenshot:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
            await page.screenshot(path=SCREENSHOTS / f"{slug}.png")
        return PageTiming(name, marks[0] / 1000, marks[1] / 1000)
    finally:
        await context.close()


async def page_timings(browser: Browser, base: str, path: str, name: str, loads: int) -> PageTiming:
    timings = [await load_page(browser, base + path, name, n == 0) for n in range(loads)]
    return PageTiming(
        name,
        statistics.median(t.first_render for t in timings),
        statistics.median(t.data_shown for t in timings),
    )


async def route_timings(
    base: str, routes: Sequence[tuple[str, str]], calls: int
) -> list[RouteTiming]:
    """``calls`` sequential GETs of each (label, route)."""
    found = []
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        for label, route in routes:
            seconds = []
            for _ in range(calls):
                started = time.perf_counter()
                answer = await http.get(route)
                seconds.append(time.perf_counter() - started)
                answer.raise_for_status()
            found.append(RouteTiming(label, statistics.median(seconds), percentile(seconds, 0.95)))
            progress(f"  {label}: {found[-1].median * 1000:.1f} ms")
    return found


def _since(hours: int) -> str:
    at = datetime.now(UTC) - timedelta(hours=hours)
    return at.isoformat().replace("+00:00", "Z")


# -- the overview over a million connection rows ---------------------------------------------


@dataclass(frozen=True, slots=True)
class History:
    """The seeded history: what it holds, and ids to open pages on."""

    described: str
    client_id: str
    session_id: str


async def measure_overview(
    server: MeasuredServer, config: Config, history: History
) -> tuple[list[PageTiming], list[RouteTiming]]:
    """The overview (both windows) and the other history pages, then the overview's routes."""
    base = f"http://127.0.0.1:{server.port}"
    history_pages = [
        ("/ui/", "overview (24 h)"),
        ("/ui/?window=7d", "overview (7 days)"),
        (f"/ui/client?id={history.client_id}", "client (a typical device, 7 days)"),
        ("/ui/sessions?state=failed", "sessions (failed)"),
        (f"/ui/session?id={history.session_id}", "session"),
        ("/ui/audit", "audit"),
    ]
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages = [
                await page_timings(browser, base, path, name, config.loads)
                for path, name in history_pages
            ]
        finally:
            await browser.close()
    routes = []
    for hours, label in ((24, "24 h"), (168, "7 days")):
        since = _since(hours)
        routes += [
            (f"/api/stats?since=<{label} ago>", f"/api/stats?since={since}"),
            (f"/api/stats/hourly?since=<{label} ago>", f"/api/stats/hourly?since={since}"),
        ]
    routes += [
        (route, route)
        for route in (
            "/api/store",
            "/api/nodes?running=true",
            "/api/disconnects?abnormal=true&limit=20",
        )
    ]
    return pages, await route_timings(base, routes, config.calls)


async def build_history(path: Path, rows: int) -> History:
    shape = queries.Shape(
        connections=rows, clients=max(500, rows // 200), sessions=max(5_000, rows // 20)
    )
    progress(f"seeding {shape.describe()} ...")
    data = queries.generate(shape, int(time.time() * 1_000_000), random.Random(7))
    await queries.load_sqlite(path, data, analyze=False)
    # The rows went in behind the registry's back: bring its rollups in line, as the
    # migration's backfill does.
    engine = create_engine(seed.sqlite_url(path))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(rollups.rebuild)
    finally:
        await engine.dispose()
    return History(
        shape.describe(), data.typical_client(), queries.session_id(len(data.sessions) - 1)
    )


# -- the clients page with ten thousand connected clients -------------------------------------


async def measure_clients(
    server: MeasuredServer, config: Config
) -> tuple[list[PageTiming], list[RouteTiming], float]:
    base = f"http://127.0.0.1:{server.port}"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pages = [
                await page_timings(browser, base, "/ui/clients", "clients", config.loads),
                await page_timings(
                    browser, base, "/ui/clients?q=p1-99", "clients (id search)", config.loads
                ),
            ]
            live = await live_join(browser, server)
        finally:
            await browser.close()
    routes = [
        (route, route)
        for route in (
            "/api/online?limit=100",
            "/api/online?limit=100&q=p1-99",
            "/api/online?limit=100&type=device&platform=windows",
        )
    ]
    return pages, await route_timings(base, routes, config.calls), live


async def live_join(browser: Browser, server: MeasuredServer) -> float:
    """Seconds from sending a ``register`` frame to its row on the open Clients page."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(f"http://127.0.0.1:{server.port}/ui/clients")
        await page.wait_for_function(
            "() => performance.getEntriesByName('registry:data-shown').length > 0"
        )
        await page.locator(".badge.ok", has_text="live").wait_for()
        async with connect(server.ws_url) as ws:
            started = time.perf_counter()
            await ws.send(
                json.dumps(
                    {
                        "type": "register",
                        "status": "ok",
                        "client_type": "device",
                        "client_id": "0-live",  # sorts first: on the first page
                        "metadata": {"platform": "linux"},
                    }
                )
            )
            await page.locator("[data-test=clients] a", has_text="0-live").wait_for()
            return time.perf_counter() - started
    finally:
        await context.close()


def hold_clients(server: MeasuredServer, config: Config) -> Workers[ClientJob]:
    jobs = [
        ClientJob(
            kind="idle",
            url=server.ws_url,
            prefix=f"ui-p{index}",
            connections=share,
            system_info=True,
        )
        for index, share in enumerate(split(config.clients, config.client_processes))
    ]
    return client_group(jobs)


# -- report --------------------------------------------------------------------------------


def page_rows(pages: Sequence[PageTiming]) -> list[list[str]]:
    return [
        [
            timing.page,
            ms(timing.first_render),
            ms(timing.data_shown),
            "< 1 s",
            yes_no(timing.first_render < GOAL_SECONDS and timing.data_shown < GOAL_SECONDS),
        ]
        for timing in pages
    ]


def route_rows(routes: Sequence[RouteTiming]) -> list[list[str]]:
    return [[f"`{r.route}`", ms(r.median), ms(r.p95)] for r in routes]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--log-level", default="warning")
    options = parser.parse_args(argv)
    config = Config.make(options.quick)
    raise_fd_limit(config.clients * 2 + 1024)
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as directory:
        workdir = Path(directory)
        database = workdir / "history.db"
        history = asyncio.run(build_history(database, config.rows))
        server = start_registry(workdir, options.log_level, database_url=seed.sqlite_url(database))
        try:
            progress(f"overview on {history.described}")
            overview_pages, overview_routes = asyncio.run(measure_overview(server, config, history))
        finally:
            server.halt()

        server = start_registry(workdir, options.log_level)
        try:
            with hold_clients(server, config) as group:
                held = held_summary(group.gather(SETUP_TIMEOUT))
                progress(f"{held.opened:,} clients connected in {held.open_seconds:.1f}s")
                if held.opened != config.clients:
                    raise RuntimeError(f"only {held.opened} connected: {held.errors}")
                clients_pages, clients_routes, live = asyncio.run(measure_clients(server, config))
                group.send_all(CLOSE)
                group.gather(SETUP_TIMEOUT)
        finally:
            server.halt()

    live_row = [
        "clients: a new registration shown on the open page",
        "—",
        ms(live),
        "< 2 s",
        yes_no(live < 2),
    ]
    print(
        f"History pages over {history.described}; Clients with {config.clients:,} connected "
        f"clients (median of {config.loads} cold loads each):\n"
    )
    headers = ["Page", "First render", "Data shown", "Goal", "Met"]
    print(table(headers, [*page_rows(overview_pages), *page_rows(clients_pages), live_row]))
    print(f"\nJSON routes behind them ({config.calls} calls each, sequential, HTTP on loopback):\n")
    print(table(["Route", "Median", "p95"], route_rows([*overview_routes, *clients_routes])))


if __name__ == "__main__":
    main()
