"""Pure decisions of the Kubernetes backend: pod health, the watch cache, and cleanup.

Theory of operation
-------------------
* :func:`pod_health` reads a Pod as the API server reports it and says whether its process
  is (or may still become) alive, with a reason for the logs. Pods never restart in place
  (``restartPolicy: Never``), so a terminated container, a ``Failed``/``Succeeded`` phase, an
  eviction, an OOM kill, a pod being deleted, a pod replaced by another of the same name,
  or a container stuck on an image or configuration error (``ErrImagePull``,
  ``ImagePullBackOff``, ``CreateContainerConfigError``...) is a dead pod: the manager then
  replaces the worker (a start failure, counted toward the limit) or fails the cluster.
  ``Pending`` is alive: how long a pod may stay pending is the manager's start timeouts'
  business.
* :class:`ObjectCache` is the informer's state: objects by name plus the resourceVersion to
  resume a watch from. It applies list results (:meth:`~ObjectCache.replace`, after a 410)
  and watch events, and takes write-through copies of objects we just created or patched
  (:meth:`~ObjectCache.observe`) so a create is never mistaken for a vanished pod while its
  watch event is still on the way. Deleted uids are remembered (bounded) so a late
  write-through never resurrects a deleted object.
* :func:`decide_cleanup` compares the pods observed with the records the manager keeps
  (desired) and returns the pods to delete: pods of finished clusters, and worker pods that
  no live worker record claims (after a grace period since first seen). Everything else is
  left alone; in particular pods of unknown clusters are the garbage collector's (their
  owner is gone) or another component's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .kube_objects import (
    ANNOTATION_WORKER_NAME,
    COMPONENT_SCHEDULER,
    COMPONENT_WORKER,
    LABEL_CLUSTER,
    LABEL_COMPONENT,
    LABEL_WORKER,
)

__all__ = [
    "DeletePod",
    "DesiredCluster",
    "FATAL_WAITING_REASONS",
    "ObjectCache",
    "PodHealth",
    "decide_cleanup",
    "pod_health",
    "worker_name_of",
]

#: Container waiting reasons that mean the container will not run without a change.
FATAL_WAITING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)

_FINISHED = ("STOPPED", "FAILED")


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


@dataclass(frozen=True)
class PodHealth:
    """``alive``: the pod runs or may still run; ``phase``: Pending, Running, Succeeded,
    Failed, Broken (stuck on an error), Deleting or Gone; ``reason``: for the logs."""

    alive: bool
    phase: str
    reason: str


def _terminated_text(term: Mapping[str, Any]) -> str:
    reason = term.get("reason") or "terminated"
    code = term.get("exitCode")
    text = f"{reason} (exit code {code})" if code is not None else str(reason)
    message = term.get("message")
    return f"{text}: {message}" if message else text


def pod_health(pod: Mapping[str, Any] | None, uid: str | None = None) -> PodHealth:
    """The health of ``pod`` (``None``: not found); ``uid``: the pod we expect."""
    if pod is None:
        return PodHealth(False, "Gone", "the pod no longer exists")
    meta = _meta(pod)
    if uid and meta.get("uid") and meta.get("uid") != uid:
        return PodHealth(False, "Gone", "the pod was replaced by another of the same name")
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    statuses = list(status.get("initContainerStatuses") or []) + list(
        status.get("containerStatuses") or []
    )
    if phase in ("Failed", "Succeeded"):
        if status.get("reason"):
            text = str(status["reason"])
            if status.get("message"):
                text += f": {status['message']}"
        else:
            terms = [
                _terminated_text(s["state"]["terminated"])
                for s in statuses
                if (s.get("state") or {}).get("terminated")
            ]
            text = "; ".join(terms) or phase
        return PodHealth(False, phase, text)
    if meta.get("deletionTimestamp"):
        return PodHealth(False, "Deleting", "the pod is being deleted")
    for s in statuses:
        state = s.get("state") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING_REASONS:
            text = str(waiting["reason"])
            if waiting.get("message"):
                text += f": {waiting['message']}"
            return PodHealth(False, "Broken", text)
        if state.get("terminated"):
            return PodHealth(False, "Failed", _terminated_text(state["terminated"]))
    if phase == "Pending":
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                why = cond.get("reason") or "Unschedulable"
                message = cond.get("message")
                return PodHealth(True, "Pending", f"{why}: {message}" if message else str(why))
        waiting = [
            (s.get("state") or {}).get("waiting", {}).get("reason")
            for s in statuses
            if (s.get("state") or {}).get("waiting")
        ]
        return PodHealth(True, "Pending", ", ".join(w for w in waiting if w) or "Pending")
    return PodHealth(True, phase, phase)


def worker_name_of(pod: Mapping[str, Any]) -> str | None:
    """The worker name of a worker pod (exact annotation, else the label)."""
    meta = _meta(pod)
    name = (meta.get("annotations") or {}).get(ANNOTATION_WORKER_NAME)
    if isinstance(name, str) and name:
        return name
    label = (meta.get("labels") or {}).get(LABEL_WORKER)
    return label if isinstance(label, str) and label else None


# --- the watch cache --------------------------------------------------------------------


def _rv_newer(a: str | None, b: str | None) -> bool:
    """Whether resourceVersion ``a`` is newer than ``b``. They are opaque strings to
    clients; every server in practice (etcd, the emulator) uses increasing integers, which
    are compared. Anything else counts as newer (the watch is then the only authority)."""
    if a is None or b is None:
        return True
    if a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return a != b


class ObjectCache:
    """Objects of one kind by name, and the resourceVersion a watch resumes from."""

    def __init__(self, tombstones: int = 4096) -> None:
        self._objects: dict[str, dict[str, Any]] = {}
        self._deleted: OrderedDict[str, None] = OrderedDict()
        self._tombstones = tombstones
        self.resource_version: str | None = None

    def get(self, name: str) -> dict[str, Any] | None:
        return self._objects.get(name)

    def values(self) -> list[dict[str, Any]]:
        return list(self._objects.values())

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, name: object) -> bool:
        return name in self._objects

    def _bury(self, uid: str | None) -> None:
        if not uid:
            return
        self._deleted[uid] = None
        while len(self._deleted) > self._tombstones:
            self._deleted.popitem(last=False)

    def replace(self, items: Iterable[dict[str, Any]], resource_version: str | None) -> set[str]:
        """Take a fresh list; returns the names that changed (appeared, changed, vanished)."""
        fresh = {}
        for obj in items:
            name = _meta(obj).get("name")
            if isinstance(name, str):
                fresh[name] = obj
        changed = {n for n in self._objects if n not in fresh}
        for name in changed:
            self._bury(_meta(self._objects[name]).get("uid"))
        for name, obj in fresh.items():
            if self._objects.get(name) != obj:
                changed.add(name)
        self._objects = fresh
        self.resource_version = resource_version
        return changed

    def apply(self, event: Mapping[str, Any]) -> set[str]:
        """Apply one watch event (ADDED, MODIFIED, DELETED or BOOKMARK); returns the names
        that changed. ``ERROR`` events are the caller's (they end the watch)."""
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            return set()
        meta = _meta(obj)
        rv = meta.get("resourceVersion")
        if isinstance(rv, str) and rv:
            self.resource_version = rv
        name = meta.get("name")
        if kind == "BOOKMARK" or not isinstance(name, str):
            return set()
        current = self._objects.get(name)
        if kind == "DELETED":
            self._bury(meta.get("uid"))
            if current is not None and _meta(current).get("uid") in (None, meta.get("uid")):
                del self._objects[name]
                return {name}
            return set()
        if kind not in ("ADDED", "MODIFIED"):
            return set()
        if meta.get("uid") in self._deleted:
            return set()
        if current is not None and _meta(current).get("uid") == meta.get("uid"):
            if not _rv_newer(rv, _meta(current).get("resourceVersion")):
                return set()  # we already hold a newer copy (write-through)
        self._objects[name] = obj
        return {name}

    def observe(self, obj: dict[str, Any]) -> bool:
        """Write-through of an object the API server just returned to us (create, patch);
        ignored if a newer copy is held or the object was deleted meanwhile."""
        meta = _meta(obj)
        name = meta.get("name")
        if not isinstance(name, str) or meta.get("uid") in self._deleted:
            return False
        current = self._objects.get(name)
        if current is not None and _meta(current).get("uid") == meta.get("uid"):
            if not _rv_newer(meta.get("resourceVersion"), _meta(current).get("resourceVersion")):
                return False
        self._objects[name] = obj
        return True

    def forget(self, name: str, uid: str | None = None) -> bool:
        """Drop ``name`` (e.g. after our own DELETE answered 404)."""
        current = self._objects.get(name)
        if current is None or (uid and _meta(current).get("uid") not in (None, uid)):
            return False
        self._bury(_meta(current).get("uid"))
        del self._objects[name]
        return True


