"""Shared helpers for the web proxy tests: a real route feed, the proxy, backends, clients.

Routes always travel the real way: ``RouteFeed`` served by ``serve_http`` on 127.0.0.1 →
``RouteFeedClient`` → ``RouteTable`` → the proxy. Every listener binds port 0 and reports
its port through ``nursery.start``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.feed_client import RouteFeedClient
from dask_gateway_common.http import Request, Response, open_http_connection, serve_http
from dask_gateway_common.metrics import ProxyMetrics, new_registry
from dask_gateway_common.routes import Route, RouteTable
from dask_gateway_web_proxy.pool import UpstreamPool
from dask_gateway_web_proxy.proxy import ProxyTimeouts, WebProxy, serve_web_proxy

TOKEN = "web-proxy-test-token"
TEST_TIMEOUTS = ProxyTimeouts(connect=5, response=5, body_idle=10)


@dataclass
class ProxyEnv:
    feed: RouteFeed
    table: RouteTable
    feed_url: str
    port: int
    pool: UpstreamPool
    metrics: ProxyMetrics
    nursery: trio.Nursery
    proxy: WebProxy | None = None

    async def route(self, path: str, target: str) -> None:
        """Publish a PATH route on the feed and wait until the proxy's table has it."""
        route = Route("PATH", path, target)
        self.feed.put(route)
        with trio.fail_after(5):
            while self.table.get("PATH", path) != route:
                await self.table.wait_changed(self.table.version)

    async def unroute(self, path: str) -> None:
        self.feed.delete("PATH", path)
        with trio.fail_after(5):
            while self.table.get("PATH", path) is not None:
                await self.table.wait_changed(self.table.version)


@asynccontextmanager
async def open_proxy(
    timeouts: ProxyTimeouts = TEST_TIMEOUTS,
    **kwargs: object,
) -> AsyncIterator[ProxyEnv]:
    async with trio.open_nursery() as nursery:
        feed = RouteFeed(heartbeat=1)
        _, feed_port = await nursery.start(
            partial(serve_http, make_feed_handler(feed, TOKEN), "127.0.0.1", 0)
        )
        feed_url = f"http://127.0.0.1:{feed_port}/api/v1/routes"
        table = RouteTable()
        client = RouteFeedClient(feed_url, TOKEN, table, kinds={"PATH"})
        await nursery.start(client.run)
        with trio.fail_after(5):
            await client.synced.wait()
        pool = UpstreamPool(connect_timeout=timeouts.connect)
        metrics = ProxyMetrics(new_registry())
        _, port = await nursery.start(
            partial(
                serve_web_proxy,
                table,
                "127.0.0.1",
                0,
                timeouts=timeouts,
                pool=pool,
                metrics=metrics,
                **kwargs,
            )
        )
        try:
            yield ProxyEnv(feed, table, feed_url, port, pool, metrics, nursery)
        finally:
            nursery.cancel_scope.cancel()
            await pool.aclose()


@dataclass
class Seen:
    """What a recording backend saw."""

    requests: list[dict[str, object]] = field(default_factory=list)

    @property
    def client_ports(self) -> set[int]:
        return {r["client"][1] for r in self.requests}  # type: ignore[index]


def recording_handler(seen: Seen):
    """Backend that answers each request with a JSON echo of what it received."""

    async def handler(request: Request) -> Response:
        body = await request.read_body(limit=64 * 1024 * 1024)
        info = {
            "method": request.method,
            "target": request.target,
            "headers": request.headers.items(),
            "client": list(request.client) if request.client else None,
            "body_len": len(body),
        }
        seen.requests.append(info)
        return Response.json(info, headers=[("X-Backend", "yes")])

    return handler


async def start_backend(nursery: trio.Nursery, handler) -> int:  # noqa: ANN001
    _, port = await nursery.start(partial(serve_http, handler, "127.0.0.1", 0))
    return port


async def get(
    port: int,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    *,
    method: str = "GET",
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; returns (status, lower-cased headers, body)."""
    with trio.fail_after(10):
        conn = await open_http_connection("127.0.0.1", port)
        try:
            resp = await conn.request(method, target, headers or [], body)
            data = await resp.read()
        finally:
            await conn.aclose()
    return resp.status, {k.lower(): v for k, v in resp.headers.items()}, data


def header_map(info: dict[str, object]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in info["headers"]:  # type: ignore[union-attr]
        out.setdefault(k.lower(), []).append(v)
    return out


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes and read until the proxy closes the connection."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(data)
            buf = b""
            while chunk := await stream.receive_some(65536):
                buf += chunk
        finally:
            await stream.aclose()
    return buf


def loads(body: bytes) -> dict[str, object]:
    return json.loads(body)
