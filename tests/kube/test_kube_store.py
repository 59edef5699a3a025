"""The Kubernetes-backed store: record codec (pure), write-behind and reload on the emulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from dask_gateway_api.backends.kube_client import Informer, KubeClient, load_api_client
from dask_gateway_api.backends.kube_objects import (
    ClusterIdentity,
    instance_selector,
    make_secret,
    owner_reference,
)
from dask_gateway_api.kube_store import (
    KubeStore,
    RecordError,
    decode_cluster_secret,
    decode_worker_pod,
    encode_cluster_record,
    encode_worker_record,
)
from dask_gateway_api.manager import ClusterManager
from dask_gateway_api.models import Cluster, ClusterStatus, Worker, WorkerStatus
from dask_gateway_api.resources import ClusterConfig
from dask_gateway_api.store import cluster_to_row, worker_to_row
from tests.k8s_emulator import KubeEmulator

NS = "default"
INSTANCE = "store-test"
NAME = "c0ffee00c0ffee00c0ffee00c0ffee00"
DEADLINE = 20


def cluster(**kw: Any) -> Cluster:
    base: dict[str, Any] = dict(
        name=NAME,
        username="alice",
        token="secret-token",
        status=ClusterStatus.PENDING,
        options={"worker_cores": 2},
        config=ClusterConfig(worker_cores=2, extra={"image": "img:1"}),
        cert_pem="-----CERT-----",
        key_pem="-----KEY-----",
        start_time_ms=1_000,
    )
    base.update(kw)
    return Cluster(**base)


def secret_for(c: Cluster, record: str | None) -> dict[str, Any]:
    ident = ClusterIdentity(NS, INSTANCE, c.name, c.username)
    return make_secret(
        ident,
        tls_cert=c.cert_pem.encode(),
        tls_key=c.key_pem.encode(),
        token=c.token,
        record=record,
    )


# --- codec ------------------------------------------------------------------------------


def test_cluster_record_round_trip_keeps_secrets_out_of_annotations() -> None:
    c = cluster(status=ClusterStatus.RUNNING, last_heartbeat=123, scheduler_address="tls://x:1")
    row = cluster_to_row(c)
    record = encode_cluster_record(row)
    assert "secret-token" not in record and "KEY" not in record
    assert "last_heartbeat" not in record
    back = decode_cluster_secret(secret_for(c, record))
    assert back.token == "secret-token" and back.tls_key == b"-----KEY-----"
    assert back.tls_cert == b"-----CERT-----"
    assert (back.name, back.username, back.status, back.start_time) == (
        NAME,
        "alice",
        "RUNNING",
        1000,
    )
    assert back.data["scheduler_address"] == "tls://x:1"
    assert back.data["config"]["extra"] == {"image": "img:1"}
    # Heartbeats alone do not change the record (no write per heartbeat).
    c.last_heartbeat = 999
    assert encode_cluster_record(cluster_to_row(c)) == record


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s["metadata"]["annotations"].pop("gateway.dask.org/cluster-record"), "no cluster record"),
        (lambda s: s["metadata"]["annotations"].update({"gateway.dask.org/cluster-record": "{"}), "not JSON"),
        (lambda s: s["metadata"]["annotations"].update({"gateway.dask.org/cluster-record": "[]"}), "not a JSON object"),
        (lambda s: s["data"].pop("dask.pem"), "no 'dask.pem'"),
        (lambda s: s["data"].update({"api-token": "!!"}), "not base64"),
    ],
)  # fmt: skip
def test_unreadable_records_say_why(mutate: Any, message: str) -> None:
    s = secret_for(cluster(), encode_cluster_record(cluster_to_row(cluster())))
    mutate(s)
    with pytest.raises(RecordError, match=message):
        decode_cluster_secret(s)


def test_record_fields_are_checked() -> None:
    record = json.loads(encode_cluster_record(cluster_to_row(cluster())))
    for key, bad in [("status", "BOGUS"), ("start_time", "x"), ("version", 99), ("name", "")]:
        broken = dict(record, **{key: bad})
        with pytest.raises(RecordError):
            decode_cluster_secret(secret_for(cluster(), json.dumps(broken)))


def test_worker_pod_decoding() -> None:
    w = Worker(
        name="w1",
        cluster_name=NAME,
        status=WorkerStatus.RUNNING,
        start_time_ms=5,
        close_expected=True,
    )
    pod = {
        "metadata": {
            "name": "dask-worker-x-w1",
            "uid": "u1",
            "creationTimestamp": "2026-01-01T00:00:01Z",
            "annotations": {
                "gateway.dask.org/worker-name": "w1",
                "gateway.dask.org/worker-record": encode_worker_record(worker_to_row(w)),
            },
        }
    }
    row = decode_worker_pod(pod, NAME)
    assert (row.name, row.status, row.start_time, row.stop_time) == ("w1", "RUNNING", 5, None)
    assert row.data == {
        "close_expected": True,
        "launched": True,
        "state": {"pod": "dask-worker-x-w1", "uid": "u1"},
    }
    # No record yet (the API died right after creating the pod): a pending, launched worker.
    del pod["metadata"]["annotations"]["gateway.dask.org/worker-record"]
    row = decode_worker_pod(pod, NAME)
    assert (row.status, row.start_time) == ("PENDING", 1767225601000)
    with pytest.raises(RecordError):
        decode_worker_pod({"metadata": {"name": "x"}}, NAME)


# --- on the emulator --------------------------------------------------------------------


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.2) as emulator:
        yield emulator


@asynccontextmanager
async def open_store(kube: KubeEmulator) -> AsyncIterator[KubeStore]:
    api_client, _ = load_api_client(str(kube.kubeconfig_path), None)
    try:
        client = KubeClient(api_client, NS, request_timeout=5)
        secrets = Informer(client, "secrets", instance_selector(INSTANCE))
        pods = Informer(client, "pods", instance_selector(INSTANCE))
        async with trio.open_nursery() as nursery:
            await nursery.start(secrets.run)
            await nursery.start(pods.run)
            store = KubeStore(client, secrets, pods, namespace=NS, instance=INSTANCE)
            store.load()
            await nursery.start(store.run)
            yield store
            nursery.cancel_scope.cancel()
    finally:
        api_client.close()


def stored_record(kube: KubeEmulator) -> dict[str, Any]:
    obj = kube.store.get("secrets", NS, f"dask-gateway-{NAME}")
    return json.loads(obj["metadata"]["annotations"]["gateway.dask.org/cluster-record"])


async def create_secret(store: KubeStore, c: Cluster) -> dict[str, Any]:
    obj = await store.client.create("secrets", secret_for(c, store.cluster_record(c.name)))
    obj.setdefault("kind", "Secret")
    store.secrets.observe(obj)
    store.touch_cluster(c.name)
    return obj


async def test_write_behind_coalesces_and_skips_heartbeats(kube: KubeEmulator) -> None:
    async with open_store(kube) as store:
        with trio.fail_after(DEADLINE):
            c = cluster()
            store.put_cluster(cluster_to_row(c))
            await store.wait_idle()
            assert store.writes == 0  # no Secret yet: nothing to write to
            c.state = {"pod": "p"}
            store.update_cluster_state(*_state(c))  # changed before the Secret exists...
            await create_secret(store, c)
            await store.wait_idle()
            assert stored_record(kube)["data"]["state"] == {"pod": "p"}  # ...and not lost
            writes = store.writes
            for i in range(20):  # a burst: one write (latest wins)
                c.count = i
                store.update_cluster_state(*_state(c))
            await store.wait_idle()
            assert store.writes == writes + 1
            assert stored_record(kube)["data"]["count"] == 19
            for t in range(5):  # heartbeats: no write at all
                c.last_heartbeat = t
                store.update_cluster_state(*_state(c))
            await store.wait_idle()
            assert store.writes == writes + 1


def _state(c: Cluster) -> tuple[str, str, int | None, dict[str, Any]]:
    row = cluster_to_row(c)
    return row.name, row.status, row.stop_time, row.data


async def test_failed_writes_are_retried(kube: KubeEmulator) -> None:
    async with open_store(kube) as store:
        with trio.fail_after(DEADLINE):
            c = cluster()
            store.put_cluster(cluster_to_row(c))
            await create_secret(store, c)
            kube.fail_next(2, status=500, method="PATCH")
            c.status = ClusterStatus.RUNNING
            store.update_cluster_state(*_state(c))
            await store.wait_idle()
            assert stored_record(kube)["status"] == "RUNNING"


async def test_reload_rebuilds_rows_from_objects(kube: KubeEmulator) -> None:
    """What a restarted API finds: clusters from Secrets, the scheduler state from its pod
    when the record has none, workers from worker pods; then expiry deletes the Secret."""
    c = cluster(status=ClusterStatus.RUNNING, count=2)
    async with open_store(kube) as store:
        with trio.fail_after(DEADLINE):
            store.put_cluster(cluster_to_row(c))
            secret = await create_secret(store, c)
            await store.wait_idle()
    ident = ClusterIdentity(NS, INSTANCE, NAME, "alice")
    base_pod = {"spec": {"containers": [{"name": "c", "image": "i", "command": ["true"]}]}}
    sched = kube.store.create(
        "pods",
        NS,
        {
            **base_pod,
            "metadata": {
                "name": ident.scheduler_pod_name,
                "labels": ident.labels("scheduler"),
                "ownerReferences": [owner_reference(secret, "Secret")],
            },
        },
    )
    for worker, record in [("w1", Worker("w1", NAME, WorkerStatus.RUNNING, 7)), ("w2", None)]:
        annotations = {"gateway.dask.org/worker-name": worker}
        if record is not None:
            annotations["gateway.dask.org/worker-record"] = encode_worker_record(
                worker_to_row(record)
            )
        kube.store.create(
            "pods",
            NS,
            {
                **base_pod,
                "metadata": {
                    "name": ident.worker_pod_name(worker),
                    "labels": {**ident.labels("worker"), "gateway.dask.org/worker": worker},
                    "annotations": annotations,
                },
            },
        )
    # A Secret of another instance and a broken one of ours are not loaded.
    kube.store.create("secrets", NS, {"metadata": {"name": "other", "labels": {"app.kubernetes.io/name": "dask-gateway", "gateway.dask.org/instance": "x"}}})  # fmt: skip
    broken = secret_for(cluster(name="d" * 32), "not json")
    kube.store.create("secrets", NS, broken)

    async with open_store(kube) as store:
        with trio.fail_after(DEADLINE):
            [row] = store.load_clusters()
            assert (row.name, row.status, row.token) == (NAME, "RUNNING", "secret-token")
            assert row.data["state"] == {
                "pod": ident.scheduler_pod_name,
                "uid": sched["metadata"]["uid"],
            }
            assert row.data["count"] == 2
            workers = {w.name: w for w in store.load_workers(NAME)}
            assert workers["w1"].status == "RUNNING" and workers["w1"].start_time == 7
            assert workers["w2"].status == "PENDING" and workers["w2"].data["launched"] is True
            # The rows feed the manager's model unchanged.
            from dask_gateway_api.store import cluster_from_row

            assert cluster_from_row(row).config == c.config
            assert {d for d in store.desired()} == {NAME}

            # Finished and old: the record and the Secret go.
            c.status, c.stop_time_ms = ClusterStatus.STOPPED, 2_000
            store.update_cluster_state(*_state(c))
            assert store.delete_stopped_older_than(1.0, now_ms=10_000) == [NAME]
            assert store.load_clusters() == []
            await store.wait_idle()
            with pytest.raises(Exception, match="not found"):
                kube.store.get("secrets", NS, f"dask-gateway-{NAME}")


def test_kube_store_offers_what_the_manager_calls() -> None:
    """Every ``self.store.<method>`` the manager uses exists on KubeStore."""
    import inspect
    import re

    used = set(re.findall(r"self\.store\.(\w+)", inspect.getsource(ClusterManager)))
    assert "put_cluster" in used and "load_workers" in used
    assert {m for m in used if not callable(getattr(KubeStore, m, None))} == set()
