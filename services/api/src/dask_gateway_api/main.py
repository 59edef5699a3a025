"""``dask-gateway-api``: CLI, wiring and signals.

One root nursery runs the cluster manager (recovery, timers, process watchers) and the
HTTP server. :func:`serve_api` is the whole service and reports the bound address, so
tests and the end-to-end suite run the API in-process. SIGINT/SIGTERM cancel it: the
listener closes, and clusters keep running unless ``stop_clusters_on_shutdown`` is set.
Configuration problems are all listed on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import trio

from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.http import HTTPClient, HTTPLimits, serve_http
from dask_gateway_common.logs import setup_logging
from dask_gateway_common.settings import SettingsError
from dask_gateway_common.tls import client_ssl_context

from .app import ApiApp, server_version
from .auth import Authenticator, CookieCache, SimpleAuthenticator, UserAuth
from .auth_jupyterhub import HubAuthConfig, JupyterHubAuthenticator
from .auth_kerberos import KerberosAuthenticator, KerberosUnavailable
from .backends.base import Backend
from .backends.local import open_local_backend
from .config import AuthSettings, Settings, load_settings
from .dashboard_auth import DashboardAuth, oauth_from_settings
from .manager import ClusterManager, ManagerConfig
from .store import StoreError, open_store

__all__ = [
    "MAX_BODY_BYTES",
    "PROG",
    "main",
    "make_authenticator",
    "make_dashboard_auth",
    "manager_config",
    "open_backend",
    "serve_api",
]

PROG = "dask-gateway-api"
MAX_BODY_BYTES = 1024 * 1024

log = logging.getLogger("dask_gateway.api")


def make_authenticator(settings: AuthSettings) -> Authenticator:
    """The configured authenticator.

    Raises SettingsError when it cannot be built: unreadable keytab or TLS files, a missing
    ``gssapi`` package, or an unknown type.
    """
    if settings.type == "simple":
        return SimpleAuthenticator(password=settings.password)
    if settings.type == "jupyterhub":
        ssl_context = None
        if settings.jupyterhub_tls_ca or settings.jupyterhub_tls_cert:
            try:
                ssl_context = client_ssl_context(
                    ca_file=settings.jupyterhub_tls_ca,
                    cert_file=settings.jupyterhub_tls_cert,
                    key_file=settings.jupyterhub_tls_key,
                )
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise SettingsError([f"auth.jupyterhub_tls_*: cannot load: {exc}"]) from None
        try:
            return JupyterHubAuthenticator(
                HubAuthConfig(
                    api_url=settings.jupyterhub_api_url or "",
                    service_name=settings.jupyterhub_service_name,
                    use_service_access_scopes=settings.jupyterhub_use_service_access_scopes,
                    legacy_api=settings.jupyterhub_legacy_api,
                    api_token=settings.jupyterhub_api_token,
                    cache_ttl=settings.jupyterhub_cache_ttl,
                    cache_size=settings.jupyterhub_cache_size,
                    timeout=settings.jupyterhub_timeout,
                ),
                ssl_context=ssl_context,
            )
        except ValueError as exc:
            raise SettingsError([str(exc)]) from None
    if settings.type == "kerberos":
        try:
            return KerberosAuthenticator(
                settings.kerberos_keytab, service_name=settings.kerberos_service_name
            )
        except KerberosUnavailable as exc:
            raise SettingsError([str(exc)]) from None
        except OSError as exc:
            raise SettingsError(
                [
                    f"auth.kerberos_keytab: cannot read {settings.kerberos_keytab!r}: "
                    f"{exc.strerror or exc}"
                ]
            ) from None
        except ValueError as exc:
            raise SettingsError([f"auth.kerberos_service_name: {exc}"]) from None
    raise SettingsError([f"auth.type {settings.type!r} is not supported by this build"])


def make_dashboard_auth(
    settings: Settings, manager: ClusterManager, auth: UserAuth
) -> DashboardAuth:
    """The dashboard access check and hub OAuth client (``dashboards`` settings).

    Raises SettingsError when the hub TLS files cannot be loaded.
    """
    oauth = oauth_from_settings(settings)
    if settings.auth.type == "jupyterhub" and settings.dashboards.auth == "owner" and not oauth:
        log.warning(
            "Dashboards: no JupyterHub OAuth client (set auth.jupyterhub_api_token and "
            "auth.jupyterhub_service_name), so browsers cannot log in to dashboards; only "
            "requests carrying 'Authorization: jupyterhub <token>' can open them"
        )
    ssl_context = None
    if oauth is not None and (settings.auth.jupyterhub_tls_ca or settings.auth.jupyterhub_tls_cert):
        try:
            ssl_context = client_ssl_context(
                ca_file=settings.auth.jupyterhub_tls_ca,
                cert_file=settings.auth.jupyterhub_tls_cert,
                key_file=settings.auth.jupyterhub_tls_key,
            )
        except (OSError, ValueError) as exc:
            raise SettingsError([f"auth.jupyterhub_tls_*: cannot load: {exc}"]) from None
    return DashboardAuth(
        manager=manager,
        auth=auth,
        proxy_token=settings.proxy_token,
        prefix=settings.prefix,
        mode=settings.dashboards.auth,
        oauth=oauth,
        ssl_context=ssl_context,
    )


def manager_config(settings: Settings) -> ManagerConfig:
    """The manager's knobs, taken from the validated settings."""
    cluster = settings.cluster
    return ManagerConfig(
        cluster_defaults=cluster.config,
        options=settings.options,
        user_limits=settings.user_limits,
        timeouts=cluster.timeouts,
        heartbeat_period=cluster.heartbeat_period,
        prefix=settings.prefix,
        check_period=cluster.check_period,
        record_max_age=settings.stopped_record_max_age,
        stop_clusters_on_shutdown=settings.stop_clusters_on_shutdown,
        scheduler_api_retries=cluster.scheduler_api_retries,
    )


