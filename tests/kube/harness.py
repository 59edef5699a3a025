"""Helpers of the Kubernetes backend tests: the gateway on the emulator, pod queries, timing.

The Kubernetes API server + kubelet emulator (``tests.k8s_emulator``) runs in the test
process (threads); the three gateway services run as real processes (``LocalGateway``)
with ``backend.type: kubernetes`` and the emulator's kubeconfig, so an API can be killed
with SIGKILL and restarted while the pods (local processes started by the emulated kubelet,
each on its own 127.0.0.N) keep running.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.e2e.harness import GatewayUnderTest, LocalGateway, Ports, wait_until
from tests.k8s_emulator import KubeEmulator

#: Every synchronous test of tests/kube must finish within this many seconds.
TEST_DEADLINE = 240.0
NAMESPACE = "default"

#: Gateways currently running, for the log tails of failure reports.
ACTIVE: list[LocalGateway] = []


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def kube_config(kube: KubeEmulator, instance: str, **overrides: Any) -> dict[str, Any]:
    """A gateway config on the emulator (fast heartbeats; clusters stopped on shutdown)."""
    config: dict[str, Any] = {
        "stop_clusters_on_shutdown": True,
        "backend": {
            "type": "kubernetes",
            "stop_grace": 2,
            "status_period": 5,
            "kubernetes": {
                "kubeconfig": str(kube.kubeconfig_path),
                "namespace": NAMESPACE,
                "instance": instance,
            },
        },
        "cluster": {"heartbeat_period": 1, "heartbeat_timeout": 10},
    }
    return deep_merge(config, overrides)


def pods(
    kube: KubeEmulator,
    instance: str,
    *,
    cluster: str | None = None,
    component: str | None = None,
) -> list[dict[str, Any]]:
    """The pods of a gateway instance (optionally of one cluster / component)."""
    selector = f"gateway.dask.org/instance={instance}"
    if cluster is not None:
        selector += f",gateway.dask.org/cluster={cluster}"
    if component is not None:
        selector += f",gateway.dask.org/component={component}"
    items, _, _ = kube.store.list("pods", NAMESPACE, label_selector=selector)
    return items


def phase(pod: Mapping[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


@contextlib.contextmanager
def kube_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    kube: KubeEmulator,
    config: dict[str, Any],
) -> Iterator[GatewayUnderTest]:
    """Start the three services on ``config``; at the end stop them and check that the
    API deleted every pod of its instance (``stop_clusters_on_shutdown``)."""
    workdir = tmp_path_factory.mktemp(name)
    local = LocalGateway(workdir=workdir, config=config, ports=Ports.free())
    ACTIVE.append(local)
    gateway = GatewayUnderTest(local)
    try:
        local.start(timeout=60)
        yield gateway
    finally:
        try:
            local.stop()
        finally:
            ACTIVE.remove(local)
    instance = config["backend"]["kubernetes"]["instance"]
    wait_until(
        lambda: not pods(kube, instance),
        30,
        f"every pod of instance {instance} to be deleted after the API stopped",
    )


class PodTimeline:
    """When each pod (by name) appeared and first reached phase Running, from the
    emulator's own store events (monotonic seconds)."""

    def __init__(self, kube: KubeEmulator) -> None:
        self._lock = threading.Lock()
        self.created: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self._unsubscribe = kube.store.subscribe(self._on_event)

    def _on_event(self, event: Any) -> None:
        if event.plural != "pods":
            return
        now = time.monotonic()
        name = event.obj["metadata"]["name"]
        with self._lock:
            if event.type == "ADDED":
                self.created.setdefault(name, now)
            if phase(event.obj) == "Running":
                self.running.setdefault(name, now)

    def close(self) -> None:
        self._unsubscribe()

    def __enter__(self) -> PodTimeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
