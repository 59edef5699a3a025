"""Spec §11.22: a cluster with an idle timeout stops itself (via the preload's DELETE)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dask_gateway.client import ClusterStatus

from tests.e2e.harness import GatewayUnderTest, base_config, names, running_gateway, wait_until

IDLE_TIMEOUT = 2


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    config = base_config(cluster={"idle_timeout": IDLE_TIMEOUT})
    with running_gateway(tmp_path_factory, "idle", config) as gateway:
        yield gateway


def test_s22_idle_timeout(gw: GatewayUnderTest) -> None:
    with gw.client("alice") as gateway:
        cluster = gateway.new_cluster()
        client = None
        try:
            client = cluster.get_client(set_as_default=False)
            # Submit first: a waiting (unrunnable) task keeps the cluster from idling out
            # while its workers start.
            future = client.submit(time.sleep, 1, pure=False)
            cluster.scale(2)
            future.result(timeout=60)
            del future
            finished = time.monotonic()
            wait_until(
                lambda: cluster.name not in names(gateway.list_clusters()),
                15,
                "the idle cluster to leave list_clusters()",
                interval=0.2,
            )
            elapsed = time.monotonic() - finished
            print(f"idle cluster left the active list {elapsed:.1f} s after its last task")
            assert elapsed < 10, f"idle shutdown took {elapsed:.1f} s (timeout {IDLE_TIMEOUT} s)"
            report = gateway.get_cluster(cluster.name)
            assert report.status in (ClusterStatus.STOPPING, ClusterStatus.STOPPED)
        finally:
            if client is not None:
                client.close()
            cluster.shutdown()  # harmless on a stopped cluster
        assert gateway.get_cluster(cluster.name).status in (
            ClusterStatus.STOPPING,
            ClusterStatus.STOPPED,
        )
