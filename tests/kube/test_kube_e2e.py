"""The official client's scenarios through the Kubernetes backend, on the emulator.

The gateway is the three real services (console scripts) with ``backend.type:
kubernetes``; the Kubernetes API server and kubelet are the emulator, in this process; the
client is the official ``dask_gateway`` package, unmodified. Every cluster is therefore a
Secret, a scheduler pod and worker pods in the emulated API server, run as local processes
by the emulated kubelet, reached through our scheduler proxy (TLS SNI) and web proxy.

Measured (printed with ``pytest -s``): pod creation to phase Running and to cluster
RUNNING, and the API's recovery time after a SIGKILL.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from dask_gateway.client import ClusterStatus

from tests.e2e.harness import (
    GatewayUnderTest,
    assert_stays,
    names,
    time_limit,
    wait_status,
    wait_until,
    wait_workers,
)
from tests.k8s_emulator import KubeEmulator
from tests.kube.harness import NAMESPACE, PodTimeline, kube_config, kube_gateway, phase, pods

ROOT = Path(__file__).resolve().parents[2]
INSTANCE = "e2e"
DEFAULT_IMAGE = "registry.example/dask-cluster:1"
BAD_IMAGE = "registry.example/no-such-image:0"


@pytest.fixture(scope="module")
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(kubelet=True) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, kube: KubeEmulator) -> Iterator[GatewayUnderTest]:
    config = kube_config(
        kube,
        INSTANCE,
        backend={
            "kubernetes": {
                "image": DEFAULT_IMAGE,
                "worker_extra_pod_labels": {"team": "e2e"},
                "scheduler_extra_container_config": {"env": [{"name": "EXTRA", "value": "1"}]},
            }
        },
        cluster={"adaptive_period": 1, "worker_start_failure_limit": 3},
        options={
            "fields": [
                {"field": "image", "type": "string", "default": DEFAULT_IMAGE, "target": "image"}
            ]
        },
    )
    with kube_gateway(tmp_path_factory, "kube-e2e", kube, config) as gateway:
        yield gateway


def get(kube: KubeEmulator, plural: str, name: str) -> dict[str, Any] | None:
    try:
        return kube.store.get(plural, NAMESPACE, name)
    except Exception:
        return None


def record(kube: KubeEmulator, cluster: str) -> dict[str, Any]:
    secret = get(kube, "secrets", f"dask-gateway-{cluster}")
    assert secret is not None
    return json.loads(secret["metadata"]["annotations"]["gateway.dask.org/cluster-record"])


def env_of(pod: dict[str, Any]) -> dict[str, Any]:
    container = pod["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def log_interval(log: str, first: str, then: str) -> float:
    """Seconds between the last log line containing ``first`` and the next with ``then``."""
    stamps: list[tuple[str, datetime]] = []
    for line in log.splitlines():
        if line.startswith("[") and (first in line or then in line):
            stamp = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
            stamps.append((first if first in line else then, stamp))
    start = max(i for i, (what, _) in enumerate(stamps) if what == first)
    end = next(i for i in range(start, len(stamps)) if stamps[i][0] == then)
    return (stamps[end][1] - stamps[start][1]).total_seconds()


def test_official_client_scenario(gw: GatewayUnderTest, kube: KubeEmulator) -> None:
    """new_cluster -> scale(2) -> compute -> adapt -> shutdown, checking the objects."""
    with PodTimeline(kube) as timeline, gw.client("alice") as gateway:
        submitted = time.monotonic()
        cluster = gateway.new_cluster()
        running = time.monotonic()
        client = None
        name = cluster.name
        try:
            # The Secret: credentials (the cluster's own) and the record.
            secret = get(kube, "secrets", f"dask-gateway-{name}")
            assert secret is not None
            labels = secret["metadata"]["labels"]
            assert labels["gateway.dask.org/instance"] == INSTANCE
            assert labels["gateway.dask.org/cluster"] == name
            assert labels["gateway.dask.org/user"] == "alice"
            assert labels["app.kubernetes.io/name"] == "dask-gateway"
            assert set(secret["data"]) == {"dask.crt", "dask.pem", "api-token"}
            wire = gw.wire_cluster(name)
            assert base64.b64decode(secret["data"]["dask.crt"]).decode() == wire["tls_cert"]
            wait_until(
                lambda: record(kube, name)["status"] == "RUNNING", 10, "the record to say RUNNING"
            )
            assert "tls_key" not in json.dumps(record(kube, name))

            # The scheduler pod: owned by the Secret, spec §5.1 ports, pod-IP binding, probe.
            sched = get(kube, "pods", f"dask-scheduler-{name}")
            assert sched is not None and phase(sched) == "Running"
            [owner] = sched["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["uid"]) == ("Secret", secret["metadata"]["uid"])
            container = sched["spec"]["containers"][0]
            assert container["image"] == DEFAULT_IMAGE
            probe = container["readinessProbe"]["httpGet"]
            assert (probe["port"], probe["path"]) == (8788, "/api/health")
            args = container["args"]
            assert args[args.index("--port") + 1] == "8786"
            assert args[args.index("--dg-api-address") + 1] == "$(POD_IP):8788"
            assert args[args.index("--dg-heartbeat-period") + 1] == "1"
            env = env_of(sched)
            assert env["DASK_GATEWAY_API_TOKEN"] == "/etc/dask-credentials/api-token"
            assert env["DASK_GATEWAY_CLUSTER_NAME"] == name
            assert env["EXTRA"] == "1"  # extra container config, list appended
            ip = sched["status"]["podIP"]
            assert cluster.scheduler_address.endswith(name)  # gateway://<proxy>/<name>

            cluster.scale(2)
            wait_workers(cluster, 2)
            workers = pods(kube, INSTANCE, cluster=name, component="worker")
            assert len(workers) == 2
            joined = {w["name"] for w in cluster.scheduler_info["workers"].values()}
            for pod in workers:
                [owner] = pod["metadata"]["ownerReferences"]
                assert (owner["kind"], owner["uid"]) == ("Pod", sched["metadata"]["uid"])
                assert pod["metadata"]["labels"]["team"] == "e2e"
                worker_name = env_of(pod)["DASK_GATEWAY_WORKER_NAME"]
                assert worker_name in joined
                assert pod["spec"]["containers"][0]["args"][0] == f"tls://{ip}:8786"

            client = cluster.get_client(set_as_default=False)
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
            resp = gw.raw("GET", f"/clusters/{name}/status", user="alice")  # owner-only
            assert resp.status == 200, resp

            # Adaptive between 1 and 2: idle, it retires one worker; its pod goes.
            cluster.adapt(minimum=1, maximum=2)
            wait_workers(cluster, 1, timeout=90)
            wait_until(
                lambda: len(pods(kube, INSTANCE, cluster=name, component="worker")) == 1,
                30,
                "the retired worker's pod to be deleted",
            )
            assert client.submit(lambda x: x * 2, 21).result(timeout=30) == 42

            client.close()
            client = None
            cluster.shutdown()
            assert wait_status(gateway, name, "STOPPED", timeout=30) == "STOPPED"
            wait_until(
                lambda: not pods(kube, INSTANCE, cluster=name), 30, "the cluster's pods to go"
            )
            wait_until(lambda: record(kube, name)["status"] == "STOPPED", 10, "a STOPPED record")
        finally:
            if client is not None:
                client.close()
            cluster.shutdown()
    pod_name = f"dask-scheduler-{name}"
    created = timeline.created[pod_name]
    print(
        f"\n[measure] scheduler pod created -> Running: "
        f"{timeline.running[pod_name] - created:.2f} s; created -> cluster RUNNING (client "
        f"saw it): {running - created:.2f} s; submit -> RUNNING: {running - submitted:.2f} s"
    )


def test_api_restart_rebuilds_state_from_kubernetes(
    gw: GatewayUnderTest, kube: KubeEmulator
) -> None:
    """SIGKILL the API mid-life: the new one finds the cluster in the objects' labels and
    annotations, adopts its pods, and the cluster stays RUNNING and usable."""
    with gw.client("bob") as gateway:
        cluster = gateway.new_cluster()
        client = None
        try:
            cluster.scale(1)
            wait_workers(cluster, 1)
            client = cluster.get_client(set_as_default=False)
            assert client.submit(lambda: 1).result(timeout=30) == 1
            before = {p["metadata"]["uid"] for p in pods(kube, INSTANCE, cluster=cluster.name)}
            assert len(before) == 2
            wait_until(
                lambda: record(kube, cluster.name)["status"] == "RUNNING", 10, "a RUNNING record"
            )

            killed = time.monotonic()
            with time_limit(70, "API restart"):
                gw.local.restart_api(kill=True)
            ready = time.monotonic()
            listed = {r.name: r.status for r in gateway.list_clusters()}
            assert listed == {cluster.name: ClusterStatus.RUNNING}
            assert client.submit(lambda x: x + 1, 41).result(timeout=30) == 42
            usable = time.monotonic()
            rebuild = log_interval(
                gw.local.log_tail("api", 400), " cluster records and ", "API listening"
            )
            print(
                f"\n[measure] API SIGKILL -> new API ready (health + proxies synced): "
                f"{ready - killed:.2f} s; -> cluster listed RUNNING and computing: "
                f"{usable - killed:.2f} s; of which list + rebuild + adopt + listen: "
                f"{rebuild:.3f} s (the rest is the new process's start-up and imports)"
            )
            # The same pods, adopted; heartbeats accepted by the new API.
            after = {p["metadata"]["uid"] for p in pods(kube, INSTANCE, cluster=cluster.name)}
            assert after == before
            assert_stays(
                lambda: names(gateway.list_clusters(status="running")) == {cluster.name},
                3.0,
                "the cluster RUNNING after the restart",
            )
            # Still scalable: the API knows its preload's address from the record.
            cluster.scale(2)
            wait_workers(cluster, 2)
            assert len(pods(kube, INSTANCE, cluster=cluster.name, component="worker")) == 2
        finally:
            if client is not None:
                client.close()
            cluster.shutdown()
        assert wait_status(gateway, cluster.name, "STOPPED", timeout=30) == "STOPPED"
        wait_until(lambda: not pods(kube, INSTANCE, cluster=cluster.name), 30, "pods to go")


def test_lost_worker_pods_are_replaced(gw: GatewayUnderTest, kube: KubeEmulator) -> None:
    """A worker pod deleted by hand (kubectl delete pod), OOM-killed or evicted: the
    scheduler loses the worker, the API starts another and deletes the dead pod. Then
    kubectl delete pod <scheduler>: the workers go with it (owner references) and the
    cluster is FAILED; its record stays."""
    assert kube.kubelet is not None
    kubelet = kube.kubelet
    ways = {
        "deleted by hand": lambda pod: kube.store.delete("pods", NAMESPACE, pod),
        "OOM-killed": lambda pod: kubelet.oom_kill(NAMESPACE, pod),
        "evicted": lambda pod: kubelet.evict(NAMESPACE, pod),
    }
    with gw.client("carol") as gateway:
        cluster = gateway.new_cluster()
        try:
            cluster.scale(1)
            wait_workers(cluster, 1)
            for how, lose in ways.items():
                wait_until(
                    lambda: (
                        [
                            phase(p)
                            for p in pods(kube, INSTANCE, cluster=cluster.name, component="worker")
                        ]
                        == ["Running"]
                    ),
                    30,
                    "one running worker pod",
                )
                [victim] = pods(kube, INSTANCE, cluster=cluster.name, component="worker")
                victim_name = victim["metadata"]["name"]
                lose(victim_name)
                lost = time.monotonic()

                def replaced(victim_name: str = victim_name) -> bool:
                    workers = pods(kube, INSTANCE, cluster=cluster.name, component="worker")
                    joined = cluster.scheduler_info["workers"]
                    names_ = [p["metadata"]["name"] for p in workers]
                    return len(joined) == 1 and len(names_) == 1 and names_ != [victim_name]

                wait_until(replaced, 60, f"a replacement for the worker pod {how}", interval=0.2)
                print(
                    f"\n[measure] worker pod {how} -> replacement joined: {time.monotonic() - lost:.2f} s"
                )
                assert gateway.get_cluster(cluster.name).status is ClusterStatus.RUNNING

            kube.store.delete("pods", NAMESPACE, f"dask-scheduler-{cluster.name}")
            wait_until(
                lambda: gateway.get_cluster(cluster.name).status is ClusterStatus.FAILED,
                30,
                "the cluster to be FAILED without its scheduler pod",
            )
            wait_until(
                lambda: not pods(kube, INSTANCE, cluster=cluster.name),
                30,
                "the worker pods to be garbage-collected",
            )
            assert get(kube, "secrets", f"dask-gateway-{cluster.name}") is not None
            wait_until(
                lambda: record(kube, cluster.name)["status"] == "FAILED", 10, "a FAILED record"
            )
        finally:
            cluster.shutdown()
    log = gw.local.log_tail("api", 400)
    assert "pod dask-scheduler-" in log and "is down" in log


def test_worker_image_pull_errors_fail_the_cluster(
    gw: GatewayUnderTest, kube: KubeEmulator
) -> None:
    """Workers that cannot pull their image are replaced, and count as start failures: the
    cluster is FAILED after three in a row, with the reason in the API's log."""
    assert kube.kubelet is not None
    with gw.client("dave") as gateway:
        cluster = gateway.new_cluster()
        try:
            kube.kubelet.fail_image_pull(
                f"gateway.dask.org/cluster={cluster.name},gateway.dask.org/component=worker"
            )
            seen: set[str] = set()

            def failed() -> bool:
                seen.update(
                    p["metadata"]["name"]
                    for p in pods(kube, INSTANCE, cluster=cluster.name, component="worker")
                )
                return gateway.get_cluster(cluster.name).status is ClusterStatus.FAILED

            cluster.scale(1)
            wait_until(
                failed, 60, "the cluster to be FAILED after worker start failures", interval=0.1
            )
            assert len(seen) >= 2, seen  # replaced at least once before giving up
            wait_until(lambda: not pods(kube, INSTANCE, cluster=cluster.name), 30, "pods to go")
        finally:
            cluster.shutdown()
    log = gw.local.log_tail("api", 400)
    assert "ImagePullBackOff" in log or "ErrImagePull" in log
    assert "consecutive worker start failures" in log


