"""The Kubernetes backend in-process, on the emulated API server and kubelet.

Pods run a tiny Python sleeper instead of dask (the §5.1 flags are appended and ignored),
so these tests take seconds; the full dask path is covered by ``test_kube_e2e.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from dask_gateway_api.backends.base import BackendError, ClusterLaunch
from dask_gateway_api.backends.kubernetes import KubeBackend, open_kubernetes_backend
from dask_gateway_api.config import KubernetesSettings
from dask_gateway_api.kube_store import KubeStore, KubeStoreUnavailable
from dask_gateway_api.models import Cluster, ClusterStatus, Worker
from dask_gateway_api.resources import ClusterConfig
from dask_gateway_api.store import StoreError, cluster_to_row, worker_to_row
from tests.k8s_emulator import KubeEmulator

NS = "default"
INSTANCE = "backend-test"
DEADLINE = 30
SLEEPER = (sys.executable, "-c", "import time; time.sleep(120)")


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(kubelet=True, bookmark_interval=0.2) as emulator:
        yield emulator


def settings(kube: KubeEmulator) -> KubernetesSettings:
    return KubernetesSettings(kubeconfig=str(kube.kubeconfig_path), namespace=NS, instance=INSTANCE)


@asynccontextmanager
async def open_backend(kube: KubeEmulator) -> AsyncIterator[tuple[KubeStore, KubeBackend]]:
    async with open_kubernetes_backend(settings(kube), stop_grace=1, reconcile_period=1) as (
        store,
        backend,
    ):
        backend.config = dataclasses.replace(backend.config, orphan_grace=0.3, stop_wait=10)
        yield store, backend


def new_cluster(store: KubeStore, name: str, **extra: Any) -> tuple[Cluster, ClusterLaunch]:
    config = ClusterConfig(extra={"image": "test/img:1", **extra})
    c = Cluster(
        name=name,
        username="alice",
        token="tok",
        status=ClusterStatus.PENDING,
        options={},
        config=config,
        cert_pem="CERT",
        key_pem="KEY",
        start_time_ms=1,
    )
    store.put_cluster(cluster_to_row(c))
    launch = ClusterLaunch(
        name=name,
        username="alice",
        api_url="http://127.0.0.1:9/api",
        token="tok",
        tls_cert=b"CERT",
        tls_key=b"KEY",
        scheduler_cmd=SLEEPER,
        worker_cmd=SLEEPER,
        scheduler_address="tls://127.0.0.1:9",
    )
    return c, launch


def save_state(store: KubeStore, c: Cluster, state: dict[str, Any]) -> None:
    c.state = state
    row = cluster_to_row(c)
    store.update_cluster_state(row.name, row.status, row.stop_time, row.data)


def add_worker(store: KubeStore, c: Cluster, name: str) -> Worker:
    w = Worker(name=name, cluster_name=c.name, start_time_ms=1)
    store.put_workers([worker_to_row(w)])
    return w


async def running(kube: KubeEmulator, name: str) -> None:
    await kube.await_for(
        "pods",
        NS,
        name,
        lambda p: bool(p) and p["status"].get("phase") == "Running",
        timeout=DEADLINE,
    )


async def gone(kube: KubeEmulator, name: str) -> None:
    await kube.await_for("pods", NS, name, lambda p: p is None, timeout=DEADLINE)


async def test_lifecycle_ownership_and_idempotent_start(kube: KubeEmulator) -> None:
    name = "a" * 32
    async with open_backend(kube) as (store, backend):
        with trio.fail_after(DEADLINE):
            c, launch = new_cluster(store, name)
            state = await backend.start_scheduler(launch)
            save_state(store, c, state)
            sched_name = f"dask-scheduler-{name}"
            assert state["pod"] == sched_name
            await running(kube, sched_name)
            assert backend.is_alive(state) and backend.adopt(state)
            secret = kube.store.get("secrets", NS, f"dask-gateway-{name}")
            sched = kube.store.get("pods", NS, sched_name)
            assert sched["metadata"]["ownerReferences"][0]["uid"] == secret["metadata"]["uid"]
            assert sched["spec"]["containers"][0]["image"] == "test/img:1"

            # An API that died before recording the state starts it again: adopted.
            again = await backend.start_scheduler(launch)
            assert again == state

            add_worker(store, c, "w1")
            wstate = await backend.start_worker(launch, "w1")
            worker = kube.store.get("pods", NS, wstate["pod"])
            assert worker["metadata"]["ownerReferences"][0]["uid"] == state["uid"]
            await running(kube, wstate["pod"])

            await backend.stop_worker(name, "w1", wstate)
            assert (
                kube.store.list("pods", NS, label_selector="gateway.dask.org/component=worker")[0]
                == []
            )
            assert not backend.is_alive(wstate)
            await backend.wait_exit(wstate)  # returns at once: the pod is gone

            await backend.stop_cluster(name, state, {})
            assert not backend.is_alive(state)
            assert kube.store.list("pods", NS)[0] == []
            # The Secret stays: it is the finished cluster's record.
            assert kube.store.get("secrets", NS, f"dask-gateway-{name}")


async def test_start_failures_are_backend_errors(kube: KubeEmulator) -> None:
    async with open_backend(kube) as (store, backend):
        with trio.fail_after(DEADLINE):
            # Another object holds the scheduler pod's name: not adopted.
            name = "b" * 32
            kube.store.create(
                "pods",
                NS,
                {
                    "metadata": {"name": f"dask-scheduler-{name}"},
                    "spec": {"containers": [{"name": "c", "image": "x", "command": ["true"]}]},
                },
            )
            _, launch = new_cluster(store, name)
            with pytest.raises(BackendError, match="already exists and is not this cluster's"):
                await backend.start_scheduler(launch)
            # Bad per-cluster settings (e.g. from an options handler).
            _, launch = new_cluster(store, "c" * 32, image_pull_policy="Sometimes")
            with pytest.raises(BackendError, match="image_pull_policy"):
                await backend.start_scheduler(launch)
            # A worker without its scheduler pod.
            _, launch = new_cluster(store, "d" * 32)
            with pytest.raises(BackendError, match="scheduler pod .* is gone"):
                await backend.start_worker(launch, "w1")
            # The API server refuses (e.g. RBAC, quota): a clear error, no crash.
            kube.fail_next(1, status=403, method="POST", path="/secrets")
            with pytest.raises(BackendError, match="cannot create Secret"):
                await backend.start_scheduler(launch)


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("oom", "OOMKilled (exit code 137)"),
        ("evict", "Evicted: "),
        ("pull", "ErrImagePull: failed to pull"),
    ],
)
async def test_wait_exit_returns_with_the_reason(
    kube: KubeEmulator, caplog: pytest.LogCaptureFixture, fault: str, reason: str
) -> None:
    assert kube.kubelet is not None
    name = "e" * 32
    async with open_backend(kube) as (store, backend):
        with trio.fail_after(DEADLINE):
            c, launch = new_cluster(store, name)
            save_state(store, c, await backend.start_scheduler(launch))
            await running(kube, f"dask-scheduler-{name}")
            add_worker(store, c, "w1")
            if fault == "pull":
                kube.kubelet.fail_image_pull("gateway.dask.org/component=worker")
            wstate = await backend.start_worker(launch, "w1")
            if fault != "pull":
                await running(kube, wstate["pod"])
                assert backend.is_alive(wstate)
                if fault == "oom":
                    kube.kubelet.oom_kill(NS, wstate["pod"])
                else:
                    kube.kubelet.evict(NS, wstate["pod"])
            with caplog.at_level(logging.INFO, logger="dask_gateway.api.kubernetes"):
                await backend.wait_exit(wstate)
            assert not backend.is_alive(wstate)
            [line] = [r.getMessage() for r in caplog.records if "is down" in r.getMessage()]
            assert reason in line, line
            assert backend.is_alive(c.state)  # the scheduler is unaffected


async def test_reconciler_deletes_unwanted_pods(kube: KubeEmulator) -> None:
    name = "f" * 32
    async with open_backend(kube) as (store, backend):
        with trio.fail_after(DEADLINE):
            c, launch = new_cluster(store, name)
            save_state(store, c, await backend.start_scheduler(launch))
            for w in ("w1", "w2"):
                add_worker(store, c, w)
            w1 = await backend.start_worker(launch, "w1")
            w2 = await backend.start_worker(launch, "w2")
            await running(kube, w2["pod"])
            # The manager forgot w1 (e.g. its start failed) without deleting it: cleanup.
            store.delete_worker(name, "w1")
            await gone(kube, w1["pod"])
            assert kube.store.get("pods", NS, w2["pod"])  # w2 is still wanted
            # The cluster is FAILED (its teardown never ran): every pod goes.
            c.status = ClusterStatus.FAILED
            save_state(store, c, c.state)
            await gone(kube, f"dask-scheduler-{name}")
            await gone(kube, w2["pod"])


async def test_a_restarted_backend_adopts_running_pods(kube: KubeEmulator) -> None:
    name = "9" * 32
    async with open_backend(kube) as (store, backend):
        with trio.fail_after(DEADLINE):
            c, launch = new_cluster(store, name)
            state = await backend.start_scheduler(launch)
            save_state(store, c, state)
            add_worker(store, c, "w1")
            wstate = await backend.start_worker(launch, "w1")
            await running(kube, wstate["pod"])
    async with open_backend(kube) as (store, backend):
        with trio.fail_after(DEADLINE):
            [row] = store.load_clusters()
            assert row.data["state"] == state
            [worker] = store.load_workers(name)
            assert worker.data["state"] == wstate
            assert backend.adopt(state) and backend.adopt(wstate)
            await backend.stop_cluster(name, state, {"w1": wstate})


async def test_unreachable_api_server_is_a_store_error(kube: KubeEmulator, tmp_path: Any) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(kube.kubeconfig()))
    s = dataclasses.replace(settings(kube), kubeconfig=str(kubeconfig))
    kube.close()
    with trio.fail_after(DEADLINE), pytest.raises(KubeStoreUnavailable) as info:
        async with open_kubernetes_backend(dataclasses.replace(s, request_timeout=2)):
            pass
    assert isinstance(info.value, StoreError)
    assert "cannot list the gateway's Secrets and Pods in namespace 'default'" in str(info.value)
