"""A store on Kubernetes objects: the API keeps no state of its own on Kubernetes.

Theory of operation
-------------------
:class:`KubeStore` offers the interface of :class:`~dask_gateway_api.store.Store` that the
manager uses (``put_cluster``, ``update_cluster_state``, ``load_clusters``,
``put_workers``, ``delete_worker``, ``load_workers``, ``delete_stopped_older_than``). The
manager calls it synchronously on the trio thread; rows are kept in memory (this process's
truth) and written *behind* to the objects of each cluster:

* a cluster's record (options, config, status, times, addresses, counters, the scheduler
  pod's name and uid) is the JSON annotation ``gateway.dask.org/cluster-record`` of the
  cluster's Secret; its token, certificate and key are the Secret's data;
* a worker's record (status, times, ``close_expected``) is the JSON annotation
  ``gateway.dask.org/worker-record`` of its pod. Whether it was launched and its state
  (pod name and uid) are read off the pod itself.

A flusher task compares what each object *should* carry (the encoded row) with what the
informer's cache says it carries and sends a merge patch for the difference. Changes
coalesce (latest state wins); ``last_heartbeat`` is not written (a restarted manager gives
running clusters a fresh heartbeat window anyway), so heartbeats cost no writes. Objects
not created yet are skipped: the backend creates the Secret and the pods with the current
record in place, then marks the row dirty again (:meth:`KubeStore.touch_cluster`,
:meth:`KubeStore.touch_worker`) so nothing written meanwhile is lost. A 404 means the
object is gone (its owner was deleted) and the write is dropped; retryable errors are
retried with backoff (0.5 s doubling to 30 s); other errors are logged and dropped.

Durability: a write is queued the moment the manager makes it and lands within
milliseconds; a crash loses only what was still queued, and a clean shutdown flushes the
queue (bounded). After a restart, :meth:`KubeStore.load` rebuilds the rows from the
informers' first list: clusters from Secrets, workers from worker pods, the scheduler's
state from its pod when the record has none yet. One API process per gateway instance
(labels ``gateway.dask.org/instance``) may write these objects.

Expiry: :meth:`KubeStore.delete_stopped_older_than` drops finished records and deletes
their Secrets (garbage collection then removes anything they still own).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import trio

from .backends.kube_client import Informer, KubeClient, KubeError
from .backends.kube_decisions import DesiredCluster, worker_name_of
from .backends.kube_objects import (
    ANNOTATION_CLUSTER_NAME,
    ANNOTATION_CLUSTER_RECORD,
    ANNOTATION_WORKER_RECORD,
    COMPONENT_CREDENTIALS,
    COMPONENT_SCHEDULER,
    COMPONENT_WORKER,
    LABEL_CLUSTER,
    LABEL_COMPONENT,
    ClusterIdentity,
)
from .store import FINISHED_STATUSES, StoredCluster, StoredWorker, StoreError

__all__ = [
    "KubeStore",
    "KubeStoreUnavailable",
    "RecordError",
    "decode_cluster_secret",
    "decode_worker_pod",
    "encode_cluster_record",
    "encode_worker_record",
]

log = logging.getLogger("dask_gateway.api.kubernetes")

RECORD_VERSION = 1
#: Annotations of one object may hold 256 KiB in all; a record larger than this is refused.
MAX_RECORD_BYTES = 200 * 1024
_STATUSES = ("PENDING", "RUNNING", "STOPPING", "STOPPED", "FAILED")
_WORKER_STATUSES = ("PENDING", "RUNNING", "STOPPING", "STOPPED", "FAILED")


class KubeStoreUnavailable(StoreError):
    """The store cannot load: the Kubernetes API is unreachable or refuses us."""


class RecordError(ValueError):
    """An object's record annotation or data cannot be read."""


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _time_ms(stamp: Any) -> int | None:
    """Milliseconds since the epoch of an RFC 3339 timestamp (``2026-01-01T00:00:00Z``)."""
    if not isinstance(stamp, str):
        return None
    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


# --- codec (pure) -----------------------------------------------------------------------


