"""Admin endpoint over real sockets: health, readiness before/after sync, metrics, routes."""

from __future__ import annotations

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from dask_gateway_common.admin import serve_admin
from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.feed_client import RouteFeedClient
from dask_gateway_common.http import HTTPClient, serve_http
from dask_gateway_common.metrics import ProxyMetrics, new_registry, render_metrics
from dask_gateway_common.routes import Route, RouteTable

TOKEN = "admin-test-token"
AUTH = [("Authorization", f"token {TOKEN}")]


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def setup(nursery: trio.Nursery):
    feed = RouteFeed(heartbeat=30)
    feed.put(Route("SNI", "a", "tls://10.0.0.1:8786"))
    feed.put(Route("PATH", "/clusters/a", "http://10.0.0.1:8787"))
    feed.put(Route("PATH", "/", "http://api:8000"))
    _, feed_port = await nursery.start(serve_http, make_feed_handler(feed, TOKEN), "127.0.0.1", 0)
    table = RouteTable()
    client = RouteFeedClient(
        f"http://127.0.0.1:{feed_port}/api/v1/routes",
        TOKEN,
        table,
        backoff_min=0.01,
        backoff_max=0.05,
    )
    registry = new_registry()
    metrics = ProxyMetrics(registry)
    _, admin_port = await nursery.start(
        lambda task_status: serve_admin(
            "127.0.0.1",
            0,
            table=table,
            feed=client,
            token=TOKEN,
            registry=registry,
            task_status=task_status,
        )
    )
    return feed, table, client, registry, metrics, f"http://127.0.0.1:{admin_port}"


async def test_health_readiness_and_routes(nursery: trio.Nursery) -> None:
    feed, table, client, _registry, _metrics, base = await setup(nursery)
    async with HTTPClient() as http:
        with trio.fail_after(5):
            r = await http.fetch("GET", base + "/healthz")
            assert (r.status, r.json()) == (200, {"status": "ok"})
            # the feed client has not run yet: not ready
            r = await http.fetch("GET", base + "/readyz")
            assert r.status == 503
            assert r.headers.get("Content-Type") == "application/json"
            assert r.json()["status"] == "not ready" and r.json()["feed_state"] == "connecting"

            await nursery.start(client.run)
            await client.synced.wait()
            r = await http.fetch("GET", base + "/readyz")
            assert (r.status, r.json()["status"]) == (200, "ok")

            r = await http.fetch("GET", base + "/routes", headers=AUTH)
            assert r.status == 200
            assert sorted(r.json()["routes"], key=str) == sorted(
                [x.to_json() for x in feed.table.routes()], key=str
            )
            r = await http.fetch(
                "GET", base + "/routes?kind=SNI", headers=[("Authorization", f"Bearer {TOKEN}")]
            )
            assert r.json() == {
                "routes": [{"kind": "SNI", "sni": "a", "target": "tls://10.0.0.1:8786"}]
            }
            r = await http.fetch("GET", base + "/routes?kind=TCP", headers=AUTH)
            assert r.status == 422
            for headers in ([], [("Authorization", "token nope")], [("Authorization", "token")]):
                r = await http.fetch("GET", base + "/routes", headers=headers)
                assert r.status == 401
                assert r.headers.get("WWW-Authenticate") == "token"
            r = await http.fetch("GET", base + "/nope")
            assert r.status == 404
            r = await http.fetch("POST", base + "/healthz")
            assert r.status == 405


async def test_readyz_reports_feed_errors(nursery: trio.Nursery) -> None:
    # a port nobody listens on: bind one, then close it
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    dead_port = sock.getsockname()[1]
    sock.close()
    secret = "never-shown-token"
    table = RouteTable()
    client = RouteFeedClient(
        f"http://127.0.0.1:{dead_port}/api/v1/routes",
        secret,
        table,
        backoff_min=0.01,
        backoff_max=0.02,
    )
    _, port = await nursery.start(
        lambda task_status: serve_admin(
            "127.0.0.1",
            0,
            table=table,
            feed=client,
            token=TOKEN,
            registry=new_registry(),
            task_status=task_status,
        )
    )
    await nursery.start(client.run)
    async with HTTPClient() as http:
        with trio.fail_after(5):
            await client.wait_until(lambda c: c.errors >= 1)
            r = await http.fetch("GET", f"http://127.0.0.1:{port}/readyz")
    assert r.status == 503
    assert r.json()["last_error"]
    assert secret not in r.body.decode()


async def test_metrics(nursery: trio.Nursery) -> None:
    feed, _table, client, registry, metrics, base = await setup(nursery)
    metrics.connections_total.inc()
    metrics.connections_active.inc()
    metrics.bytes_total.labels(direction="up").inc(100)
    metrics.hello_errors_total.labels(reason="not_tls").inc()
    metrics.http_requests_total.labels(code="404").inc()
    async with HTTPClient() as http:
        with trio.fail_after(5):
            r = await http.fetch("GET", base + "/metrics")
            assert r.status == 200
            assert r.headers.get("Content-Type", "").startswith("text/plain")
            s = samples(r.body)
            assert s[("dask_gateway_proxy_routes", (("kind", "SNI"),))] == 0
            assert s[("dask_gateway_proxy_feed_connected", ())] == 0
            assert s[("dask_gateway_proxy_feed_last_sync_timestamp_seconds", ())] == 0
            assert s[("dask_gateway_proxy_connections_total", ())] == 1
            assert s[("dask_gateway_proxy_connections_active", ())] == 1
            assert s[("dask_gateway_proxy_bytes_total", (("direction", "up"),))] == 100
            assert s[("dask_gateway_proxy_bytes_total", (("direction", "down"),))] == 0
            assert s[("dask_gateway_proxy_hello_errors_total", (("reason", "not_tls"),))] == 1
            assert s[("dask_gateway_proxy_http_requests_total", (("code", "404"),))] == 1

            await nursery.start(client.run)
            await client.wait_until(lambda c: c.state == "watching")
            feed.put(Route("SNI", "b", "tls://10.0.0.2:8786"))
            await client.wait_until(lambda c: c.events_applied == 1)
            s = samples((await http.fetch("GET", base + "/metrics")).body)
            assert s[("dask_gateway_proxy_routes", (("kind", "SNI"),))] == 2
            assert s[("dask_gateway_proxy_routes", (("kind", "PATH"),))] == 2
            assert s[("dask_gateway_proxy_feed_connected", ())] == 1
            assert s[("dask_gateway_proxy_feed_last_sync_timestamp_seconds", ())] > 1e9
            assert s[("dask_gateway_proxy_feed_resyncs_total", ())] == 0
            assert s[("dask_gateway_proxy_feed_events_total", ())] == 1
    # the same registry renders directly too
    data, content_type = render_metrics(registry)
    assert b"dask_gateway_proxy_routes" in data and content_type.startswith("text/plain")
