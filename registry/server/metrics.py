"""Prometheus metrics for ``GET /metrics`` (text exposition format, prometheus-client).

Counters are fed from what the journal *commits* (its audit rows), so they count durable
events; gauges are read from this node's live map and journal at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from registry.audit import AuditKind
from registry.registry import Registry
from registry.server.peer import Peer
from registry.store.writes import Op, Row
from registry.types import SessionState

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class _LiveCollector(Collector):
    def __init__(self, registry: Registry[Peer]) -> None:
        self._registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        registry = self._registry
        online = GaugeMetricFamily(
            "registry_online_clients", "Clients connected to this node.", labels=["client_type"]
        )
        for kind, count in registry.online_counts().items():
            online.add_metric([kind.value], count)
        yield online
        sessions = GaugeMetricFamily(
            "registry_sessions", "Sessions this node knows, by state.", labels=["state"]
        )
        counts = registry.session_counts()
        for state in (SessionState.ACTIVE, SessionState.INTERRUPTED):
            sessions.add_metric([state.value], counts.get(state, 0))
        yield sessions
        status = registry.store_status()
        yield GaugeMetricFamily(
            "registry_journal_depth", "Operations queued and not yet committed.", status.depth
        )
        yield GaugeMetricFamily(
            "registry_journal_limit", "Journal depth at which new work is refused.", status.limit
        )
        yield GaugeMetricFamily(
            "registry_journal_bytes",
            "Bytes the queued operations hold (their documents' JSON size, 600 per operation).",
            status.depth_bytes,
        )
        yield GaugeMetricFamily(
            "registry_journal_limit_bytes",
            "Journal bytes at which new work is refused.",
            status.limit_bytes,
        )
        refused = CounterMetricFamily(
            "registry_journal_refused",
            "Registrations and sessions refused because the journal was full.",
            labels=["what"],
        )
        for what in ("registration", "session"):
            refused.add_metric([what], status.refused.get(what, 0))
        yield refused
        yield GaugeMetricFamily(
            "registry_store_healthy",
            "1 while the store keeps up; 0 while commits fail or stall or the journal is full "
            "(by operations or bytes).",
            0 if status.fault is not None else 1,
        )


class Metrics:
    """This app's metrics, in a collector registry of its own."""

    def __init__(self, registry: Registry[Peer]) -> None:
        self.collectors = CollectorRegistry(auto_describe=True)
        self._opened = Counter(
            "registry_connections_opened",
            "Connections opened (committed).",
            ["client_type"],
            registry=self.collectors,
        )
        self._closed = Counter(
            "registry_connections_closed",
            "Connections closed (committed), by reason.",
            ["reason"],
            registry=self.collectors,
        )
        self._ended = Counter(
            "registry_sessions_ended",
            "Sessions that reached a final state (committed).",
            ["state"],
            registry=self.collectors,
        )
        self._batch = Histogram(
            "registry_commit_batch_size",
            "Operations per group commit.",
            buckets=BATCH_BUCKETS,
            registry=self.collectors,
        )
        self._latency = Histogram(
            "registry_commit_seconds", "Duration of one group commit.", registry=self.collectors
        )
        self.collectors.register(_LiveCollector(registry))
        registry.journal.listeners.append(self.committed)

    def committed(self, batch: Sequence[tuple[Op, Row]], seconds: float) -> None:
        """Journal listener: count what a commit made durable."""
        self._batch.observe(len(batch))
        self._latency.observe(seconds)
        for op, row in batch:
            if op is not Op.AUDIT:
                continue
            kind, details = row["kind"], row["details"]
            if kind == AuditKind.CLIENT_REGISTERED:
                self._opened.labels(details.get("client_type", "")).inc()
            elif kind in (AuditKind.CLIENT_REMOVED, AuditKind.CLIENT_REPLACED):
                self._closed.labels(details.get("reason") or "").inc()
            elif kind == AuditKind.SESSION_ENDED:
                self._ended.labels(details.get("state", "")).inc()

    def render(self) -> bytes:
        return generate_latest(self.collectors)
