"""The proxies' admin endpoint: health, readiness, metrics and the current route table.

- ``GET /healthz`` → 200 ``{"status": "ok"}`` while the process serves.
- ``GET /readyz``  → 200 once the route feed completed its first list, else 503 with why.
- ``GET /metrics`` → Prometheus text; route and feed metrics are computed at scrape time.
- ``GET /routes``  → ``{"routes": [...]}`` of the current table; needs the proxy token
  (``token``/``Bearer``, constant-time compare, 401 ``WWW-Authenticate: token``).
  ``?kind=SNI|PATH`` narrows it.
- anything else → 404; other methods → 405.
"""

from __future__ import annotations

import ssl

import trio
from prometheus_client import CollectorRegistry

from .feed import unauthorized
from .feed_client import RouteFeedClient
from .http import Handler, HTTPLimits, Request, Response, serve_http
from .metrics import FeedCollector, render_metrics
from .routes import KINDS, RouteTable
from .tokens import check_token_header

__all__ = ["ADMIN_LIMITS", "make_admin_handler", "serve_admin"]

_NO_STORE = [("Cache-Control", "no-store")]
#: Admin requests carry no body worth having; keep the limits tight.
ADMIN_LIMITS = HTTPLimits(max_body_bytes=64 * 1024)


def make_admin_handler(
    *, table: RouteTable, feed: RouteFeedClient, token: str, registry: CollectorRegistry
) -> Handler:
    """The admin request handler (``serve_admin`` serves it)."""

    async def handler(request: Request) -> Response:
        if request.path not in ("/healthz", "/readyz", "/metrics", "/routes"):
            return Response.error(404, "Not Found")
        if request.method not in ("GET", "HEAD"):
            return Response.error(405, "Method not allowed", headers=[("Allow", "GET")])
        if request.path == "/healthz":
            return Response.json({"status": "ok"}, headers=_NO_STORE)
        if request.path == "/readyz":
            if feed.synced.is_set():
                return Response.json({"status": "ok", "routes": len(table)}, headers=_NO_STORE)
            body: dict[str, object] = {
                "status": "not ready",
                "reason": "route table not synced from the API yet",
                "feed_state": feed.state,
            }
            if feed.last_error:
                body["last_error"] = feed.last_error
            return Response.json(body, status=503, headers=_NO_STORE)
        if request.path == "/metrics":
            data, content_type = render_metrics(registry)
            return Response(200, [("Content-Type", content_type), *_NO_STORE], data)
        # /routes
        if not check_token_header(request.headers.get("Authorization"), token):
            return unauthorized()
        kind = request.query_params.get("kind")
        if kind is not None and kind not in KINDS:
            return Response.error(422, "invalid `kind`: expected SNI or PATH")
        routes = [r.to_json() for r in table.routes(kind)]
        return Response.json({"routes": routes}, headers=_NO_STORE)

    return handler


async def serve_admin(
    host: str,
    port: int,
    *,
    table: RouteTable,
    feed: RouteFeedClient,
    token: str,
    registry: CollectorRegistry,
    ssl_context: ssl.SSLContext | None = None,
    limits: HTTPLimits = ADMIN_LIMITS,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint on ``host:port``; reports the bound ``(host, port)``.

    Registers a :class:`FeedCollector` for ``table``/``feed`` in ``registry`` for as long
    as it serves.
    """
    collector = FeedCollector(table, feed)
    registry.register(collector)
    try:
        handler = make_admin_handler(table=table, feed=feed, token=token, registry=registry)
        await serve_http(
            handler, host, port, limits=limits, ssl_context=ssl_context, task_status=task_status
        )
    finally:
        registry.unregister(collector)
