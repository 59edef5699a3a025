"""Garbage collector and namespace controller of the emulated cluster (a background thread).

Theory of operation
-------------------
The collector subscribes to every store event and works through them on its own thread,
like kube-controller-manager's garbage collector, so cascading deletion is asynchronous as
in a real cluster (a DELETE returns before the dependents go):

* an object is *removed* (``DELETED``): each dependent (an object whose ``ownerReferences``
  name the removed uid) whose owners are now all gone is deleted (background propagation,
  which cascades because that deletion is an event too); a dependent that still has a live
  owner just loses the dangling reference;
* an object with ``ownerReferences`` is created or updated: if none of its owners exists
  (owners are looked up by uid and must be in the same namespace, or cluster-scoped), it is
  deleted, as the real collector deletes orphans whose owners vanished;
* an owner is being deleted with ``propagationPolicy: Foreground`` (the ``foregroundDeletion``
  finalizer): its dependents are deleted, and once none is left the finalizer is removed,
  which lets the store remove the owner (every dependent blocks, as if
  ``blockOwnerDeletion`` were true);
* a namespace is terminating: everything in it is deleted, then the namespace goes.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from .errors import ApiError
from .resources import RESOURCES
from .store import Store, WatchEvent

__all__ = ["GarbageCollector"]

log = logging.getLogger(__name__)


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


class GarbageCollector:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[WatchEvent | None] = queue.SimpleQueue()
        self._unsubscribe = store.subscribe(self._queue.put)
        self._thread = threading.Thread(target=self._run, name="k8s-emulator-gc", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._unsubscribe()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            try:
                self._handle(event)
            except ApiError as exc:
                if exc.code not in (404, 409):
                    log.warning("garbage collector: %s", exc.message)
            except Exception:
                log.exception("garbage collector failed on %s %s", event.type, event.plural)

    def _handle(self, event: WatchEvent) -> None:
        meta = _meta(event.obj)
        if event.type == "DELETED":
            for plural, dep in self.store.dependents(meta.get("uid", "")):
                self._check_owners(plural, dep)
            for ref in meta.get("ownerReferences") or []:
                owner = self.store.find_uid(ref.get("uid", ""))
                if owner is not None and "foregroundDeletion" in (
                    _meta(owner).get("finalizers") or []
                ):
                    self._foreground(owner)
            namespace = meta.get("namespace")
            if namespace:
                self.store.finish_namespace(namespace)
            return
        if meta.get("ownerReferences") and not meta.get("deletionTimestamp"):
            self._check_owners(event.plural, event.obj)
        if meta.get("deletionTimestamp") and "foregroundDeletion" in (meta.get("finalizers") or []):
            self._foreground(event.obj)
        if event.plural == "namespaces" and meta.get("deletionTimestamp"):
            self._empty_namespace(meta["name"])

    def _owner_alive(self, ref: dict[str, Any], namespace: str | None) -> bool:
        owner = self.store.find_uid(ref.get("uid", ""))
        if owner is None:
            return False
        owner_ns = _meta(owner).get("namespace")
        return not owner_ns or owner_ns == namespace

    def _check_owners(self, plural: str, dep: dict[str, Any]) -> None:
        meta = _meta(dep)
        if meta.get("deletionTimestamp"):
            return
        refs = meta.get("ownerReferences") or []
        alive = [ref for ref in refs if self._owner_alive(ref, meta.get("namespace"))]
        uid = meta.get("uid")
        if not alive:
            self.store.delete(
                plural, meta.get("namespace"), meta["name"], preconditions={"uid": uid}
            )
        elif len(alive) < len(refs):
            keep = {ref.get("uid") for ref in alive}

            def strip(obj: dict[str, Any]) -> None:
                obj["metadata"]["ownerReferences"] = [
                    r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") in keep
                ]

            self.store.mutate(
                plural, meta.get("namespace"), meta["name"], strip, subresource=None, uid=uid
            )

    def _foreground(self, owner: dict[str, Any]) -> None:
        meta = _meta(owner)
        remaining = self.store.dependents(meta.get("uid", ""))
        for plural, dep in remaining:
            if not _meta(dep).get("deletionTimestamp"):
                dep_meta = _meta(dep)
                self.store.delete(
                    plural,
                    dep_meta.get("namespace"),
                    dep_meta["name"],
                    preconditions={"uid": dep_meta.get("uid")},
                )
        if self.store.dependents(meta.get("uid", "")):
            return

        def drop_finalizer(obj: dict[str, Any]) -> None:
            finalizers = [
                f for f in obj["metadata"].get("finalizers") or [] if f != "foregroundDeletion"
            ]
            obj["metadata"]["finalizers"] = finalizers
            if not finalizers:
                obj["metadata"].pop("finalizers")

        plural = self._plural_of(owner)
        self.store.mutate(
            plural,
            meta.get("namespace"),
            meta["name"],
            drop_finalizer,
            subresource=None,
            uid=meta.get("uid"),
        )

    @staticmethod
    def _plural_of(obj: dict[str, Any]) -> str:
        for plural, rt in RESOURCES.items():
            if rt.kind == obj.get("kind"):
                return plural
        raise ApiError(404, "NotFound", f"unknown kind {obj.get('kind')}")

    def _empty_namespace(self, namespace: str) -> None:
        for plural, name in self.store.namespaced_objects(namespace):
            try:
                self.store.delete(plural, namespace, name)
            except ApiError as exc:
                if exc.code != 404:
                    raise
        self.store.finish_namespace(namespace)
