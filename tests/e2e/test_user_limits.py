"""Per-user limits (issue 3, spec §6.5 mapping): creation over a budget is 422, scaling over
it is reduced with a GatewayWarning; budgets are per user."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dask_gateway import GatewayWarning

from tests.e2e.harness import (
    START_TIMEOUT,
    GatewayUnderTest,
    assert_stays,
    base_config,
    names,
    running_gateway,
    wait_status,
    wait_workers,
    worker_count,
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    # Schedulers and workers take 1 core each (the defaults).
    config = base_config(user_limits={"max_clusters": 2, "max_cores": 4})
    with running_gateway(tmp_path_factory, "user-limits", config) as gateway:
        yield gateway


def test_user_limits(gw: GatewayUnderTest) -> None:
    with gw.client("alice") as alice, gw.client("bob") as bob:
        cluster = alice.new_cluster()
        second = alice.submit()
        bob_cluster = None
        try:
            with pytest.raises(ValueError) as info:
                alice.submit()
            assert str(info.value) == (
                "Cannot start new cluster, would exceed user limit of 2 active clusters."
            )
            assert names(alice.list_clusters()) == {cluster.name, second}

            # Cores: 4 - 1 (the other cluster's scheduler) - 1 (this scheduler) = 2 workers.
            with pytest.warns(GatewayWarning, match="user cores limit") as record:
                cluster.scale(5)
            [warning] = [w for w in record if issubclass(w.category, GatewayWarning)]
            assert str(warning.message).endswith("Scaling to 2 instead."), warning.message
            wait_workers(cluster, 2)
            assert_stays(lambda: worker_count(cluster) == 2, 1.0, "two workers, never more")

            # Budgets are per user.
            bob_cluster = bob.submit()
            wait_status(bob, bob_cluster, "RUNNING", timeout=START_TIMEOUT)

            # Freeing a slot lets alice create again.
            alice.stop_cluster(second)
            third = alice.submit()
            alice.stop_cluster(third)
        finally:
            cluster.shutdown()
            alice.stop_cluster(second)
            if bob_cluster is not None:
                bob.stop_cluster(bob_cluster)
