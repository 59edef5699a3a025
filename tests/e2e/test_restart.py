"""Restart: SIGKILL the API with two running clusters, start it again, carry on.

The clusters' processes live in their own sessions, so they survive the API; the new API
reloads its state from SQLite, re-adopts the processes, re-publishes the routes, and keeps
taking the schedulers' heartbeats (period 1 s, timeout 5 s here, so a restarted API that
ignored them would fail the clusters within the test).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from dask_gateway.client import ClusterStatus

from tests.e2e.harness import (
    GatewayUnderTest,
    assert_stays,
    default_config,
    names,
    pid_alive,
    running_gateway,
    time_limit,
    wait_status,
    wait_until,
    wait_workers,
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    config = default_config(cluster={"heartbeat_period": 1, "heartbeat_timeout": 5})
    with running_gateway(tmp_path_factory, "restart", config) as gateway:
        yield gateway


def test_restart_api_keeps_running_clusters(gw: GatewayUnderTest) -> None:
    with gw.client("alice") as gateway:
        first = gateway.new_cluster()
        second = gateway.new_cluster()
        clients = []
        try:
            first.scale(1)
            wait_workers(first, 1)
            first_client = first.get_client(set_as_default=False)
            clients.append(first_client)
            assert first_client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
            workers_before = set(first.scheduler_info["workers"])
            scheduler_pids = {
                first.name: first_client.run_on_scheduler(os.getpid),
            }
            [worker_pid] = first_client.run(os.getpid, nanny=True).values()

            old_pid = gw.local.processes["api"].pid
            with time_limit(70, "API restart"):
                gw.local.restart_api(kill=True)
            assert gw.local.processes["api"].pid != old_pid

            # Both still RUNNING (the client re-authenticates: the cookie name changed).
            listed = {r.name: r.status for r in gateway.list_clusters()}
            assert listed == {
                first.name: ClusterStatus.RUNNING,
                second.name: ClusterStatus.RUNNING,
            }
            # ... and they stay so: the new API accepts their heartbeats.
            assert_stays(
                lambda: names(gateway.list_clusters(status="running")) == {first.name, second.name},
                6.0,
                "both clusters RUNNING after the restart",
            )
            # The same processes were re-adopted, not replaced.
            assert set(first.scheduler_info["workers"]) == workers_before

            # Reachable through the proxy: the existing client, and a fresh connection.
            assert first_client.submit(lambda x: x * 3, 3).result(timeout=30) == 9
            reconnected = gateway.connect(second.name)
            second_client = reconnected.get_client(set_as_default=False)
            clients.append(second_client)
            scheduler_pids[second.name] = second_client.run_on_scheduler(os.getpid)

            # Scalable (the API still knows how to reach each scheduler's preload).
            first.scale(2)
            wait_workers(first, 2)
            second.scale(1)
            second_client.wait_for_workers(1, timeout=60)
            assert second_client.submit(lambda: "ok").result(timeout=30) == "ok"
            reconnected.close()

            # Stoppable: the re-adopted processes really go away.
            for cluster in (first, second):
                cluster.shutdown()
                assert wait_status(gateway, cluster.name, "STOPPED", timeout=30) == "STOPPED"
            for name, pid in [*scheduler_pids.items(), ("worker", worker_pid)]:
                wait_until(lambda pid=pid: not pid_alive(pid), 30, f"{name} process to exit")
            assert gateway.list_clusters() == []
        finally:
            for client in clients:
                client.close()
            first.shutdown()
            second.shutdown()


def test_restart_then_adopted_scheduler_loss(gw: GatewayUnderTest) -> None:
    """After a restart the schedulers are no longer the API's children; losing one must
    still fail its cluster (liveness check or heartbeat timeout of 5 s)."""
    with gw.client("bob") as gateway:
        cluster = gateway.new_cluster()
        try:
            client = cluster.get_client(set_as_default=False)
            try:
                scheduler_pid = client.run_on_scheduler(os.getpid)
            finally:
                client.close()
            with time_limit(70, "API restart"):
                gw.local.restart_api(kill=True)
            assert gateway.get_cluster(cluster.name).status is ClusterStatus.RUNNING
            os.kill(scheduler_pid, signal.SIGKILL)
            killed = time.monotonic()
            wait_until(
                lambda: cluster.name in names(gateway.list_clusters(status="failed")),
                40,
                "the adopted cluster to be FAILED after its scheduler died",
                interval=0.2,
            )
            print(f"adopted scheduler loss detected after {time.monotonic() - killed:.1f} s")
        finally:
            cluster.shutdown()
