"""Spec §11.23 (a lost worker is replaced) and §11.24 (a lost scheduler fails the cluster).

Processes are killed the way a machine loses them: SIGKILL to the worker's whole process
group (nanny and worker), SIGKILL to the scheduler.
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
    base_config,
    kill_process_group,
    names,
    pid_alive,
    running_gateway,
    wait_until,
    wait_workers,
)

HEARTBEAT_PERIOD = 2
HEARTBEAT_TIMEOUT = 6


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    config = base_config(
        cluster={"heartbeat_period": HEARTBEAT_PERIOD, "heartbeat_timeout": HEARTBEAT_TIMEOUT}
    )
    with running_gateway(tmp_path_factory, "loss", config) as gateway:
        yield gateway


def test_s23_worker_loss_is_replaced(gw: GatewayUnderTest) -> None:
    with gw.client("alice") as gateway:
        cluster = gateway.new_cluster()
        client = None
        try:
            cluster.scale(2)
            wait_workers(cluster, 2)
            client = cluster.get_client(set_as_default=False)
            nannies = client.run(os.getpid, nanny=True)
            victim_address, victim_pid = sorted(nannies.items())[0]
            victim_name = cluster.scheduler_info["workers"][victim_address]["name"]
            kill_process_group(victim_pid)
            killed = time.monotonic()

            def replaced() -> bool:
                workers = cluster.scheduler_info["workers"]
                worker_names = {w["name"] for w in workers.values()}
                return len(workers) == 2 and victim_name not in worker_names

            wait_until(replaced, 60, "a replacement worker to join", interval=0.2)
            print(f"lost worker replaced after {time.monotonic() - killed:.1f} s")
            assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
            assert gateway.get_cluster(cluster.name).status is ClusterStatus.RUNNING
        finally:
            if client is not None:
                client.close()
            cluster.shutdown()


def test_s24_scheduler_loss_fails_cluster(gw: GatewayUnderTest) -> None:
    with gw.client("bob") as gateway:
        cluster = gateway.new_cluster()
        client = cluster.get_client(set_as_default=False)
        try:
            cluster.scale(1)
            wait_workers(cluster, 1)
            [worker_pid] = client.run(os.getpid, nanny=True).values()
            scheduler_pid = client.run_on_scheduler(os.getpid)
        finally:
            client.close()
        try:
            os.kill(scheduler_pid, signal.SIGKILL)
            killed = time.monotonic()
            wait_until(
                lambda: cluster.name in names(gateway.list_clusters(status="failed")),
                HEARTBEAT_TIMEOUT + 20,
                "the cluster to be FAILED after its scheduler died",
                interval=0.2,
            )
            print(f"scheduler loss detected after {time.monotonic() - killed:.1f} s")
            report = gateway.get_cluster(cluster.name)
            assert report.status is ClusterStatus.FAILED
            assert report.stop_time is not None
            assert cluster.name not in names(gateway.list_clusters())
            # The API tears down what is left of the cluster: its worker.
            wait_until(lambda: not pid_alive(worker_pid), 30, "the orphaned worker to be stopped")
        finally:
            cluster.shutdown()
