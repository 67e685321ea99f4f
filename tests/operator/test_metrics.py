"""GET /metrics: Prometheus text format, protected like /api unless metrics_open."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from registry.types import ClientType
from tests.operator.conftest import Fleet, running_server
from tests.support import WAIT, Clients

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_need_the_key_and_count_what_happened(fleet: Fleet) -> None:
    async with fleet.http(api_key=None) as anonymous, fleet.http(api_key="nope") as wrong:
        assert (await anonymous.get("/metrics")).status_code == 401
        assert (await wrong.get("/metrics")).status_code == 401
    async with fleet.http() as http:
        samples = await scrape(http)
        devices = len(fleet.registry.get_clients_by_type(ClientType.DEVICE))
        assert devices == 2
        assert value(samples, "registry_online_clients", client_type="device") == devices
        assert value(samples, "registry_online_clients", client_type="constellation") == 1
        assert value(samples, "registry_connections_opened_total", client_type="device") == 4
        assert value(samples, "registry_connections_opened_total", client_type="constellation") == 1
        assert value(samples, "registry_connections_closed_total", reason="bye") == 1
        assert value(samples, "registry_connections_closed_total", reason="leaving") == 1
        assert value(samples, "registry_sessions_ended_total", state="completed") == 2
        assert value(samples, "registry_sessions_ended_total", state="failed") == 1
        assert value(samples, "registry_sessions", state="active") == 1
        # The scenario ended with flush(): only the node's lease beat, journaled one at a time
        # every heartbeat_interval, may be queued.
        assert value(samples, "registry_journal_depth") <= 1
        assert value(samples, "registry_store_healthy") == 1
        batches = value(samples, "registry_commit_batch_size_count")
        assert batches > 0
        assert value(samples, "registry_commit_batch_size_sum") >= batches
        assert value(samples, "registry_commit_seconds_count") == batches
        assert value(samples, "registry_commit_seconds_bucket", le="+Inf") == batches

        # The gauges follow the live map; the counters follow what is committed.
        await fleet.live["dev-win"].close()
        deadline = time.monotonic() + WAIT
        while True:
            samples = await scrape(http)
            closed = samples.get(
                ("registry_connections_closed_total", (("reason", "client_closed"),))
            )
            if closed == 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert closed == 1
        assert value(samples, "registry_online_clients", client_type="device") == 1
        assert value(samples, "registry_connections_closed_total", reason="bye") == 1


async def test_metrics_open_serves_without_key(database_url: str) -> None:
    async with running_server(database_url, metrics_open=True) as server:
        clients = Clients(server)
        try:
            await clients.register("dev-m", platform="linux")
            await server.registry.flush()
            async with server.http(api_key=None) as anonymous:
                samples = await scrape(anonymous)
                assert value(samples, "registry_online_clients", client_type="device") == 1
                assert (
                    value(samples, "registry_connections_opened_total", client_type="device") == 1
                )
                # Only /metrics is open: /api still needs the key.
                assert (await anonymous.get("/api/clients")).status_code == 401
        finally:
            await clients.aclose()
