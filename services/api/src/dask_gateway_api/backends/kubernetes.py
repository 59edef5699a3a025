"""The Kubernetes backend: each cluster is a Secret, a scheduler Pod and worker Pods.

Theory of operation
-------------------
:func:`open_kubernetes_backend` connects with the official ``kubernetes`` client
(kubeconfig or in-cluster service account), lists the Secrets and Pods of this gateway
instance (label selector), rebuilds the :class:`~dask_gateway_api.kube_store.KubeStore`
from them, and keeps both lists current with informers (list + watch, resumed from the
last resourceVersion, relisted on 410). It yields the store and the
:class:`KubeBackend`; the manager takes both, exactly as it takes SQLite and the local
backend. There are no CRDs and no state outside the API server.

The backend is a thin loop over pure code: the objects come from the builders of
:mod:`.kube_objects`, liveness from :func:`~.kube_decisions.pod_health` applied to the
informer's cache, and cleanup from :func:`~.kube_decisions.decide_cleanup`:

* ``start_scheduler`` creates the Secret (credentials + record), then the scheduler Pod
  owned by it. ``start_worker`` creates one worker Pod owned by the scheduler Pod. Both are
  idempotent: an object that already exists with our labels is adopted (an API that died
  between a create and writing down its result finds it again).
* ``wait_exit`` waits on the informer until the pod is dead (gone, replaced, deleted,
  failed, succeeded, evicted, OOM-killed, stuck on an image or config error) and logs why;
  the manager then replaces the worker or fails the cluster. ``is_alive``/``adopt`` read
  the same cache (no request).
* ``stop_worker`` / ``stop_cluster`` delete pods with ``stop_grace`` (background
  propagation) and wait (bounded) until the informer saw them go. The Secret stays: it is
  the record of the finished cluster until the store expires it.
* a reconciler deletes pods nobody wants any more (pods of finished clusters, worker pods
  no live worker record claims), on every change of the pods or the records and every
  ``reconcile_period`` seconds; so the API never loses track of a pod it created.

Heartbeats: schedulers keep the configured non-zero ``--dg-heartbeat-period`` (spec §5.1
lists 0 for Kubernetes because upstream's controller learns readiness from pods): our
manager registers a cluster on its first heartbeat, reconciles workers from heartbeats and
fails silent schedulers, the same on every backend. Pod status is used on top of that, for
liveness and failure reasons.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..resources import ClusterConfig, ClusterConfigError
from .base import Backend, BackendError, ClusterLaunch, State
from .kube_client import Informer, KubeClient, KubeConfigError, KubeError, load_api_client
from .kube_decisions import DeletePod, decide_cleanup, pod_health
from .kube_objects import (
    COMPONENT_CREDENTIALS,
    COMPONENT_SCHEDULER,
    COMPONENT_WORKER,
    LABEL_CLUSTER,
    LABEL_COMPONENT,
    LABEL_INSTANCE,
    ClusterIdentity,
    KubeSpecError,
    instance_selector,
    kube_cluster_spec,
    label_value,
    make_scheduler_pod,
    make_secret,
    make_worker_pod,
    owner_reference,
)

if TYPE_CHECKING:
    from ..config import KubernetesSettings
    from ..kube_store import KubeStore

__all__ = ["KubeBackend", "KubeBackendConfig", "open_kubernetes_backend"]

log = logging.getLogger("dask_gateway.api.kubernetes")


@dataclass(frozen=True)
class KubeBackendConfig:
    """The backend's own knobs (seconds)."""

    namespace: str
    instance: str
    #: Grace period of pod deletions (SIGTERM → SIGKILL).
    stop_grace: float = 5.0
    #: How long a stop waits for the pods to be gone, on top of ``stop_grace``.
    stop_wait: float = 30.0
    #: The reconciler also runs this often without any change.
    reconcile_period: float = 30.0
    #: A worker pod no record claims is deleted once first seen this long ago.
    orphan_grace: float = 10.0


