"""The emulated API server's object store: etcd + the generic registry, thread-safe.

Theory of operation
-------------------
One ``RLock`` guards everything. Every change (create, update, patch, status update,
deletion) takes the next value of one global counter as its ``resourceVersion`` and appends
a :class:`WatchEvent` (``ADDED`` / ``MODIFIED`` / ``DELETED``, the object as it now is, and
the object as it was) to that resource's bounded history, then wakes every waiter on a
``Condition`` and calls in-process listeners (the garbage collector and the kubelet enqueue
the event and return at once).

A watch is a position (a resourceVersion) in that history: it reads the events after its
position. The history keeps the last ``history_size`` events per resource; a position older
than what was dropped is *expired* and reading from it raises 410 ``Expired`` exactly as the
real watch cache does. :meth:`Store.expire_history` drops everything on purpose.

Deletion follows the real registry: an object with finalizers, or a scheduled and still
running pod (graceful deletion), only gets ``metadata.deletionTimestamp`` (the DELETE answers
202 with the object); it disappears when the last finalizer is removed and, for pods, when
the kubelet confirms with a zero grace period. ``Orphan`` propagation strips the owner
reference from dependents at once; ``Background`` and ``Foreground`` are carried out by
:mod:`.gc`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    ApiError,
    Cause,
    already_exists,
    bad_request,
    conflict,
    expired,
    invalid,
    not_found,
    status_success,
)
from .patches import PatchError, apply_json_patch, apply_merge_patch, apply_strategic_merge_patch
from .resources import (
    RESOURCES,
    ResourceType,
    check_body_shape,
    field_set,
    format_time,
    raise_invalid,
    validate_metadata,
)
from .selectors import (
    FieldSelector,
    LabelSelector,
    SelectorError,
    parse_field_selector,
    parse_label_selector,
)

__all__ = ["PATCH_TYPES", "Store", "WatchEvent", "Watcher"]

FIRST_RESOURCE_VERSION = 1000
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
PATCH_TYPES = {
    "application/merge-patch+json": apply_merge_patch,
    "application/strategic-merge-patch+json": apply_strategic_merge_patch,
    "application/json-patch+json": apply_json_patch,
}
_STALE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


@dataclass(frozen=True)
class WatchEvent:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    plural: str
    obj: dict[str, Any]  # snapshot; never mutated
    prev: dict[str, Any] | None = None


Listener = Callable[[WatchEvent], None]


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def _strip_type(obj: dict[str, Any]) -> dict[str, Any]:
    item = copy.deepcopy(obj)
    item.pop("kind", None)
    item.pop("apiVersion", None)
    return item


@dataclass
class _Selectors:
    labels: LabelSelector = field(default_factory=LabelSelector)
    fields: FieldSelector = field(default_factory=FieldSelector)

    def matches(self, rt: ResourceType, obj: Mapping[str, Any]) -> bool:
        if not self.labels.matches(_meta(obj).get("labels")):
            return False
        return self.fields.matches(field_set(rt, dict(obj)))


class Store:
    """Thread-safe in-memory registry of core/v1 objects with watch history."""

    def __init__(
        self,
        *,
        history_size: int = 1000,
        namespaces: tuple[str, ...] = ("default", "kube-system"),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.clock = clock
        self.closed = False
        self._rv = FIRST_RESOURCE_VERSION
        self._history_size = history_size
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {p: {} for p in RESOURCES}
        self._history: dict[str, deque[WatchEvent]] = {p: deque() for p in RESOURCES}
        self._window: dict[str, int] = dict.fromkeys(RESOURCES, self._rv)
        self._uids: dict[str, tuple[str, str, str]] = {}
        self._listeners: list[Listener] = []
        self._next_ip = 10
        self._next_node_port = 30000
        for ns in namespaces:
            self.create("namespaces", None, {"metadata": {"name": ns}})

    # --- allocation (resources.Allocator) ---------------------------------------------------

    def cluster_ip(self) -> str:
        n = self._next_ip
        self._next_ip += 1
        return f"10.96.{n // 256}.{n % 256}"

    def node_port(self) -> int:
        port = self._next_node_port
        self._next_node_port += 1
        return port

    # --- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def resource(plural: str) -> ResourceType:
        rt = RESOURCES.get(plural)
        if rt is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return rt

    @property
    def resource_version(self) -> int:
        with self.lock:
            return self._rv

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` (under the store lock: keep it short) for every change."""
        with self.lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self.lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.changed.notify_all()

    def _key(self, rt: ResourceType, namespace: str | None, name: str) -> tuple[str, str]:
        return ((namespace or "") if rt.namespaced else "", name)

    def _emit(
        self, rt: ResourceType, kind: str, obj: dict[str, Any], prev: dict[str, Any] | None
    ) -> None:
        event = WatchEvent(self._rv, kind, rt.plural, copy.deepcopy(obj), prev)
        history = self._history[rt.plural]
        if len(history) >= self._history_size:
            self._window[rt.plural] = history.popleft().rv
        history.append(event)
        self.changed.notify_all()
        for listener in list(self._listeners):
            listener(event)

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _lookup(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._objects[rt.plural].get(self._key(rt, namespace, name))
        if obj is None:
            raise not_found(rt.plural, name)
        return obj

    def _require_namespace(self, namespace: str | None, *, creating: bool) -> None:
        if not namespace:
            raise bad_request("a namespace is required for this resource")
        ns = self._objects["namespaces"].get(("", namespace))
        if ns is None:
            raise not_found("namespaces", namespace)
        if creating and _meta(ns).get("deletionTimestamp"):
            raise ApiError(
                403,
                "Forbidden",
                f"unable to create new content in namespace {namespace} because it is being terminated",
            )

    # --- reads ------------------------------------------------------------------------------

    def get(self, plural: str, namespace: str | None, name: str) -> dict[str, Any]:
        rt = self.resource(plural)
        with self.lock:
            return copy.deepcopy(self._lookup(rt, namespace, name))

    def find_uid(self, uid: str) -> dict[str, Any] | None:
        """The live object with this uid, or ``None``."""
        with self.lock:
            where = self._uids.get(uid)
            if where is None:
                return None
            plural, namespace, name = where
            obj = self._objects[plural].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def parse_selectors(
        self, plural: str, label_selector: str | None, field_selector: str | None
    ) -> _Selectors:
        rt = self.resource(plural)
        try:
            labels = parse_label_selector(label_selector)
            fields = parse_field_selector(field_selector)
        except SelectorError as exc:
            raise bad_request(str(exc)) from None
        for key in fields.keys:
            if key not in rt.fields:
                raise bad_request(f"field label not supported: {key}")
        return _Selectors(labels, fields)

    def list(
        self,
        plural: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> tuple[list[dict[str, Any]], str, str | None]:
        """Matching items (sorted by namespace/name, without kind), the list rv, next token."""
        rt = self.resource(plural)
        selectors = self.parse_selectors(plural, label_selector, field_selector)
        start = ""
        with self.lock:
            if continue_token:
                start = self._decode_continue(rt, continue_token)
            matches = []
            for key in sorted(self._objects[plural]):
                obj = self._objects[plural][key]
                if namespace and key[0] != namespace:
                    continue
                if start and "/".join(key) <= start:
                    continue
                if selectors.matches(rt, obj):
                    matches.append((key, obj))
            token = None
            if limit and limit > 0 and len(matches) > limit:
                last_key = "/".join(matches[limit - 1][0])
                raw = json.dumps({"rv": self._rv, "start": last_key}).encode()
                token = base64.urlsafe_b64encode(raw).decode()
                matches = matches[:limit]
            return [_strip_type(obj) for _, obj in matches], str(self._rv), token

    def _decode_continue(self, rt: ResourceType, token: str) -> str:
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
            rv, start = int(data["rv"]), str(data["start"])
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise bad_request("continue key is not valid: malformed token") from None
        if rv < self._window[rt.plural]:
            raise expired(
                "The provided continue parameter is too old to display a consistent list result. "
                "You can start a new list without the continue parameter."
            )
        return start

    def events_since(self, plural: str, rv: int) -> list[WatchEvent]:
        """Events of ``plural`` after ``rv``; 410 Expired when ``rv`` left the history."""
        with self.lock:
            if rv < self._window[plural]:
                raise expired(f"too old resource version: {rv} ({self._window[plural]})")
            history = self._history[plural]
            out: list[WatchEvent] = []
            for event in reversed(history):
                if event.rv <= rv:
                    break
                out.append(event)
            out.reverse()
            return out

    def watch(
        self,
        plural: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
        send_initial_events: bool | None = None,
    ) -> Watcher:
        """A watch position; see :class:`Watcher`. Raises 410 if ``resource_version`` expired."""
        rt = self.resource(plural)
        selectors = self.parse_selectors(plural, label_selector, field_selector)
        with self.lock:
            initial: list[tuple[str, dict[str, Any]]] = []
            synthetic = (
                resource_version in (None, "", "0")
                if send_initial_events is None
                else send_initial_events
            )
            if synthetic:
                for key in sorted(self._objects[plural]):
                    obj = self._objects[plural][key]
                    if (not namespace or key[0] == namespace) and selectors.matches(rt, obj):
                        initial.append(("ADDED", copy.deepcopy(obj)))
                position = self._rv
            else:
                try:
                    position = int(str(resource_version))
                except ValueError:
                    raise bad_request(f"invalid resource version {resource_version!r}") from None
                self.events_since(plural, position)
            return Watcher(
                self, rt, namespace, selectors, position, initial, bool(send_initial_events)
            )

    # --- writes -----------------------------------------------------------------------------

    def _generate_name(self, rt: ResourceType, namespace: str | None, prefix: str) -> str:
        prefix = prefix[: 63 - 5]
        for _ in range(20):
            name = prefix + "".join(random.choice(_NAME_ALPHABET) for _ in range(5))
            if self._key(rt, namespace, name) not in self._objects[rt.plural]:
                return name
        raise already_exists(rt.plural, prefix)

    def create(
        self, plural: str, namespace: str | None, body: Any, *, dry_run: bool = False
    ) -> dict[str, Any]:
        rt = self.resource(plural)
        obj = check_body_shape(rt, copy.deepcopy(body))
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            if meta.get("namespace") not in (None, "", namespace):
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        with self.lock:
            if rt.namespaced:
                self._require_namespace(namespace, creating=True)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = self._generate_name(rt, namespace, str(meta["generateName"]))
            for server_field in (
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "selfLink",
                "managedFields",
            ):
                meta.pop(server_field, None)
            obj["kind"], obj["apiVersion"] = rt.kind, "v1"
            name = str(meta.get("name") or meta.get("generateName") or "")
            with _decoding(rt):
                rt.default(obj, self)
                causes = validate_metadata(rt, meta) + rt.validate(obj)
            raise_invalid(rt, name, causes)
            key = self._key(rt, namespace, meta["name"])
            if key in self._objects[plural]:
                raise already_exists(plural, meta["name"])
            meta["uid"] = _new_uid()
            meta["creationTimestamp"] = format_time(self.clock())
            if rt.tracks_generation:
                meta["generation"] = 1
            if dry_run:
                meta["resourceVersion"] = str(self._rv)
                return copy.deepcopy(obj)
            meta["resourceVersion"] = self._next_rv()
            self._objects[plural][key] = obj
            self._uids[meta["uid"]] = (plural, key[0], key[1])
            self._emit(rt, "ADDED", obj, None)
            return copy.deepcopy(obj)

    def replace(
        self,
        plural: str,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        rt = self.resource(plural)
        new = check_body_shape(rt, copy.deepcopy(body))
        meta = new.setdefault("metadata", {})
        if meta.get("name") not in (None, "", name):
            raise bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
            )
        if rt.namespaced and meta.get("namespace") not in (None, "", namespace):
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        with self.lock:
            old = self._lookup(rt, namespace, name)
            rv = meta.get("resourceVersion")
            if rv and rv != _meta(old)["resourceVersion"]:
                raise conflict(plural, name, _STALE)
            return self._commit_update(rt, old, new, subresource, dry_run)

    def patch(
        self,
        plural: str,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str = "application/merge-patch+json",
        *,
        subresource: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        rt = self.resource(plural)
        apply = PATCH_TYPES.get(content_type)
        if apply is None:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: {', '.join(PATCH_TYPES)}",
            )
        with self.lock:
            old = self._lookup(rt, namespace, name)
            try:
                new = apply(copy.deepcopy(old), patch)
            except PatchError as exc:
                if exc.status == 400:
                    raise bad_request(str(exc)) from None
                raise invalid(rt.kind, name, [Cause("", "Invalid value", str(exc))]) from None
            if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
                raise bad_request("the patched object is not a JSON object")
            meta = new.setdefault("metadata", {})
            if meta.get("resourceVersion") != _meta(old)["resourceVersion"]:
                if meta.get("resourceVersion"):
                    raise conflict(plural, name, _STALE)
                meta["resourceVersion"] = _meta(old)["resourceVersion"]
            if meta.get("name") != name or (rt.namespaced and meta.get("namespace") != namespace):
                raise invalid(
                    rt.kind, name, [Cause("metadata.name", "Invalid value", "field is immutable")]
                )
            if meta.get("uid") != _meta(old)["uid"]:
                raise invalid(
                    rt.kind, name, [Cause("metadata.uid", "Invalid value", "field is immutable")]
                )
            return self._commit_update(rt, old, new, subresource, dry_run)

    def mutate(
        self,
        plural: str,
        namespace: str | None,
        name: str,
        change: Callable[[dict[str, Any]], None],
        *,
        subresource: str | None = "status",
        uid: str | None = None,
    ) -> dict[str, Any]:
        """Read-modify-write without conflicts (for the kubelet and for tests)."""
        rt = self.resource(plural)
        with self.lock:
            old = self._lookup(rt, namespace, name)
            if uid is not None and _meta(old).get("uid") != uid:
                raise not_found(plural, name)
            new = copy.deepcopy(old)
            change(new)
            return self._commit_update(rt, old, new, subresource, False)

    def bind(
        self, namespace: str, name: str, node_name: str, *, uid: str | None = None
    ) -> dict[str, Any]:
        """What the scheduler's ``pods/binding`` does: set ``spec.nodeName`` once."""
        rt = self.resource("pods")
        with self.lock:
            old = self._lookup(rt, namespace, name)
            if uid is not None and _meta(old).get("uid") != uid:
                raise not_found("pods", name)
            if (old.get("spec") or {}).get("nodeName"):
                raise conflict(
                    "pods/binding",
                    name,
                    f"pod {name} is already assigned to node {old['spec']['nodeName']!r}",
                )
            if _meta(old).get("deletionTimestamp"):
                raise conflict("pods/binding", name, "pod is being deleted")
            new = copy.deepcopy(old)
            new["spec"]["nodeName"] = node_name
            _set_condition(new, "PodScheduled", "True", now=format_time(self.clock()))
            return self._commit(rt, old, new)

    def _commit_update(
        self,
        rt: ResourceType,
        old: dict[str, Any],
        new: dict[str, Any],
        subresource: str | None,
        dry_run: bool,
    ) -> dict[str, Any]:
        if subresource is not None and (subresource != "status" or not rt.has_status):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = _meta(old)["name"]
        new["kind"], new["apiVersion"] = rt.kind, "v1"
        meta = new.setdefault("metadata", {})
        old_meta = _meta(old)
        if meta.get("uid") and meta["uid"] != old_meta["uid"]:
            raise conflict(
                rt.plural,
                name,
                f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: {old_meta['uid']}",
            )
        preserved = [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ]
        if subresource == "status":
            preserved += ["labels", "annotations", "finalizers", "ownerReferences"]
        for key in preserved:
            if key in old_meta:
                meta[key] = copy.deepcopy(old_meta[key])
            else:
                meta.pop(key, None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        with _decoding(rt):
            causes = rt.prepare_update(old, new, subresource)
            if not causes:
                causes = validate_metadata(rt, meta) + (
                    rt.validate(new) if subresource is None else []
                )
        if old_meta.get("deletionTimestamp"):
            added = [
                f
                for f in meta.get("finalizers") or []
                if f not in (old_meta.get("finalizers") or [])
            ]
            if added:
                causes.append(
                    Cause(
                        "metadata.finalizers",
                        "Forbidden",
                        "no new finalizers can be added if the object is being deleted",
                    )
                )
        raise_invalid(rt, name, causes)
        if rt.tracks_generation and subresource is None and new.get("spec") != old.get("spec"):
            meta["generation"] = int(old_meta.get("generation") or 1) + 1
        if new == old or dry_run:
            return copy.deepcopy(new)
        return self._commit(rt, old, new)

    def _commit(self, rt: ResourceType, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
        """Store ``new`` in place of ``old`` with a fresh resourceVersion; finish deletions."""
        meta = new["metadata"]
        meta["resourceVersion"] = self._next_rv()
        key = self._key(rt, meta.get("namespace"), meta["name"])
        self._objects[rt.plural][key] = new
        self._emit(rt, "MODIFIED", new, copy.deepcopy(old))
        if meta.get("deletionTimestamp") and not meta.get("deletionGracePeriodSeconds"):
            pending = list(meta.get("finalizers") or [])
            if rt.plural == "namespaces":
                pending += (new.get("spec") or {}).get("finalizers") or []
            if not pending:
                self._remove(rt, key)
        return copy.deepcopy(new)

    def _remove(self, rt: ResourceType, key: tuple[str, str]) -> dict[str, Any]:
        obj = self._objects[rt.plural].pop(key)
        self._uids.pop(_meta(obj).get("uid", ""), None)
        prev = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(rt, "DELETED", obj, prev)
        return obj

    # --- deletion ---------------------------------------------------------------------------

    def delete(
        self,
        plural: str,
        namespace: str | None,
        name: str,
        *,
        grace_period: int | None = None,
        propagation: str | None = None,
        preconditions: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> tuple[int, dict[str, Any]]:
        """Delete as kube-apiserver does; returns (HTTP status, object or Status)."""
        rt = self.resource(plural)
        if propagation not in (None, "Orphan", "Background", "Foreground"):
            raise bad_request(
                f"Unsupported value: {propagation!r}: supported values: Orphan, Background, Foreground"
            )
        if grace_period is not None and grace_period < 0:
            grace_period = 1
        with self.lock:
            obj = self._lookup(rt, namespace, name)
            meta = _meta(obj)
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != meta.get("uid"):
                raise conflict(
                    plural,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta.get('uid')}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta.get("resourceVersion"):
                raise conflict(
                    plural,
                    name,
                    f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                    f"ResourceVersion in object meta: {meta.get('resourceVersion')}",
                )
            if dry_run:
                return 200, (
                    copy.deepcopy(obj)
                    if rt.delete_returns_object
                    else status_success(plural, name, meta.get("uid"))
                )
            if propagation == "Orphan":
                self._orphan_dependents(meta["uid"])
                obj = self._lookup(rt, namespace, name)
                meta = _meta(obj)
            grace = self._grace_period(rt, obj, grace_period)
            finalizers = list(meta.get("finalizers") or [])
            if (
                propagation == "Foreground"
                and "foregroundDeletion" not in finalizers
                and self._has_dependents(meta["uid"])
            ):
                finalizers.append("foregroundDeletion")
            if plural == "namespaces" and "kubernetes" in (
                (obj.get("spec") or {}).get("finalizers") or []
            ):
                return 200, self._start_namespace_deletion(rt, obj)
            if grace == 0 and not finalizers:
                removed = self._remove(rt, self._key(rt, namespace, name))
                return 200, (
                    copy.deepcopy(removed)
                    if rt.delete_returns_object
                    else status_success(plural, name, meta.get("uid"))
                )
            current = meta.get("deletionGracePeriodSeconds")
            if (
                meta.get("deletionTimestamp")
                and finalizers == list(meta.get("finalizers") or [])
                and (current is not None and current <= grace)
            ):
                return 200, copy.deepcopy(obj)
            new = copy.deepcopy(obj)
            new_meta = new["metadata"]
            new_meta["finalizers"] = finalizers
            if not finalizers:
                new_meta.pop("finalizers")
            new_meta["deletionTimestamp"] = format_time(self.clock() + grace)
            new_meta["deletionGracePeriodSeconds"] = grace
            return 200, self._commit(rt, obj, new)

    def _grace_period(self, rt: ResourceType, obj: dict[str, Any], requested: int | None) -> int:
        if not rt.graceful_delete:
            return 0
        spec = obj.get("spec") or {}
        phase = (obj.get("status") or {}).get("phase")
        if not spec.get("nodeName") or phase in ("Succeeded", "Failed"):
            return 0
        if requested is not None:
            return requested
        grace = spec.get("terminationGracePeriodSeconds")
        return int(grace) if isinstance(grace, int) else 30

    def _start_namespace_deletion(self, rt: ResourceType, ns: dict[str, Any]) -> dict[str, Any]:
        if _meta(ns).get("deletionTimestamp"):
            return copy.deepcopy(ns)
        new = copy.deepcopy(ns)
        new["metadata"]["deletionTimestamp"] = format_time(self.clock())
        new["metadata"]["deletionGracePeriodSeconds"] = 0
        new.setdefault("status", {})["phase"] = "Terminating"
        return self._commit(rt, ns, new)

    def finish_namespace(self, name: str) -> bool:
        """Remove a terminating namespace once it is empty (the namespace controller's job)."""
        rt = self.resource("namespaces")
        with self.lock:
            ns = self._objects["namespaces"].get(("", name))
            if ns is None or not _meta(ns).get("deletionTimestamp"):
                return False
            if any(
                key[0] == name
                for plural, objs in self._objects.items()
                if plural != "namespaces"
                for key in objs
            ):
                return False
            new = copy.deepcopy(ns)
            new.setdefault("spec", {})["finalizers"] = []
            self._commit(rt, ns, new)
            return True

    def dependents(self, owner_uid: str) -> list[tuple[str, dict[str, Any]]]:
        """(plural, object) of every live object with an ownerReference to ``owner_uid``."""
        with self.lock:
            found = []
            for plural, objs in self._objects.items():
                for obj in objs.values():
                    if any(
                        ref.get("uid") == owner_uid
                        for ref in _meta(obj).get("ownerReferences") or []
                    ):
                        found.append((plural, copy.deepcopy(obj)))
            return found

    def _has_dependents(self, uid: str) -> bool:
        return bool(self.dependents(uid))

    def _orphan_dependents(self, owner_uid: str) -> None:
        for plural, dep in self.dependents(owner_uid):
            rt = self.resource(plural)
            old = self._lookup(rt, _meta(dep).get("namespace"), _meta(dep)["name"])
            new = copy.deepcopy(old)
            refs = [r for r in _meta(new).get("ownerReferences") or [] if r.get("uid") != owner_uid]
            if refs:
                new["metadata"]["ownerReferences"] = refs
            else:
                new["metadata"].pop("ownerReferences", None)
            self._commit(rt, old, new)

    def namespaced_objects(self, namespace: str) -> list[tuple[str, str]]:
        """(plural, name) of every object in ``namespace``."""
        with self.lock:
            return [
                (plural, key[1])
                for plural, objs in self._objects.items()
                if plural != "namespaces"
                for key in objs
                if key[0] == namespace
            ]

    def delete_collection(
        self,
        plural: str,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        grace_period: int | None = None,
        propagation: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        rt = self.resource(plural)
        with self.lock:
            items, _, _ = self.list(
                plural, namespace, label_selector=label_selector, field_selector=field_selector
            )
            for item in items:
                try:
                    self.delete(
                        plural,
                        _meta(item).get("namespace"),
                        _meta(item)["name"],
                        grace_period=grace_period,
                        propagation=propagation,
                        dry_run=dry_run,
                    )
                except ApiError as exc:
                    if exc.code != 404:
                        raise
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"kind": rt.plural},
        }

    # --- faults ----------------------------------------------------------------------------

    def expire_history(self) -> None:
        """Forget all watch history: any watch resuming from an older rv gets 410 Expired."""
        with self.lock:
            self._rv += 1  # like a compaction: every version handed out so far is now too old
            for plural in self._history:
                self._history[plural].clear()
                self._window[plural] = self._rv
            self.changed.notify_all()


class Watcher:
    """A watch on one resource: initial synthetic events, then the history from a position.

    ``next_events(timeout)`` returns ``(type, object)`` pairs translated for the selectors the
    way the real server does (an object that stops matching is sent as ``DELETED``, one that
    starts matching as ``ADDED``), or raises 410 when its position fell out of the history.
    """

    def __init__(
        self,
        store: Store,
        rt: ResourceType,
        namespace: str | None,
        selectors: _Selectors,
        position: int,
        initial: list[tuple[str, dict[str, Any]]],
        initial_end_bookmark: bool,
    ) -> None:
        self.store = store
        self.rt = rt
        self.namespace = namespace
        self.selectors = selectors
        self.position = position
        self._pending = initial
        self._initial_end_bookmark = initial_end_bookmark

    def _visible(self, obj: Mapping[str, Any] | None) -> bool:
        if obj is None:
            return False
        if self.namespace and _meta(obj).get("namespace") != self.namespace:
            return False
        return self.selectors.matches(self.rt, obj)

    def _translate(self, event: WatchEvent) -> tuple[str, dict[str, Any]] | None:
        now = self._visible(event.obj)
        if event.type == "ADDED":
            return ("ADDED", event.obj) if now else None
        if event.type == "DELETED":
            return ("DELETED", event.obj) if now or self._visible(event.prev) else None
        before = self._visible(event.prev)
        if now and before:
            return ("MODIFIED", event.obj)
        if now:
            return ("ADDED", event.obj)
        if before:
            return ("DELETED", event.obj)
        return None

    def next_events(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        store = self.store
        with store.lock:
            if self._pending:
                out, self._pending = self._pending, []
                if self._initial_end_bookmark:
                    self._initial_end_bookmark = False
                    out.append(("BOOKMARK", self.bookmark_object(initial_end=True)))
                return out
            events = store.events_since(self.rt.plural, self.position)
            if not events and not store.closed:
                store.changed.wait(timeout)
                events = store.events_since(self.rt.plural, self.position)
            out = []
            for event in events:
                self.position = event.rv
                translated = self._translate(event)
                if translated is not None:
                    out.append((translated[0], copy.deepcopy(translated[1])))
            return out

    def bookmark_object(self, *, initial_end: bool = False) -> dict[str, Any]:
        """A BOOKMARK carrying the newest rv this watch has fully seen."""
        with self.store.lock:
            if not self.store.events_since(self.rt.plural, self.position):
                self.position = max(self.position, self.store.resource_version)
            meta: dict[str, Any] = {"resourceVersion": str(self.position)}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            return {"kind": self.rt.kind, "apiVersion": "v1", "metadata": meta}


@contextlib.contextmanager
def _decoding(rt: ResourceType) -> Iterator[None]:
    """A field of the wrong JSON type (a string where an object belongs, ...) is a 400, as
    when kube-apiserver fails to decode the body into its typed structs."""
    try:
        yield
    except (AttributeError, TypeError, ValueError) as exc:
        raise bad_request(
            f"unable to decode the {rt.kind} object: wrong type of a field ({exc})"
        ) from None


def _new_uid() -> str:
    return str(uuid.uuid4())


def _set_condition(
    obj: dict[str, Any],
    kind: str,
    status: str,
    *,
    now: str,
    reason: str | None = None,
    message: str | None = None,
) -> None:
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    for cond in conditions:
        if cond.get("type") == kind:
            if cond.get("status") != status:
                cond["lastTransitionTime"] = now
            cond["status"] = status
            break
    else:
        cond = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": now}
        conditions.append(cond)
    for key, value in (("reason", reason), ("message", message)):
        if value is None:
            cond.pop(key, None)
        else:
            cond[key] = value