def test_scheduler_image_from_options_and_pull_error(
    gw: GatewayUnderTest, kube: KubeEmulator
) -> None:
    """The image is a cluster option; a scheduler that cannot pull it fails the start."""
    assert kube.kubelet is not None
    kube.kubelet.fail_image_pull(image=BAD_IMAGE)
    with gw.client("erin") as gateway:
        name = gateway.submit(image=BAD_IMAGE)
        wait_until(
            lambda: gateway.get_cluster(name).status is ClusterStatus.FAILED,
            30,
            "the cluster to be FAILED when its scheduler image cannot be pulled",
        )
        assert gateway.get_cluster(name).options["image"] == BAD_IMAGE
        wait_until(lambda: not pods(kube, INSTANCE, cluster=name), 30, "pods to go")
    [line] = [
        line
        for line in gw.local.log_tail("api", 400).splitlines()
        if f"dask-scheduler-{name} is down: " in line
    ]
    assert "ImagePullBackOff" in line or "ErrImagePull" in line
    assert BAD_IMAGE in line


def test_smoke_script(gw: GatewayUnderTest, capsys: pytest.CaptureFixture[str]) -> None:
    """tools/k8s_smoke.py (what `make k8s-smoke` runs against a real cluster) passes here."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import k8s_smoke
    finally:
        sys.path.remove(str(ROOT / "tools"))
    status = k8s_smoke.main(
        [
            "--address", gw.address,
            "--proxy-address", gw.proxy_address,
            "--workers", "2",
            "--timeout", "90",
            "--option", "image", DEFAULT_IMAGE,
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0, out
    assert "smoke test passed" in out and "- shutdown until STOPPED ... ok" in out