@contextlib.asynccontextmanager
async def open_backend(settings: Settings) -> AsyncIterator[tuple[Any, Backend]]:
    """The configured backend and the store of its records: SQLite and local processes,
    or Kubernetes objects and pods (the API then keeps no state of its own).

    Raises ``StoreError`` when the store cannot be opened (for Kubernetes: no usable
    configuration, or the API server refuses the first list).
    """
    if settings.backend.type == "kubernetes":
        from .backends.kubernetes import open_kubernetes_backend

        async with open_kubernetes_backend(
            settings.backend.kubernetes,
            stop_grace=settings.backend.stop_grace,
            reconcile_period=settings.backend.status_period,
        ) as (kube_store, kube_backend):
            yield kube_store, kube_backend
        return
    store = open_store(settings.db_path, [k.encode() for k in settings.encrypt_keys])
    try:
        async with open_local_backend(
            settings.backend.workdir,
            stop_grace=settings.backend.stop_grace,
            fork_server=settings.backend.fork_server,
        ) as backend:
            yield store, backend
    finally:
        store.close()


def _reachable_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return socket.gethostname()
    return f"[{host}]" if ":" in host else host


async def serve_api(
    settings: Settings,
    *,
    direct_api: bool = False,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the whole API service until cancelled; reports the bound ``(host, port)``.

    Schedulers are given ``settings.api_url`` (by default the public URL, through the web
    proxy); with ``direct_api=True`` they reach this process at its bound address instead
    (for tests and single-host setups where the public URL is not known in advance).
    Raises ``StoreError`` if the database cannot be used, ``SettingsError`` for an
    unsupported authenticator.
    """
    authenticator = make_authenticator(settings.auth)
    try:
        async with (
            open_backend(settings) as (store, backend),
            HTTPClient() as http,
            contextlib.AsyncExitStack() as stack,
        ):
            feed = RouteFeed()
            manager = ClusterManager(manager_config(settings), store, backend, feed, http)
            auth = UserAuth(authenticator, CookieCache(settings.auth.cookie_max_age))
            dashboards = make_dashboard_auth(settings, manager, auth)
            stack.push_async_callback(dashboards.aclose)
            app = ApiApp(
                manager,
                auth,
                prefix=settings.prefix,
                routes_handler=make_feed_handler(feed, settings.proxy_token),
                version=server_version(),
                dashboards=dashboards,
            )
            host, port = settings.bind
            async with trio.open_nursery() as nursery:
                await nursery.start(manager.run)
                bound = await nursery.start(
                    partial(
                        serve_http,
                        app,
                        host,
                        port,
                        limits=HTTPLimits(max_body_bytes=MAX_BODY_BYTES),
                    )
                )
                own_origin = (
                    settings.internal_url or f"http://{_reachable_host(bound[0])}:{bound[1]}"
                )
                own = f"{own_origin}{settings.prefix}"
                api_url = f"{own}/api" if direct_api else settings.api_url
                manager.set_api_address(api_url, route_target=own)
                log.info("API listening on http://%s:%d%s", bound[0], bound[1], settings.prefix)
                log.info("Schedulers reach the API at %s", api_url)
                task_status.started(bound)
    finally:
        await authenticator.aclose()


async def _run_until_signal(settings: Settings) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_api, settings)
            async for signum in signals:
                log.info("Received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The control plane of the trio Dask Gateway (API, auth, clusters).",
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML configuration file (environment variables DASK_GATEWAY_* override it)",
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        type=str.upper,
        help="log level (overrides log_level from the configuration)",
    )
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    try:
        settings = load_settings(args.config, env)
        make_authenticator(settings.auth)
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    if args.log_level:
        settings = replace(settings, log_level=args.log_level)
    setup_logging(settings.log_level)
    status = 0
    try:
        trio.run(_run_until_signal, settings)
    except* StoreError as group:
        for exc in group.exceptions:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
        status = 2
    except* OSError as group:  # e.g. the address is already in use
        for exc in group.exceptions:
            log.error("Cannot serve: %s", exc)
        status = 1
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