def encode_cluster_record(row: StoredCluster) -> str:
    """The cluster-record annotation of ``row``: everything but secrets and last_heartbeat."""
    data = {k: v for k, v in row.data.items() if k != "last_heartbeat"}
    return _dumps(
        {
            "version": RECORD_VERSION,
            "name": row.name,
            "username": row.username,
            "status": row.status,
            "start_time": row.start_time,
            "stop_time": row.stop_time,
            "data": data,
        }
    )


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_cluster_secret(secret: Mapping[str, Any]) -> StoredCluster:
    """A cluster row from its Secret. Raises :class:`RecordError` saying what is wrong."""
    meta = _meta(secret)
    raw = (meta.get("annotations") or {}).get(ANNOTATION_CLUSTER_RECORD)
    if not isinstance(raw, str):
        raise RecordError("no cluster record annotation")
    try:
        record = json.loads(raw)
    except ValueError:
        raise RecordError("the cluster record is not JSON") from None
    if not isinstance(record, dict):
        raise RecordError("the cluster record is not a JSON object")
    if record.get("version") != RECORD_VERSION:
        raise RecordError(f"unknown cluster record version {record.get('version')!r}")
    name, username, status = record.get("name"), record.get("username"), record.get("status")
    start, stop, data = record.get("start_time"), record.get("stop_time"), record.get("data")
    if not isinstance(name, str) or not name or not isinstance(username, str):
        raise RecordError("the cluster record has no valid name or username")
    if status not in _STATUSES:
        raise RecordError(f"the cluster record has an unknown status {status!r}")
    if not _int(start) or not (stop is None or _int(stop)) or not isinstance(data, dict):
        raise RecordError("the cluster record has invalid times or data")
    blobs = secret.get("data") or {}
    values = {}
    for key in ("api-token", "dask.crt", "dask.pem"):
        value = blobs.get(key)
        if not isinstance(value, str):
            raise RecordError(f"the Secret has no {key!r}")
        try:
            values[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RecordError(f"the Secret's {key!r} is not base64") from None
    try:
        token = values["api-token"].decode("ascii")
    except UnicodeDecodeError:
        raise RecordError("the Secret's api-token is not text") from None
    return StoredCluster(
        name=name,
        username=username,
        status=status,
        start_time=start,
        stop_time=stop,
        token=token,
        tls_cert=values["dask.crt"],
        tls_key=values["dask.pem"],
        data=data,
    )


def encode_worker_record(row: StoredWorker) -> str:
    """The worker-record annotation of ``row`` (launch state is the pod's own)."""
    return _dumps(
        {
            "version": RECORD_VERSION,
            "status": row.status,
            "start_time": row.start_time,
            "stop_time": row.stop_time,
            "close_expected": bool(row.data.get("close_expected", False)),
        }
    )


def decode_worker_pod(pod: Mapping[str, Any], cluster_name: str) -> StoredWorker:
    """A worker row from its pod; a pod without a (readable) record is a PENDING worker
    started when the pod was created. Raises :class:`RecordError` if it names no worker."""
    meta = _meta(pod)
    worker = worker_name_of(pod)
    if worker is None:
        raise RecordError("the pod names no worker")
    created = _time_ms(meta.get("creationTimestamp")) or int(time.time() * 1000)
    record: dict[str, Any] = {}
    raw = (meta.get("annotations") or {}).get(ANNOTATION_WORKER_RECORD)
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("version") == RECORD_VERSION:
            record = parsed
    status = record.get("status")
    start, stop = record.get("start_time"), record.get("stop_time")
    return StoredWorker(
        cluster=cluster_name,
        name=worker,
        status=status if status in _WORKER_STATUSES else "PENDING",
        start_time=start if _int(start) else created,
        stop_time=stop if _int(stop) else None,
        data={
            "close_expected": bool(record.get("close_expected", False)),
            "launched": True,
            "state": {"pod": meta.get("name"), "uid": meta.get("uid")},
        },
    )


# --- the store --------------------------------------------------------------------------


class KubeStore:
    """Cluster and worker rows kept in memory and written behind to Kubernetes objects."""

    encrypted = False

    def __init__(
        self,
        client: KubeClient,
        secrets: Informer,
        pods: Informer,
        *,
        namespace: str,
        instance: str,
    ) -> None:
        self.client = client
        self.secrets = secrets
        self.pods = pods
        self.namespace = namespace
        self.instance = instance
        self._clusters: dict[str, StoredCluster] = {}
        self._workers: dict[str, dict[str, StoredWorker]] = {}
        self._dirty: dict[tuple[str, ...], None] = {}
        self._expired: dict[str, None] = {}
        self._wake = trio.Event()
        self._changed = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._too_big: set[tuple[str, ...]] = set()
        #: Patches and deletes sent (for tests and metrics).
        self.writes = 0

    def identity(self, name: str, username: str | None = None) -> ClusterIdentity:
        if username is None:
            row = self._clusters.get(name)
            username = row.username if row is not None else ""
        return ClusterIdentity(self.namespace, self.instance, name, username)

    def _mark(self, key: tuple[str, ...] | None) -> None:
        if key is not None:
            self._dirty[key] = None
        if self._idle.is_set():
            self._idle = trio.Event()
        self._wake.set()
        self._changed.set()
        self._changed = trio.Event()

    # -- the Store interface (synchronous, on the trio thread)

    def put_cluster(self, cluster: StoredCluster) -> None:
        self._clusters[cluster.name] = cluster
        self._workers.setdefault(cluster.name, {})
        self._mark(("c", cluster.name))

    def update_cluster_state(
        self, name: str, status: str, stop_time: int | None, data: dict[str, Any]
    ) -> None:
        row = self._clusters.get(name)
        if row is None:
            return
        row.status, row.stop_time, row.data = status, stop_time, dict(data)
        self._mark(("c", name))

    def get_cluster(self, name: str) -> StoredCluster | None:
        return self._clusters.get(name)

    def load_clusters(self, statuses: Iterable[str] | None = None) -> list[StoredCluster]:
        wanted = None if statuses is None else set(statuses)
        rows = [r for r in self._clusters.values() if wanted is None or r.status in wanted]
        return sorted(rows, key=lambda r: r.start_time)

    def delete_cluster(self, name: str) -> None:
        row = self._clusters.pop(name, None)
        self._workers.pop(name, None)
        for key in [k for k in self._dirty if k[1] == name]:
            del self._dirty[key]
        if row is not None:
            self._expired[self.identity(name, row.username).secret_name] = None
            self._mark(None)

    def delete_stopped_older_than(self, age: float, now_ms: int | None = None) -> list[str]:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - int(age * 1000)
        names = [
            r.name
            for r in self._clusters.values()
            if r.status in FINISHED_STATUSES and r.stop_time is not None and r.stop_time < cutoff
        ]
        for name in names:
            self.delete_cluster(name)
        return names

    def put_workers(self, workers: Iterable[StoredWorker]) -> None:
        for w in workers:
            self._workers.setdefault(w.cluster, {})[w.name] = w
            self._mark(("w", w.cluster, w.name))

    def put_worker(self, worker: StoredWorker) -> None:
        self.put_workers([worker])

    def delete_worker(self, cluster: str, name: str) -> None:
        self._workers.get(cluster, {}).pop(name, None)
        self._dirty.pop(("w", cluster, name), None)
        self._changed.set()  # wakes the reconciler: the worker's pod may go now
        self._changed = trio.Event()

    def load_workers(self, cluster: str) -> list[StoredWorker]:
        rows = self._workers.get(cluster, {}).values()
        return sorted(rows, key=lambda w: (w.start_time, w.name))

    def close(self) -> None:
        """Nothing to release (the backend owns the client and the tasks)."""

    # -- for the backend

    def cluster_row(self, name: str) -> StoredCluster | None:
        return self._clusters.get(name)

    def cluster_record(self, name: str) -> str | None:
        row = self._clusters.get(name)
        return None if row is None else encode_cluster_record(row)

    def worker_record(self, cluster: str, worker: str) -> str | None:
        row = self._workers.get(cluster, {}).get(worker)
        return None if row is None else encode_worker_record(row)

    def touch_cluster(self, name: str) -> None:
        """Its Secret was just created: write anything that changed meanwhile."""
        if name in self._clusters:
            self._mark(("c", name))

    def touch_worker(self, cluster: str, worker: str) -> None:
        if worker in self._workers.get(cluster, {}):
            self._mark(("w", cluster, worker))

    def desired(self) -> dict[str, DesiredCluster]:
        """What the records say, by cluster id (for the pod cleanup decisions)."""
        out = {}
        for name, row in self._clusters.items():
            live = frozenset(
                w.name
                for w in self._workers.get(name, {}).values()
                if w.status not in FINISHED_STATUSES
            )
            out[self.identity(name, row.username).id] = DesiredCluster(row.status, live)
        return out

    async def wait_changed(self) -> None:
        """Return at the next change of any row (or a worker forgotten)."""
        await self._changed.wait()

    # -- loading

    def load(self) -> None:
        """Rebuild every row from the informers' caches (after their first list)."""
        self._clusters.clear()
        self._workers.clear()
        ids: dict[str, str] = {}
        for secret in self.secrets.values():
            labels = _meta(secret).get("labels") or {}
            if labels.get(LABEL_COMPONENT) != COMPONENT_CREDENTIALS:
                continue
            try:
                row = decode_cluster_secret(secret)
            except RecordError as exc:
                log.warning(
                    "Secret %s: cannot read its cluster record (%s); ignored",
                    _meta(secret).get("name"),
                    exc,
                )
                continue
            if self.identity(row.name, row.username).secret_name != _meta(secret).get("name"):
                log.warning(
                    "Secret %s: record of another cluster; ignored", _meta(secret).get("name")
                )
                continue
            self._clusters[row.name] = row
            self._workers[row.name] = {}
            ids[self.identity(row.name, row.username).id] = row.name
        for pod in self.pods.values():
            labels = _meta(pod).get("labels") or {}
            name = ids.get(str(labels.get(LABEL_CLUSTER)))
            if name is None:
                continue
            component = labels.get(LABEL_COMPONENT)
            if component == COMPONENT_SCHEDULER:
                row = self._clusters[name]
                state = row.data.get("state")
                if not (isinstance(state, dict) and state.get("uid")):
                    row.data["state"] = {
                        "pod": _meta(pod).get("name"),
                        "uid": _meta(pod).get("uid"),
                    }
            elif component == COMPONENT_WORKER:
                try:
                    worker = decode_worker_pod(pod, name)
                except RecordError as exc:
                    log.warning("pod %s: %s; ignored", _meta(pod).get("name"), exc)
                    continue
                self._workers[name][worker.name] = worker
        log.info(
            "loaded %d cluster records and %d worker records from Kubernetes",
            len(self._clusters),
            sum(len(w) for w in self._workers.values()),
        )

    # -- writing behind

    async def _write(self, key: tuple[str, ...]) -> None:
        if key[0] == "c":
            row = self._clusters.get(key[1])
            if row is None:
                return
            plural, obj_name = "secrets", self.identity(row.name, row.username).secret_name
            annotation, want = ANNOTATION_CLUSTER_RECORD, encode_cluster_record(row)
            informer = self.secrets
        elif key[0] == "w":
            row_w = self._workers.get(key[1], {}).get(key[2])
            if row_w is None:
                return
            plural, obj_name = "pods", self.identity(key[1]).worker_pod_name(key[2])
            annotation, want = ANNOTATION_WORKER_RECORD, encode_worker_record(row_w)
            informer = self.pods
        else:
            return
        obj = informer.get(obj_name)
        if obj is None:
            return  # not created yet (its creation carries the record) or gone
        annotations = _meta(obj).get("annotations") or {}
        if annotations.get(annotation) == want:
            return
        if len(want) > MAX_RECORD_BYTES:
            if key not in self._too_big:
                self._too_big.add(key)
                log.error(
                    "%s %s: record of %d bytes is too large; not written",
                    plural,
                    obj_name,
                    len(want),
                )
            return
        patch: dict[str, Any] = {"metadata": {"annotations": {annotation: want}}}
        if key[0] == "c":
            patch["metadata"]["annotations"][ANNOTATION_CLUSTER_NAME] = key[1]
        self.writes += 1
        informer.observe(await self.client.patch(plural, obj_name, patch))

    async def _flush_once(self) -> bool:
        """Write every dirty row and delete expired Secrets; True if something must be
        retried."""
        keys = list(self._dirty)
        self._dirty.clear()
        expired = list(self._expired)
        self._expired.clear()
        retry = False
        for key in keys:
            try:
                await self._write(key)
            except KubeError as exc:
                if exc.status == 404:
                    continue
                if exc.retryable:
                    self._dirty[key] = None
                    retry = True
                log.warning("cannot write the record of %s: %s", "/".join(key[1:]), exc)
        for secret_name in expired:
            try:
                self.writes += 1
                await self.client.delete("secrets", secret_name)
            except KubeError as exc:
                if exc.retryable:
                    self._expired[secret_name] = None
                    retry = True
                log.warning("cannot delete expired Secret %s: %s", secret_name, exc)
        return retry

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher: write behind until cancelled."""
        task_status.started()
        delay = 0.5
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if await self._flush_once():
                self._wake.set()
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)
            else:
                delay = 0.5
            if not self._dirty and not self._expired:
                self._idle.set()

    async def flush(self, timeout: float = 5.0) -> bool:
        """Write everything queued now (at most ``timeout`` seconds); True if all landed."""
        with trio.move_on_after(timeout):
            while self._dirty or self._expired:
                if await self._flush_once():
                    await trio.sleep(0.2)
            self._idle.set()
            return True
        return False

    async def wait_idle(self) -> None:
        """Return once nothing is queued (for tests)."""
        await self._idle.wait()
