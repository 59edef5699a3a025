"""The API in-process with ``backend.type: kubernetes`` on the emulator: pods stuck Pending.

A pod the cluster cannot schedule stays ``Pending`` (the emulated scheduler marks it
``Unschedulable``). The manager's start timeouts decide: a scheduler pending past
``start_timeout`` fails the cluster; a worker pending past ``worker_start_timeout`` is
deleted and replaced, counting as a start failure, until the failure limit fails the
cluster. The pod's reason is in the log either way.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio

from dask_gateway_api.config import settings_from_mapping
from dask_gateway_api.main import serve_api
from dask_gateway_common.http import HTTPClient
from tests.k8s_emulator import KubeEmulator
from tests.kube.harness import NAMESPACE, deep_merge, pods

INSTANCE = "api-test"
AUTH = ("Authorization", "Basic " + base64.b64encode(b"alice:x").decode())
DEADLINE = 90


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(kubelet=True, bookmark_interval=0.2) as emulator:
        yield emulator


class Api:
    def __init__(self, http: HTTPClient, base: str) -> None:
        self.http = http
        self.base = base

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        data = b"" if body is None else json.dumps(body).encode()
        resp = await self.http.fetch(
            method, f"{self.base}{path}", body=data, headers=[AUTH], timeout=30
        )
        assert resp.status < 300, (resp.status, resp.body)
        return json.loads(resp.body) if resp.body else None

    async def status(self, name: str) -> str:
        return str((await self.call("GET", f"/api/v1/clusters/{name}"))["status"])


@asynccontextmanager
async def running_api(kube: KubeEmulator, **overrides: Any) -> AsyncIterator[Api]:
    config = deep_merge(
        {
            "address": "127.0.0.1:0",
            "stop_clusters_on_shutdown": True,
            "backend": {
                "type": "kubernetes",
                "stop_grace": 1,
                "kubernetes": {
                    "kubeconfig": str(kube.kubeconfig_path),
                    "namespace": NAMESPACE,
                    "instance": INSTANCE,
                },
            },
            "cluster": {"heartbeat_period": 1, "heartbeat_timeout": 20, "check_period": 0.25},
        },
        overrides,
    )
    settings = settings_from_mapping(config, {"DASK_GATEWAY_PROXY_TOKEN": "t" * 32})
    async with HTTPClient() as http, trio.open_nursery() as nursery:
        host, port = await nursery.start(partial(serve_api, settings, direct_api=True))
        yield Api(http, f"http://{host}:{port}")
        nursery.cancel_scope.cancel()


async def wait_status(api: Api, name: str, status: str) -> None:
    with trio.fail_after(DEADLINE):
        while await api.status(name) != status:  # noqa: ASYNC110 - state in another service
            await trio.sleep(0.1)


async def test_scheduler_pending_past_the_start_timeout_fails_the_cluster(
    kube: KubeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    assert kube.kubelet is not None
    kube.kubelet.keep_pending("gateway.dask.org/component=scheduler")
    caplog.set_level(logging.INFO, logger="dask_gateway")
    with trio.fail_after(DEADLINE):
        async with running_api(kube, cluster={"start_timeout": 2}) as api:
            name = await api.call("POST", "/api/v1/clusters/", {"cluster_options": {}})
            name = name["name"]
            await wait_status(api, name, "FAILED")
            with trio.fail_after(20):
                while pods(kube, INSTANCE, cluster=name):  # noqa: ASYNC110
                    await trio.sleep(0.1)
    text = caplog.text
    assert "cluster did not start within 2 s" in text
    assert f"pod dask-scheduler-{name} never started: Unschedulable: 0/1 nodes" in text


async def test_workers_pending_past_the_timeout_are_replaced_then_fail_the_cluster(
    kube: KubeEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    assert kube.kubelet is not None
    kube.kubelet.keep_pending("gateway.dask.org/component=worker")
    caplog.set_level(logging.INFO, logger="dask_gateway")
    seen: set[str] = set()
    with trio.fail_after(DEADLINE):
        async with running_api(
            kube, cluster={"worker_start_timeout": 2, "worker_start_failure_limit": 2}
        ) as api:
            name = (await api.call("POST", "/api/v1/clusters/", {"cluster_options": {}}))["name"]
            await wait_status(api, name, "RUNNING")  # a real dask scheduler, in a pod
            await api.call("POST", f"/api/v1/clusters/{name}/scale", {"count": 1})
            while await api.status(name) != "FAILED":
                seen.update(
                    p["metadata"]["name"]
                    for p in pods(kube, INSTANCE, cluster=name, component="worker")
                )
                await trio.sleep(0.05)
            with trio.fail_after(20):
                while pods(kube, INSTANCE, cluster=name):  # noqa: ASYNC110
                    await trio.sleep(0.1)
    assert len(seen) == 2, seen  # the first one, then its replacement
    text = caplog.text
    assert "did not start in time" in text
    assert "never started: Unschedulable: 0/1 nodes" in text
    assert "consecutive worker start failures" in text
