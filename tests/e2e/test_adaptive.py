"""Spec §11.19: adaptive scaling, with a fast adaptive period."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import (
    GatewayUnderTest,
    assert_stays,
    base_config,
    running_gateway,
    wait_workers,
    worker_count,
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    config = base_config(cluster={"adaptive_period": 0.25})
    with running_gateway(tmp_path_factory, "adaptive", config) as gateway:
        yield gateway


def test_s19_adaptive(gw: GatewayUnderTest) -> None:
    with gw.client("alice") as gateway:
        cluster = gateway.new_cluster()
        client = None
        try:
            assert worker_count(cluster) == 0
            cluster.adapt()
            client = cluster.get_client(set_as_default=False)
            # No worker yet: the task is unrunnable until adaptive scaling adds one.
            assert client.submit(lambda x: x * 2, 21).result(timeout=60) == 42

            wait_workers(cluster, 0, timeout=60)  # idle -> scaled down to zero

            cluster.scale(1)  # an explicit scale turns adaptive off
            wait_workers(cluster, 1)
            # With adaptive still on, an idle worker would be retired within ~1 s.
            assert_stays(lambda: worker_count(cluster) == 1, 3.0, "exactly one worker")
            assert client.submit(lambda: 7).result(timeout=30) == 7

            cluster.adapt(active=False)
        finally:
            if client is not None:
                client.close()
            cluster.shutdown()
