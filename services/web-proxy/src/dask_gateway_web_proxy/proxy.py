"""The web proxy's I/O shell: one HTTP handler that forwards each request upstream.

Theory of operation
-------------------
``serve_web_proxy`` runs the shared HTTP server (``dask_gateway_common.http.serve_http``)
with :meth:`WebProxy.handle` as its handler, plus a sweeper for the upstream pool.

Per request the handler:

1. routes the path with the :class:`~.routing.Router` built from the table's PATH routes
   (rebuilt only when ``table.version`` moves); no route → ``404 Not Found`` (text/plain);
2. rewrites target and headers (pure functions in :mod:`.routing`);
3. takes a keep-alive connection for the target's origin from :class:`~.pool.UpstreamPool`
   (connect failure → 502);
4. sends the request, streaming the client's body straight into the upstream connection
   (each write bounded by ``upload_idle``: an upstream that stops reading gets a 504), and
   waits at most ``response_timeout`` per read for the response head (→ 504). A request
   without a body that fails on a *reused* connection is retried once on a fresh one (the
   upstream may have closed it between our liveness check and the request);
5. a response body of known size up to ``SMALL_BODY`` is read whole, the upstream
   connection goes straight back to the pool, and the answer leaves in one write. Any
   other body is returned as an async generator pulling the upstream body chunk by chunk
   (Content-Length bodies straight off the socket, see ``dask_gateway_common.http``), so
   memory stays constant whatever the size; when it ends cleanly the connection goes back
   to the pool, otherwise it is closed. If the upstream breaks off mid-body the generator
   raises ``BrokenResourceError`` so the server aborts the client connection instead of
   ending the response as if it were complete;
6. for an upgrade request answered ``101``, returns ``Upgrade``: the server sends the 101
   and hands over the raw client stream; we first forward whatever bytes either side had
   already buffered, then relay bytes both ways until both directions close.

Measured with bench/proxies.py --skip-scheduler on the shared 2-core VM (same run, Go =
upstream's dask-gateway-proxy): small GETs over 64 keep-alive connections 158 µs of proxy
CPU per request (Go 245), 1.9x Go's req/s, p99 0.7x Go's; a 1 GiB download 0.46 CPU s/GiB
(Go 0.89) at the same MB/s, RSS flat. Per small request the cost is now mostly the two
waits in trio's scheduler, the two heads (parse + encode, ``dask_gateway_common.http1``)
and the header rewriting; bodies of any size cost no Python work per byte when spliced.

Errors sent to the client are short plain-text bodies; details go to the log (never with
query strings or headers, which may carry secrets).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import h11
import trio

from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import (
    ClientResponse,
    HTTPConnection,
    HTTPLimits,
    Passthrough,
    Request,
    Response,
    Upgrade,
    serve_http,
)
from dask_gateway_common.metrics import ProxyMetrics
from dask_gateway_common.relay import relay
from dask_gateway_common.routes import RouteTable
from dask_gateway_common.streams import PrefixedStream

from .access import DashboardAccess
from .pool import UpstreamPool
from .routing import (
    ProxyRoute,
    Router,
    is_upgrade_request,
    origin_form,
    rewrite_request_headers,
    rewrite_response_headers,
    upstream_target,
)

__all__ = ["ProxyTimeouts", "WebProxy", "default_limits", "serve_web_proxy"]

log = logging.getLogger("dask_gateway.web_proxy")

# A response body of known size up to this is read whole and answered in one write.
SMALL_BODY = 64 * 1024

_UPSTREAM_ERRORS = (
    OSError,
    ssl.SSLError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.ProtocolError,
)


@dataclass(frozen=True)
class ProxyTimeouts:
    """Deadlines towards upstreams (seconds)."""

    connect: float = 10.0
    response: float = 60.0
    # Longest silence allowed while streaming a response body from an upstream.
    body_idle: float = 300.0
    # Longest time one write to the upstream may take: bounds an upstream that stops
    # reading an upload (a client that stops sending is bounded by the listener's
    # body_timeout).
    upload_idle: float = 120.0


def default_limits() -> HTTPLimits:
    """Client-side limits of the public listener: headers bounded, bodies streamed."""
    return HTTPLimits(
        max_header_bytes=16 * 1024,
        max_body_bytes=1024 * 1024,  # only bounds what is drained after an early response
        header_timeout=10.0,
        body_timeout=60.0,
        keepalive_timeout=75.0,
        send_timeout=60.0,
    )


def _text(status: int, message: str) -> Response:
    return Response.text(status, message)


def _has_body(headers: list[tuple[str, str]]) -> bool:
    for name, value in headers:
        lname = name.lower()
        if lname == "transfer-encoding":
            return True
        if lname == "content-length" and value.strip() not in ("", "0"):
            return True
    return False


class WebProxy:
    """The proxy's request handler and its state (router cache, upstream pool)."""

    def __init__(
        self,
        table: RouteTable,
        *,
        pool: UpstreamPool,
        timeouts: ProxyTimeouts = ProxyTimeouts(),
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.table = table
        self.pool = pool
        self.timeouts = timeouts
        self.metrics = metrics
        self._router = Router()
        self._router_version = -1
        # Labelled children looked up once, not per request.
        self._by_code: dict[int, Any] = {}
        self._bytes_up = metrics.bytes_total.labels(direction="up") if metrics else None
        self._bytes_down = metrics.bytes_total.labels(direction="down") if metrics else None

    # -- routing ---------------------------------------------------------------------
    @property
    def router(self) -> Router:
        """The trie for the table's current version (rebuilt only when it changed)."""
        version = self.table.version
        if version != self._router_version:
            router = Router.from_routes(self.table.routes("PATH"))
            for path, reason in router.rejected:
                log.warning("Ignoring PATH route %s: %s", path, reason)
            self._router, self._router_version = router, version
        return self._router

    # -- handler ---------------------------------------------------------------------
    async def handle(self, request: Request) -> Response | Upgrade:
        """The ``serve_http`` handler."""
        try:
            response = await self._handle(request)
        except GatewayError as exc:
            self._count(exc.status)
            raise
        self._count(response.status)
        return response

    def _count(self, status: int) -> None:
        if self.metrics is None:
            return
        child = self._by_code.get(status)
        if child is None:
            child = self._by_code[status] = self.metrics.http_requests_total.labels(
                code=str(status)
            )
        child.inc()

    async def _counted_upload(self, request: Request) -> AsyncGenerator[bytes, None]:
        counter = self._bytes_up
        async with aclosing(request.iter_body()) as chunks:
            async for chunk in chunks:
                if counter is not None:
                    counter.inc(len(chunk))
                yield chunk

    async def _handle(self, request: Request) -> Response | Upgrade:
        split = origin_form(request.target)
        if split is None:
            return _text(400, "Bad Request: unsupported request-target")
        path, query = split
        matched = self.router.match(path)
        if matched is None:
            return _text(404, "Not Found")
        route, remainder = matched
        items = request.headers.items()
        upgrade = is_upgrade_request(items)
        headers = rewrite_request_headers(
            items,
            authority=route.target.authority,
            client_ip=request.client[0] if request.client else None,
            proto=request.scheme,
            upgrade=upgrade,
        )
        target = upstream_target(route.target, remainder, query)
        has_body = _has_body(items)
        timeouts = self.timeouts
        # A request without body can be retried once on a fresh connection.
        for attempt in (1, 2):
            try:
                connection, reused = await self.pool.acquire(route.target)
            except (OSError, ssl.SSLError, trio.TooSlowError) as exc:
                log.info(
                    "Upstream %s for %s unreachable: %s", route.target.authority, route.path, exc
                )
                return _text(502, "Bad Gateway")
            upload = self._counted_upload(request) if has_body else None
            try:
                # Each write upstream may take upload_idle (an upstream that stops
                # reading); each read of the response head, the response timeout.
                upstream = await connection.request(
                    request.method,
                    target,
                    headers,
                    b"" if upload is None else upload,
                    response_timeout=timeouts.response,
                    send_timeout=timeouts.upload_idle,
                )
            except trio.TooSlowError:
                await connection.aclose()
                log.info("Upstream %s for %s timed out", route.target.authority, route.path)
                return _text(504, "Gateway Timeout")
            except GatewayError:
                # the *client* failed while we streamed its body upstream
                await connection.aclose()
                raise
            except _UPSTREAM_ERRORS as exc:
                await connection.aclose()
                if reused and not has_body and attempt == 1:
                    continue
                log.info("Upstream %s for %s failed: %s", route.target.authority, route.path, exc)
                return _text(502, "Bad Gateway")
            except BaseException:
                await connection.aclose()
                raise
            finally:
                if upload is not None:
                    await upload.aclose()
            return await self._respond(request, route, connection, upstream, upgrade)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _respond(
        self,
        request: Request,
        route: ProxyRoute,
        connection: HTTPConnection,
        upstream: ClientResponse,
        upgrade: bool,
    ) -> Response | Upgrade:
        if upstream.status == 101:
            stream = upstream.upgraded_stream
            if not upgrade or stream is None:
                await connection.aclose()
                log.info("Upstream %s sent an unrequested 101", route.target.authority)
                return _text(502, "Bad Gateway")
            return Upgrade(
                headers=rewrite_response_headers(upstream.headers.items(), upgrade=True),
                relay=_upgrade_relay(stream, upstream.trailing, self.metrics),
                on_abort=connection.aclose,
            )
        headers = rewrite_response_headers(upstream.headers.items())
        origin = route.target.origin
        if request.method == "HEAD" or upstream.status in (204, 304):
            try:
                with trio.fail_after(self.timeouts.response):
                    await upstream.read(limit=0)
            except (*_UPSTREAM_ERRORS, GatewayError, trio.TooSlowError):
                await connection.aclose()
            else:
                await self.pool.release(origin, connection)
            # serve_http keeps the upstream's Content-Length on a HEAD answer.
            return Response(upstream.status, headers, b"")
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY:
            # Small and of known size: read it whole (bounded memory), free the upstream
            # connection at once, and answer in one write.
            try:
                body = await upstream.read(timeout=self.timeouts.body_idle)
            except (*_UPSTREAM_ERRORS, trio.TooSlowError) as exc:
                await connection.aclose()
                log.info(
                    "Upstream %s for %s broke off the response: %s",
                    route.target.authority,
                    route.path,
                    exc,
                )
                return _text(502, "Bad Gateway")
            await self.pool.release(origin, connection)
            if self._bytes_down is not None:
                self._bytes_down.inc(len(body))
            return Response(upstream.status, headers, body)
        return Response(upstream.status, headers, self._passthrough(route, connection, upstream))

    def _passthrough(
        self, route: ProxyRoute, connection: HTTPConnection, upstream: ClientResponse
    ) -> Passthrough:
        """The upstream body, streamed (spliced socket to socket when both are plain TCP
        and it has a Content-Length); memory stays constant whatever its size."""
        origin = route.target.origin
        counter = self._bytes_down

        async def on_end(complete: bool) -> None:
            if complete:
                await self.pool.release(origin, connection)
                return
            await connection.aclose()
            if body.upstream_error is not None:
                log.info(
                    "Upstream %s for %s broke off the response: %s",
                    route.target.authority,
                    route.path,
                    body.upstream_error,
                )

        body = Passthrough(
            upstream,
            idle_timeout=self.timeouts.body_idle,
            on_bytes=None if counter is None else counter.inc,
            on_end=on_end,
        )
        return body


def _upgrade_relay(
    upstream: trio.abc.Stream, upstream_buffered: bytes, metrics: ProxyMetrics | None
) -> Callable[[trio.abc.Stream, bytes], Awaitable[None]]:
    on_bytes = None
    if metrics is not None:
        counters = {d: metrics.bytes_total.labels(direction=d) for d in ("up", "down")}

        def on_bytes(direction: str, count: int) -> None:
            counters[direction].inc(count)

    async def run(client: trio.abc.Stream, client_buffered: bytes) -> None:
        # Bytes either side sent right behind its HTTP head are replayed first; the relay
        # closes both streams when it returns.
        try:
            await relay(
                PrefixedStream(client, client_buffered),
                PrefixedStream(upstream, upstream_buffered),
                on_bytes=on_bytes,
            )
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(upstream)

    return run


async def serve_web_proxy(
    table: RouteTable,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeouts: ProxyTimeouts = ProxyTimeouts(),
    limits: HTTPLimits | None = None,
    pool: UpstreamPool | None = None,
    metrics: ProxyMetrics | None = None,
    access: DashboardAccess | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the proxy on ``host:port`` until cancelled; reports the bound ``(host, port)``.

    ``table`` is read on every request (keep it updated with a ``RouteFeedClient``);
    ``metrics`` (optional) counts answered requests by status and body/relay bytes;
    ``access`` (optional) admits requests into dashboards only with the API's consent.
    """
    own_pool = pool is None
    if pool is None:
        pool = UpstreamPool(connect_timeout=timeouts.connect)
    proxy = WebProxy(table, pool=pool, timeouts=timeouts, metrics=metrics)
    handler = proxy.handle
    # --- dashboard access hook (access.py): owner-only dashboards ---
    if access is not None:
        handler = access.gate(proxy.handle, lambda path: proxy.router.match(path), proxy._count)
    # --- end of the dashboard access hook ---
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run_sweeper, 15.0)
            bound = await nursery.start(
                lambda task_status: serve_http(
                    handler,
                    host,
                    port,
                    limits=limits or default_limits(),
                    ssl_context=ssl_context,
                    count_connection=_connection_counter(metrics),
                    task_status=task_status,
                )
            )
            task_status.started(bound)
    finally:
        if own_pool:
            await pool.aclose()


def _connection_counter(metrics: ProxyMetrics | None) -> Callable[[int], None] | None:
    if metrics is None:
        return None

    def count(delta: int) -> None:
        metrics.connections_active.inc(delta)
        if delta > 0:
            metrics.connections_total.inc()

    return count
