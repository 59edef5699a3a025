"""Spec §11.16 (explicit per-cluster worker limit) and §11.17 (resource-derived limits)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
from dask_gateway import GatewayWarning

from tests.e2e.harness import (
    GatewayUnderTest,
    assert_stays,
    base_config,
    names,
    running_gateway,
    wait_workers,
    worker_count,
)


@pytest.fixture(scope="module")
def gw_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    config = base_config(cluster={"cluster_max_workers": 2})
    with running_gateway(tmp_path_factory, "max-workers", config) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def gw_resources(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    config = base_config(
        cluster={
            "cluster_max_cores": 6,
            "worker_cores": 2,
            "scheduler_cores": 1,
            "worker_memory": "1 G",
            "scheduler_memory": "1 G",
            # (4 G - 1 G) // 1 G = 3 workers by memory; (6 - 1) // 2 = 2 by cores.
            "cluster_max_memory": "4 G",
        },
        # Lets a request raise the scheduler's memory above the cluster limit (§11.17).
        options={"fields": [{"field": "scheduler_memory", "type": "string", "default": "1 G"}]},
    )
    with running_gateway(tmp_path_factory, "max-resources", config) as gateway:
        yield gateway


def single_warning(record: list[warnings.WarningMessage]) -> str:
    gateway_warnings = [w for w in record if issubclass(w.category, GatewayWarning)]
    assert len(gateway_warnings) == 1, [str(w.message) for w in record]
    return str(gateway_warnings[0].message)


def test_s16_per_cluster_worker_limit(gw_workers: GatewayUnderTest) -> None:
    with gw_workers.client("alice") as gateway:
        cluster = gateway.new_cluster()
        try:
            with pytest.warns(GatewayWarning, match="Scaling to 2 instead") as record:
                cluster.scale(3)
            assert single_warning(record) == (
                "Scale request of 3 workers would exceed resource limit of 2 workers. "
                "Scaling to 2 instead."
            )
            wait_workers(cluster, 2)
            assert_stays(lambda: worker_count(cluster) == 2, 1.0, "two workers, never three")

            with warnings.catch_warnings(record=True) as quiet:
                warnings.simplefilter("always")
                cluster.scale(2)
            assert not [w for w in quiet if issubclass(w.category, GatewayWarning)]

            with pytest.warns(GatewayWarning, match="maximum=2, minimum=0") as record:
                cluster.adapt(maximum=3)
            assert single_warning(record) == (
                "Adapt with `maximum=3, minimum=0` workers would exceed resource limit of "
                "2 workers. Using `maximum=2, minimum=0` instead."
            )
            with pytest.warns(GatewayWarning, match="maximum=2, minimum=2") as record:
                cluster.adapt(minimum=3, maximum=4)
            assert single_warning(record) == (
                "Adapt with `maximum=4, minimum=3` workers would exceed resource limit of "
                "2 workers. Using `maximum=2, minimum=2` instead."
            )
            wait_workers(cluster, 2)

            resp = gw_workers.raw(
                "POST",
                f"/api/v1/clusters/{cluster.name}/scale",
                user="alice",
                json_body={"count": 1},
            )
            assert resp.status == 200 and resp.is_json, resp
            assert resp.json() == {"ok": True, "msg": None}
            wait_workers(cluster, 1)
        finally:
            cluster.shutdown()


def test_s17_resource_derived_limits(gw_resources: GatewayUnderTest) -> None:
    with gw_resources.client("alice") as gateway:
        cluster = gateway.new_cluster()
        try:
            with pytest.warns(GatewayWarning, match="Scaling to 2 instead") as record:
                cluster.scale(5)
            assert "resource limit of 2 workers" in single_warning(record)
            wait_workers(cluster, 2)
            assert_stays(lambda: worker_count(cluster) == 2, 1.0, "two workers, never more")
            workers = cluster.scheduler_info["workers"].values()
            # §5.1: threads = worker_cores, memory limit = worker_memory.
            assert {w["nthreads"] for w in workers} == {2}
            assert {w["memory_limit"] for w in workers} == {2**30}

            with pytest.raises(ValueError, match="Scheduler memory request"):
                gateway.new_cluster(scheduler_memory="8 G")
            assert names(gateway.list_clusters()) == {cluster.name}
        finally:
            cluster.shutdown()
