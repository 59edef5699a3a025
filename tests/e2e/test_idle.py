"""Spec §11.22: a cluster with an idle timeout stops itself (via the preload's DELETE)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dask_gateway.client import ClusterStatus

from tests.e2e.harness import (
    GatewayUnderTest,
    base_config,
    names,
    running_gateway,
    wait_until,
    wait_workers,
)

#: The spec's scenario says 2 s, but the preload measures idleness from the scheduler's
#: construction, before its ~2 s dashboard start-up on a busy 2-core machine: with 2 s the
#: cluster is shut down before the client can submit anything. 5 s keeps the scenario
#: deterministic; the check is the same.
IDLE_TIMEOUT = 5


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
            # The preload counts a cluster as busy only while a worker is processing or a
            # task is unrunnable; starting two workers takes longer than 2 s on a busy
            # machine. A task no worker can ever run (it asks for a resource nobody has)
            # keeps the cluster alive while they start; it is cancelled right after.
            keeper = client.submit(time.sleep, 0, resources={"nobody-has-this": 1}, pure=False)
            cluster.scale(2)
            wait_workers(cluster, 2)
            future = client.submit(time.sleep, 1, pure=False)
            keeper.cancel()
            future.result(timeout=60)
            del future, keeper
            finished = time.monotonic()
            wait_until(
                lambda: cluster.name not in names(gateway.list_clusters()),
                IDLE_TIMEOUT + 10,
                "the idle cluster to leave list_clusters()",
                interval=0.2,
            )
            elapsed = time.monotonic() - finished
            print(f"idle cluster left the active list {elapsed:.1f} s after its last task")
            assert elapsed < IDLE_TIMEOUT + 3, f"idle shutdown took {elapsed:.1f} s"
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
