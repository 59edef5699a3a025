"""Spec §11.20: a scheduler that exits at once makes the cluster FAILED."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dask_gateway import GatewayClusterError
from dask_gateway.client import ClusterStatus

from tests.e2e.harness import GatewayUnderTest, base_config, names, running_gateway, wait_status


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    # `false` ignores the scheduler flags and exits 1 straight away.
    config = base_config(cluster={"scheduler_cmd": "false", "start_timeout": 20})
    with running_gateway(tmp_path_factory, "bad-scheduler", config) as gateway:
        yield gateway


def test_s20_start_failure(gw: GatewayUnderTest) -> None:
    with gw.client("alice") as gateway:
        started = time.monotonic()
        with pytest.raises(GatewayClusterError, match="failed to start"):
            gateway.new_cluster()
        print(f"start failure reported after {time.monotonic() - started:.1f} s")
        failed = gateway.list_clusters(status="failed")
        assert len(failed) == 1
        [report] = failed
        assert report.status is ClusterStatus.FAILED
        assert report.stop_time is not None
        assert report.dashboard_link is None and report.tls_key is None
        assert gateway.list_clusters() == []


def test_s20_start_failure_after_submit(gw: GatewayUnderTest) -> None:
    with gw.client("bob") as gateway:
        name = gateway.submit()
        assert wait_status(gateway, name, "FAILED", timeout=40) == "FAILED"
        assert names(gateway.list_clusters(status="failed")) == {name}
        with pytest.raises(GatewayClusterError, match="failed to start"):
            gateway.connect(name)
        # Stopping a failed cluster is a no-op and keeps it FAILED.
        gateway.stop_cluster(name)
        assert gateway.get_cluster(name).status is ClusterStatus.FAILED