# --- cleanup ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DesiredCluster:
    """What the manager's records say about one cluster (keyed by cluster id)."""

    status: str
    #: Names of the workers whose records are not finished (their pods may exist).
    workers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DeletePod:
    name: str
    uid: str
    reason: str


def decide_cleanup(
    pods: Iterable[Mapping[str, Any]],
    desired: Mapping[str, DesiredCluster],
    first_seen: Mapping[str, float],
    now: float,
    grace: float,
) -> list[DeletePod]:
    """The pods to delete (see the module docstring). ``first_seen`` maps pod uids to when
    this process first saw them (seconds, same clock as ``now``)."""
    actions: list[DeletePod] = []
    for pod in pods:
        meta = _meta(pod)
        labels = meta.get("labels") or {}
        uid = str(meta.get("uid") or "")
        name = str(meta.get("name") or "")
        if meta.get("deletionTimestamp") or not name:
            continue
        component = labels.get(LABEL_COMPONENT)
        cluster = desired.get(str(labels.get(LABEL_CLUSTER)))
        if cluster is None or component not in (COMPONENT_SCHEDULER, COMPONENT_WORKER):
            continue
        if cluster.status in _FINISHED:
            actions.append(DeletePod(name, uid, f"its cluster is {cluster.status}"))
            continue
        if cluster.status == "STOPPING" or component != COMPONENT_WORKER:
            continue
        worker = worker_name_of(pod)
        if worker in cluster.workers:
            continue
        if now - first_seen.get(uid, now) >= grace:
            actions.append(DeletePod(name, uid, "no live worker record claims it"))
    return actions