def _labels(obj: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return ((obj or {}).get("metadata") or {}).get("labels") or {}


def _uid(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


class KubeBackend(Backend):
    """Runs clusters as pods. Build it with :func:`open_kubernetes_backend`."""

    def __init__(
        self,
        client: KubeClient,
        secrets: Informer,
        pods: Informer,
        store: KubeStore,
        config: KubeBackendConfig,
    ) -> None:
        self.client = client
        self.secrets = secrets
        self.pods = pods
        self.store = store
        self.config = config
        self._deleting: set[str] = set()
        self._nursery: trio.Nursery | None = None

    # -- helpers

    def _ident(self, name: str, username: str | None = None) -> ClusterIdentity:
        return self.store.identity(name, username)

    def _cluster_settings(self, name: str) -> tuple[ClusterConfig, Any]:
        """The cluster's config (from its record: ClusterLaunch has no cores, scheduler
        memory or ``extra``) and its Kubernetes settings. Raises BackendError."""
        row = self.store.cluster_row(name)
        if row is None:
            raise BackendError(f"cluster {name} has no record")
        try:
            config = ClusterConfig.from_dict(row.data.get("config") or {})
            spec = kube_cluster_spec(config.extra)
        except (ClusterConfigError, KubeSpecError) as exc:
            raise BackendError(f"invalid Kubernetes settings: {exc}") from None
        return config, spec

    def _ours(self, obj: Mapping[str, Any] | None, ident: ClusterIdentity, component: str) -> bool:
        labels = _labels(obj)
        return (
            labels.get(LABEL_INSTANCE) == label_value(self.config.instance)
            and labels.get(LABEL_CLUSTER) == ident.id
            and labels.get(LABEL_COMPONENT) == component
        )

    async def _create(
        self, plural: str, body: dict[str, Any], ident: ClusterIdentity, component: str
    ) -> dict[str, Any]:
        """Create, or adopt an existing object with our labels. Raises BackendError."""
        name = body["metadata"]["name"]
        kind = body["kind"]
        try:
            return self._typed(await self.client.create(plural, body), kind)
        except KubeError as exc:
            if exc.status != 409:
                raise BackendError(f"cannot create {kind} {name}: {exc}") from None
        try:
            obj = await self.client.get(plural, name)
        except KubeError as exc:
            raise BackendError(f"cannot read {kind} {name}: {exc}") from None
        if obj is None or not self._ours(obj, ident, component):
            raise BackendError(f"{kind} {name} already exists and is not this cluster's")
        if (obj.get("metadata") or {}).get("deletionTimestamp"):
            raise BackendError(f"{kind} {name} exists but is being deleted")
        log.info("cluster %s: adopted the existing %s %s", ident.name, kind, name)
        return self._typed(obj, kind)

    @staticmethod
    def _typed(obj: dict[str, Any], kind: str) -> dict[str, Any]:
        obj.setdefault("kind", kind)
        obj.setdefault("apiVersion", "v1")
        return obj

    # -- launching

    async def start_scheduler(self, launch: ClusterLaunch) -> State:
        ident = self._ident(launch.name, launch.username)
        config, spec = self._cluster_settings(launch.name)
        secret = make_secret(
            ident,
            tls_cert=launch.tls_cert,
            tls_key=launch.tls_key,
            token=launch.token,
            record=self.store.cluster_record(launch.name),
        )
        secret = await self._create("secrets", secret, ident, COMPONENT_CREDENTIALS)
        self.secrets.observe(secret)
        self.store.touch_cluster(launch.name)
        pod = make_scheduler_pod(
            ident, launch, config, spec, owner=owner_reference(secret, "Secret")
        )
        pod = await self._create("pods", pod, ident, COMPONENT_SCHEDULER)
        self.pods.observe(pod)
        log.info("cluster %s: scheduler pod %s created", launch.name, ident.scheduler_pod_name)
        return {"pod": ident.scheduler_pod_name, "uid": _uid(pod)}

    async def start_worker(self, launch: ClusterLaunch, worker_name: str) -> State:
        ident = self._ident(launch.name, launch.username)
        config, spec = self._cluster_settings(launch.name)
        scheduler = self.pods.get(ident.scheduler_pod_name)
        if scheduler is None or not pod_health(scheduler).alive:
            raise BackendError(f"the scheduler pod {ident.scheduler_pod_name} is gone")
        try:
            pod = make_worker_pod(
                ident,
                launch,
                config,
                spec,
                worker_name,
                owner=owner_reference(scheduler, "Pod"),
                record=self.store.worker_record(launch.name, worker_name),
            )
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        pod = await self._create("pods", pod, ident, COMPONENT_WORKER)
        self.pods.observe(pod)
        self.store.touch_worker(launch.name, worker_name)
        name = pod["metadata"]["name"]
        log.info("cluster %s: worker pod %s created", launch.name, name)
        return {"pod": name, "uid": _uid(pod)}

    # -- liveness

    def is_alive(self, state: State) -> bool:
        name = state.get("pod")
        if not isinstance(name, str) or not name:
            return False
        return pod_health(self.pods.get(name), state.get("uid")).alive

    def adopt(self, state: State) -> bool:
        return self.is_alive(state)

    async def wait_exit(self, state: State) -> None:
        name = state.get("pod")
        if not isinstance(name, str) or not name:
            return
        uid = state.get("uid")
        while True:
            health = pod_health(self.pods.get(name), uid)
            if not health.alive:
                level = (
                    logging.INFO if health.phase in ("Deleting", "Succeeded") else logging.WARNING
                )
                log.log(level, "pod %s is down: %s", name, health.reason)
                return
            await self.pods.wait_change(name)

    # -- stopping

    async def _delete_pod(self, name: str, uid: str | None) -> None:
        try:
            await self.client.delete("pods", name, grace=self.config.stop_grace, uid=uid or None)
        except KubeError as exc:
            log.warning("cannot delete pod %s: %s", name, exc)

    async def _wait_gone(self, names: list[str]) -> bool:
        with trio.move_on_after(self.config.stop_grace + self.config.stop_wait):
            while remaining := [n for n in names if self.pods.get(n) is not None]:
                await self.pods.wait_change(remaining[0])
            return True
        log.warning("pods still present after the stop deadline: %s", ", ".join(remaining))
        return False

    def _note_unstarted(self, name: str, uid: str | None, what: str) -> None:
        health = pod_health(self.pods.get(name), uid)
        if health.alive and health.phase == "Pending":
            log.warning("%s: pod %s never started: %s", what, name, health.reason)

    async def stop_worker(self, cluster_name: str, worker_name: str, state: State) -> None:
        name = state.get("pod")
        if not isinstance(name, str) or not name:
            return
        uid = state.get("uid")
        self._note_unstarted(name, uid, f"cluster {cluster_name}")
        await self._delete_pod(name, uid)
        await self._wait_gone([name])

    async def stop_cluster(
        self, cluster_name: str, scheduler_state: State, worker_states: Mapping[str, State]
    ) -> None:
        ident = self._ident(cluster_name)
        targets: dict[str, str | None] = {}
        for state in [scheduler_state, *worker_states.values()]:
            if isinstance(state.get("pod"), str) and state["pod"]:
                targets[state["pod"]] = state.get("uid")
        for pod in self.pods.values():  # and any pod of the cluster we know nothing of
            if _labels(pod).get(LABEL_CLUSTER) == ident.id:
                targets.setdefault(pod["metadata"]["name"], None)
        if scheduler_state.get("pod"):
            self._note_unstarted(
                scheduler_state["pod"], scheduler_state.get("uid"), f"cluster {cluster_name}"
            )
        async with trio.open_nursery() as nursery:
            for name, uid in targets.items():
                nursery.start_soon(self._delete_pod, name, uid)
        await self._wait_gone(list(targets))
        log.info("cluster %s: pods deleted", cluster_name)

    # -- cleanup

    async def _cleanup(self, action: DeletePod) -> None:
        try:
            log.info("deleting pod %s: %s", action.name, action.reason)
            await self._delete_pod(action.name, action.uid)
        finally:
            self._deleting.discard(action.uid)

    def reconcile_once(self) -> list[DeletePod]:
        """Start deleting the pods nobody wants (see :func:`decide_cleanup`)."""
        assert self._nursery is not None
        self.pods.prune_first_seen()
        actions = decide_cleanup(
            self.pods.values(),
            self.store.desired(),
            self.pods.first_seen,
            time.monotonic(),
            self.config.orphan_grace,
        )
        started = []
        for action in actions:
            if action.uid in self._deleting:
                continue
            self._deleting.add(action.uid)
            self._nursery.start_soon(self._cleanup, action)
            started.append(action)
        return started

    async def run_reconciler(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                try:
                    self.reconcile_once()
                except Exception:  # a bug here must not stop the control plane
                    log.exception("pod cleanup failed")
                with trio.move_on_after(self.config.reconcile_period):
                    async with trio.open_nursery() as race:

                        async def wake(fn: Any) -> None:
                            await fn()
                            race.cancel_scope.cancel()

                        race.start_soon(wake, self.pods.wait_any_change)
                        race.start_soon(wake, self.store.wait_changed)
                # Changes come in bursts (a scale-up, a teardown): look once per burst, and
                # give orphans their grace period.
                await trio.sleep(min(1.0, self.config.orphan_grace / 4))


@contextlib.asynccontextmanager
async def open_kubernetes_backend(
    settings: KubernetesSettings,
    *,
    stop_grace: float = 5.0,
    reconcile_period: float = 30.0,
) -> AsyncIterator[tuple[KubeStore, KubeBackend]]:
    """Connect, load every record of this instance, and run the informers, the store's
    flusher and the reconciler; yields ``(store, backend)``.

    Raises :class:`~dask_gateway_api.kube_store.KubeStoreUnavailable` (a ``StoreError``)
    when the configuration cannot be loaded or the first list fails. Leaving flushes the
    store's queued writes (at most 5 s) and never deletes a cluster.
    """
    from ..kube_store import KubeStore, KubeStoreUnavailable

    try:
        api_client, default_namespace = await trio.to_thread.run_sync(
            lambda: load_api_client(
                settings.kubeconfig, settings.context, pool_size=settings.api_concurrency + 4
            )
        )
    except KubeConfigError as exc:
        raise KubeStoreUnavailable(str(exc)) from None
    namespace = settings.namespace or default_namespace or "default"
    try:
        client = KubeClient(
            api_client,
            namespace,
            concurrency=settings.api_concurrency,
            request_timeout=settings.request_timeout,
        )
        selector = instance_selector(settings.instance)
        secrets = Informer(client, "secrets", selector, watch_timeout=settings.watch_timeout)
        pods = Informer(client, "pods", selector, watch_timeout=settings.watch_timeout)
        try:
            await secrets.relist()
            await pods.relist()
        except KubeError as exc:
            raise KubeStoreUnavailable(
                f"cannot list the gateway's Secrets and Pods in namespace {namespace!r} "
                f"({client.core.api_client.configuration.host}): {exc}"
            ) from None
        store = KubeStore(client, secrets, pods, namespace=namespace, instance=settings.instance)
        store.load()
        backend = KubeBackend(
            client,
            secrets,
            pods,
            store,
            KubeBackendConfig(
                namespace=namespace,
                instance=settings.instance,
                stop_grace=stop_grace,
                reconcile_period=reconcile_period,
            ),
        )
        log.info(
            "Kubernetes backend: namespace %s, instance %s, API server %s",
            namespace,
            settings.instance,
            client.core.api_client.configuration.host,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(secrets.run)
            await nursery.start(pods.run)
            await nursery.start(store.run)
            await nursery.start(backend.run_reconciler)
            try:
                yield store, backend
            finally:
                with trio.CancelScope(shield=True):
                    if not await store.flush(5.0):
                        log.warning("some cluster records were not written before shutdown")
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(api_client.close)
