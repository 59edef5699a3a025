"""A real dask cluster behind the proxy, reached by a real Client through ``gateway://``."""

from __future__ import annotations

import functools
import operator
from pathlib import Path

import pytest
import trio

from dask_gateway_common.feed import RouteFeed, make_feed_handler

from .conftest import TOKEN, WAIT, sni_route, start_feed_server, start_proxy
from .dask_cluster import ClusterCredentials, ThreadedCluster

pytestmark = pytest.mark.slow


def compute_through_gateway(address: str, creds: ClusterCredentials) -> tuple[int, int]:
    """Blocking: what a user does with the official client's security and comm."""
    import dask_gateway  # noqa: F401  (registers the gateway:// comm)
    from dask_gateway.client import GatewaySecurity
    from distributed import Client

    security = GatewaySecurity(tls_key=creds.key_pem, tls_cert=creds.cert_pem)
    with Client(address, security=security, timeout=WAIT) as client:
        total = client.submit(sum, range(101)).result(timeout=WAIT)
        product = client.submit(functools.reduce, operator.mul, range(1, 6)).result(timeout=WAIT)
        workers = len(client.scheduler_info()["workers"])
    assert workers == 1
    return total, product


async def test_dask_client_computes_through_the_proxy(tmp_path: Path) -> None:
    name = "0123456789abcdef0123456789abcdef"  # like upstream: uuid4 hex
    creds = ClusterCredentials.create(name, tmp_path)
    cluster = ThreadedCluster(creds)
    with trio.fail_after(WAIT * 3):
        scheduler = await trio.to_thread.run_sync(cluster.start, WAIT * 2)
        try:
            assert scheduler.startswith("tls://127.0.0.1:")
            async with trio.open_nursery() as nursery:
                feed = RouteFeed()
                feed.put(sni_route(name, scheduler))
                feed_port, _ = await start_feed_server(nursery, make_feed_handler(feed, TOKEN))
                proxy = await start_proxy(nursery, feed_port)

                address = f"gateway://127.0.0.1:{proxy.port}/{name}"
                result = await trio.to_thread.run_sync(compute_through_gateway, address, creds)
                assert result == (5050, 120)
                assert proxy.sample("connections_total") >= 1
                assert proxy.sample("bytes_total", direction="up") > 0
                assert proxy.hello_errors("unknown_cluster") == 0
                nursery.cancel_scope.cancel()
        finally:
            await trio.to_thread.run_sync(cluster.stop, WAIT)
