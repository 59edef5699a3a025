"""``dask-gateway-web-proxy``: CLI, wiring and signals.

One root nursery runs the route feed client (PATH routes only), the admin endpoint and
the public proxy listener. SIGINT/SIGTERM cancel it, which closes the listeners and every
open connection. Bad settings are all reported at once with exit status 2.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
from collections.abc import Mapping, Sequence
from functools import partial

import trio

from dask_gateway_common.admin import serve_admin
from dask_gateway_common.feed_client import RouteFeedClient
from dask_gateway_common.logs import setup_logging
from dask_gateway_common.metrics import ProxyMetrics, new_registry
from dask_gateway_common.routes import RouteTable
from dask_gateway_common.tls import server_ssl_context

from .access import DashboardAccess
from .config import PROG, SettingsError, WebProxySettings, load_settings
from .pool import UpstreamPool
from .proxy import ProxyTimeouts, serve_web_proxy

__all__ = ["main", "run"]

log = logging.getLogger("dask_gateway.web_proxy")


def _url(scheme: str, address: tuple[str, int]) -> str:
    host, port = address
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"


async def run(
    settings: WebProxySettings,
    ssl_context: ssl.SSLContext | None,
    *,
    task_status: trio.TaskStatus[tuple[tuple[str, int], tuple[str, int]]] = (
        trio.TASK_STATUS_IGNORED
    ),
) -> None:
    """Run the web proxy until cancelled; reports ``(proxy address, admin address)``."""
    table = RouteTable()
    feed = RouteFeedClient(settings.api_url, settings.token, table, kinds={"PATH"})
    registry = new_registry()
    metrics = ProxyMetrics(registry)
    pool = UpstreamPool(connect_timeout=settings.connect_timeout)
    timeouts = ProxyTimeouts(connect=settings.connect_timeout, response=settings.response_timeout)
    access = None
    if settings.dashboard_access == "check":
        access = DashboardAccess.from_routes_url(
            settings.api_url,
            settings.token,
            ttl=settings.dashboard_access_ttl,
            max_entries=settings.dashboard_access_cache_size,
        )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(feed.run)
            admin = await nursery.start(
                partial(
                    serve_admin,
                    *settings.admin_address,
                    table=table,
                    feed=feed,
                    token=settings.token,
                    registry=registry,
                )
            )
            bound = await nursery.start(
                partial(
                    serve_web_proxy,
                    table,
                    *settings.address,
                    ssl_context=ssl_context,
                    timeouts=timeouts,
                    pool=pool,
                    metrics=metrics,
                    access=access,
                )
            )
            scheme = "https" if ssl_context is not None else "http"
            log.info("Web proxy listening on %s", _url(scheme, bound))
            log.info("Admin endpoint on %s", _url("http", admin))
            log.info("Route feed: %s", settings.api_url)
            if access is None:
                log.warning("Dashboards are open to anyone (--dashboard-access open)")
            else:
                log.info("Dashboard access checked at %s<name>/access", access.access_base)
            task_status.started((bound, admin))
    finally:
        await pool.aclose()
        if access is not None:
            await access.aclose()


async def _run_until_signal(settings: WebProxySettings, ssl_context: ssl.SSLContext | None) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run, settings, ssl_context)
            async for signum in signals:
                log.info("Received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env
    try:
        settings = load_settings(argv, env)
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    ssl_context = None
    if settings.tls_cert and settings.tls_key:
        try:
            ssl_context = server_ssl_context(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError, ValueError) as exc:
            print(f"{PROG}: error: cannot load --tls-cert/--tls-key: {exc}", file=sys.stderr)
            return 2
    setup_logging(settings.log_level)
    status = 0
    try:
        trio.run(_run_until_signal, settings, ssl_context)
    except* OSError as group:  # e.g. the address is already in use
        for exc in group.exceptions:
            log.error("Cannot serve: %s", exc)
        status = 1
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
