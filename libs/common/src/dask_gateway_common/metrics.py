"""Prometheus helpers and the metric families both proxies share.

Each service makes its own ``CollectorRegistry`` (no global default registry, so tests and
several services in one process never collide). Data-path metrics live in
:class:`ProxyMetrics` (the proxies increment them as traffic flows); route-table and
route-feed metrics are computed at scrape time by :class:`FeedCollector`, which
``serve_admin`` registers, so they are always current and never double-counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from .routes import KINDS, RouteTable

if TYPE_CHECKING:
    from .feed_client import RouteFeedClient

__all__ = [
    "PREFIX",
    "FeedCollector",
    "ProxyMetrics",
    "new_registry",
    "render_metrics",
]

PREFIX = "dask_gateway_proxy"


def new_registry() -> CollectorRegistry:
    """A fresh registry for one service."""
    return CollectorRegistry(auto_describe=True)


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``registry`` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


class ProxyMetrics:
    """Data-path metric families shared by the scheduler proxy and the web proxy.

    Exposed names: ``dask_gateway_proxy_connections_active``,
    ``..._connections_total``, ``..._bytes_total{direction="up"|"down"}``
    (up = client → backend), ``..._hello_errors_total{reason}`` (scheduler proxy),
    ``..._http_requests_total{code}`` (web proxy).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections_active = Gauge(
            f"{PREFIX}_connections_active",
            "Client connections currently open.",
            registry=registry,
        )
        self.connections_total = Counter(
            f"{PREFIX}_connections",
            "Client connections accepted.",
            registry=registry,
        )
        self.bytes_total = Counter(
            f"{PREFIX}_bytes",
            "Bytes relayed; up = client to backend, down = backend to client.",
            ["direction"],
            registry=registry,
        )
        self.hello_errors_total = Counter(
            f"{PREFIX}_hello_errors",
            "Connections closed before routing, by reason (scheduler proxy).",
            ["reason"],
            registry=registry,
        )
        self.http_requests_total = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests answered, by status code (web proxy).",
            ["code"],
            registry=registry,
        )
        for direction in ("up", "down"):
            self.bytes_total.labels(direction=direction)


class FeedCollector(Collector):
    """Scrape-time metrics of a route table and the feed client that fills it.

    ``dask_gateway_proxy_routes{kind}``, ``..._feed_connected`` (1 while watching),
    ``..._feed_last_sync_timestamp_seconds`` (0 before the first sync),
    ``..._feed_resyncs_total``, ``..._feed_errors_total``, ``..._feed_events_total``.
    """

    def __init__(self, table: RouteTable, feed: RouteFeedClient) -> None:
        self.table = table
        self.feed = feed

    def collect(self) -> Iterator[Metric]:
        routes = GaugeMetricFamily(f"{PREFIX}_routes", "Routes in the table.", labels=["kind"])
        for kind in KINDS:
            routes.add_metric([kind], self.table.count(kind))
        yield routes
        yield GaugeMetricFamily(
            f"{PREFIX}_feed_connected",
            "1 while the route feed watch is open.",
            value=1 if self.feed.state == "watching" else 0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_feed_last_sync_timestamp_seconds",
            "Unix time of the last complete route list (0: never).",
            value=self.feed.last_sync or 0,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_feed_resyncs",
            "Full route lists after the first one.",
            value=self.feed.resyncs,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_feed_errors",
            "Route feed errors (each followed by a backoff).",
            value=self.feed.errors,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_feed_events",
            "Route events applied from the watch stream.",
            value=self.feed.events_applied,
        )
