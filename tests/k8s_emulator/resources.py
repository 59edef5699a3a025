"""Per-resource behaviour of the emulated core/v1 API (pure).

Each :class:`ResourceType` says how kube-apiserver treats one resource: its URL plural and
kind, whether it is namespaced, which ``fieldSelector`` keys it supports, whether it has a
``status`` subresource, whether DELETE answers with the object or a ``Status``, and its
*strategy*:

* ``default(obj, alloc)``: the defaulting and admission the real server applies on create
  (``restartPolicy: Always``, ``terminationGracePeriodSeconds: 30``, probe defaults,
  ``requests`` copied from ``limits``, ``qosClass``, a ClusterIP for Services, ...);
* ``validate(obj)``: the 422 ``Invalid`` causes for obviously broken objects;
* ``prepare_update(old, new, subresource)``: what a PUT/PATCH may change (the main resource
  keeps the old ``status``; the ``status`` subresource keeps the old spec and metadata; a pod
  spec is immutable except images, ``activeDeadlineSeconds`` and added tolerations; a
  Service keeps its ClusterIP and node ports).

Not emulated: managedFields, the service-account token volume that admission adds to pods,
resource quotas and limit ranges.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import Cause, bad_request, invalid
from .selectors import label_key_problem, label_value_problem

__all__ = [
    "RESOURCES",
    "Allocator",
    "ResourceType",
    "field_set",
    "format_time",
    "qos_class",
    "resource_for",
]

DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
CONFIG_KEY_RE = re.compile(r"^[-._a-zA-Z0-9]+$")
ENV_NAME_RE = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
MAX_ANNOTATIONS_BYTES = 256 * 1024


def format_time(when: float) -> str:
    """RFC 3339 with second precision, as in ``metadata.creationTimestamp``."""
    stamp = dt.datetime.fromtimestamp(int(when), tz=dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


class Allocator(Protocol):
    def cluster_ip(self) -> str: ...
    def node_port(self) -> int: ...


@dataclass(frozen=True)
class ResourceType:
    plural: str
    kind: str
    namespaced: bool = True
    fields: Mapping[str, Callable[[dict[str, Any]], str]] = field(default_factory=dict)
    has_status: bool = False
    delete_returns_object: bool = False
    graceful_delete: bool = False
    tracks_generation: bool = False
    name_check: str = "subdomain"  # subdomain | label | dns1035
    default: Callable[[dict[str, Any], Allocator], None] = lambda obj, alloc: None
    validate: Callable[[dict[str, Any]], list[Cause]] = lambda obj: []
    prepare_update: Callable[[dict[str, Any], dict[str, Any], str | None], list[Cause]] = (
        lambda old, new, sub: []
    )

    @property
    def list_kind(self) -> str:
        return self.kind + "List"


def _get(obj: Mapping[str, Any], path: str) -> Any:
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _getter(path: str) -> Callable[[dict[str, Any]], str]:
    return lambda obj: _text(_get(obj, path))


def _meta_fields(*extra: str) -> dict[str, Callable[[dict[str, Any]], str]]:
    names = ("metadata.name", "metadata.namespace", *extra)
    return {name: _getter(name) for name in names}


def field_set(rt: ResourceType, obj: dict[str, Any]) -> dict[str, str]:
    """The fields a ``fieldSelector`` on ``rt`` can test, read from ``obj``."""
    return {key: get(obj) for key, get in rt.fields.items()}


# --- pods -----------------------------------------------------------------------------------

_PROBE_DEFAULTS = {
    "timeoutSeconds": 1,
    "periodSeconds": 10,
    "successThreshold": 1,
    "failureThreshold": 3,
}


def _default_probe(probe: dict[str, Any] | None) -> None:
    if not isinstance(probe, dict):
        return
    for key, value in _PROBE_DEFAULTS.items():
        probe.setdefault(key, value)
    if isinstance(probe.get("httpGet"), dict):
        probe["httpGet"].setdefault("scheme", "HTTP")
        probe["httpGet"].setdefault("path", "/")


def _default_container(c: dict[str, Any]) -> None:
    c.setdefault("terminationMessagePath", "/dev/termination-log")
    c.setdefault("terminationMessagePolicy", "File")
    image = str(c.get("image") or "")
    last = image.rsplit("/", 1)[-1]
    tagged = ":" in last and not last.endswith(":latest")
    if "@" in image:
        tagged = True
    c.setdefault("imagePullPolicy", "IfNotPresent" if tagged else "Always")
    resources = c.setdefault("resources", {})
    if isinstance(resources, dict) and isinstance(resources.get("limits"), dict):
        requests = resources.setdefault("requests", {})
        for name, qty in resources["limits"].items():
            requests.setdefault(name, qty)
    for port in c.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")
    for env in c.get("env") or []:
        ref = (env.get("valueFrom") or {}).get("fieldRef") if isinstance(env, dict) else None
        if isinstance(ref, dict):
            ref.setdefault("apiVersion", "v1")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        _default_probe(c.get(probe))


def qos_class(spec: Mapping[str, Any]) -> str:
    """Guaranteed / Burstable / BestEffort from the (defaulted) container resources."""
    containers = list(spec.get("containers") or []) + list(spec.get("initContainers") or [])
    any_set = False
    guaranteed = bool(containers)
    for c in containers:
        res = c.get("resources") or {}
        limits = {k: v for k, v in (res.get("limits") or {}).items() if k in ("cpu", "memory")}
        requests = {k: v for k, v in (res.get("requests") or {}).items() if k in ("cpu", "memory")}
        if limits or requests:
            any_set = True
        if set(limits) != {"cpu", "memory"} or any(requests.get(k) != v for k, v in limits.items()):
            guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


_DEFAULT_TOLERATIONS = [
    {
        "key": "node.kubernetes.io/not-ready",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    },
    {
        "key": "node.kubernetes.io/unreachable",
        "operator": "Exists",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    },
]


def _default_pod_spec(spec: dict[str, Any]) -> None:
    """Scheme defaults: applied on create and again to the body of every update."""
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    for group in ("initContainers", "containers"):
        for c in spec.get(group) or []:
            if isinstance(c, dict):
                _default_container(c)
    for vol in spec.get("volumes") or []:
        if not isinstance(vol, dict):
            continue
        for source in ("secret", "configMap"):
            if isinstance(vol.get(source), dict):
                vol[source].setdefault("defaultMode", 0o644)


#: spec fields set by admission plugins on create (kept from the old object on update).
_POD_ADMISSION_KEYS = (
    "serviceAccountName",
    "serviceAccount",
    "tolerations",
    "priority",
    "preemptionPolicy",
    "nodeName",
)


def _default_pod(pod: dict[str, Any], alloc: Allocator) -> None:
    spec = pod.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    _default_pod_spec(spec)
    spec.setdefault("priority", 0)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    spec["serviceAccountName"] = spec["serviceAccount"] = account
    tolerations = spec.setdefault("tolerations", [])
    for tol in _DEFAULT_TOLERATIONS:
        if not any(isinstance(t, dict) and t.get("key") == tol["key"] for t in tolerations):
            tolerations.append(dict(tol))
    pod["status"] = {"phase": "Pending", "qosClass": qos_class(spec)}


def _validate_containers(spec: Mapping[str, Any], volume_names: set[str]) -> list[Cause]:
    causes: list[Cause] = []
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return [Cause("spec.containers", "Required value")]
    for group in ("initContainers", "containers"):
        seen: set[str] = set()
        for i, c in enumerate(spec.get(group) or []):
            where = f"spec.{group}[{i}]"
            if not isinstance(c, dict):
                causes.append(Cause(where, "Invalid value", "must be an object"))
                continue
            name = c.get("name")
            if not name:
                causes.append(Cause(f"{where}.name", "Required value"))
            elif not isinstance(name, str) or not DNS_LABEL_RE.match(name) or len(name) > 63:
                causes.append(
                    Cause(f"{where}.name", "Invalid value", f'"{name}": a lowercase RFC 1123 label')
                )
            elif name in seen:
                causes.append(Cause(f"{where}.name", "Duplicate value", f'"{name}"'))
            else:
                seen.add(name)
            if not c.get("image"):
                causes.append(Cause(f"{where}.image", "Required value"))
            for j, env in enumerate(c.get("env") or []):
                env_name = env.get("name") if isinstance(env, dict) else None
                if not isinstance(env_name, str) or not ENV_NAME_RE.match(env_name):
                    causes.append(Cause(f"{where}.env[{j}].name", "Invalid value", f'"{env_name}"'))
            for j, port in enumerate(c.get("ports") or []):
                number = port.get("containerPort") if isinstance(port, dict) else None
                if not isinstance(number, int) or not 0 < number < 65536:
                    causes.append(
                        Cause(
                            f"{where}.ports[{j}].containerPort",
                            "Invalid value",
                            f"{number}: must be between 1 and 65535",
                        )
                    )
            for j, mount in enumerate(c.get("volumeMounts") or []):
                vname = mount.get("name") if isinstance(mount, dict) else None
                if vname not in volume_names:
                    causes.append(
                        Cause(f"{where}.volumeMounts[{j}].name", "Not found", f'"{vname}"')
                    )
                elif not str(mount.get("mountPath") or "").startswith("/"):
                    causes.append(
                        Cause(
                            f"{where}.volumeMounts[{j}].mountPath",
                            "Invalid value",
                            "must be an absolute path",
                        )
                    )
    return causes


def _validate_pod(pod: dict[str, Any]) -> list[Cause]:
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return [Cause("spec", "Required value")]
    causes: list[Cause] = []
    volume_names: set[str] = set()
    for i, vol in enumerate(spec.get("volumes") or []):
        name = vol.get("name") if isinstance(vol, dict) else None
        if not isinstance(name, str) or not DNS_LABEL_RE.match(name):
            causes.append(Cause(f"spec.volumes[{i}].name", "Invalid value", f'"{name}"'))
        elif name in volume_names:
            causes.append(Cause(f"spec.volumes[{i}].name", "Duplicate value", f'"{name}"'))
        volume_names.add(str(name))
    causes.extend(_validate_containers(spec, volume_names))
    policy = spec.get("restartPolicy")
    if policy not in ("Always", "OnFailure", "Never"):
        causes.append(Cause("spec.restartPolicy", "Unsupported value", f'"{policy}"'))
    grace = spec.get("terminationGracePeriodSeconds")
    if not isinstance(grace, int) or grace < 0:
        causes.append(Cause("spec.terminationGracePeriodSeconds", "Invalid value", f"{grace}"))
    return causes


_POD_MUTABLE_MSG = (
    "pod updates may not change fields other than `spec.containers[*].image`, "
    "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, "
    "`spec.tolerations` (only additions to existing tolerations), "
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"
)


def _pod_spec_comparable(spec: Mapping[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(dict(spec))
    spec.pop("activeDeadlineSeconds", None)
    spec.pop("tolerations", None)
    for group in ("containers", "initContainers"):
        for c in spec.get(group) or []:
            if isinstance(c, dict):
                c.pop("image", None)
    return spec


def _prepare_pod_update(old: dict[str, Any], new: dict[str, Any], sub: str | None) -> list[Cause]:
    if sub == "status":
        new["spec"] = copy.deepcopy(old.get("spec"))
        return []
    new["status"] = copy.deepcopy(old.get("status"))
    new_spec = new.get("spec")
    if not isinstance(new_spec, dict):
        return [Cause("spec", "Required value")]
    _default_pod_spec(new_spec)
    old_spec = old.get("spec") or {}
    for key in _POD_ADMISSION_KEYS:
        if key in old_spec:
            new_spec.setdefault(key, old_spec[key])
    if _pod_spec_comparable(old.get("spec") or {}) != _pod_spec_comparable(new_spec):
        return [Cause("spec", "Forbidden", _POD_MUTABLE_MSG)]
    old_tols = [
        json.dumps(t, sort_keys=True) for t in (old.get("spec") or {}).get("tolerations") or []
    ]
    new_tols = [json.dumps(t, sort_keys=True) for t in new_spec.get("tolerations") or []]
    if any(t not in new_tols for t in old_tols):
        return [
            Cause(
                "spec.tolerations",
                "Forbidden",
                "existing toleration can not be modified except its tolerationSeconds",
            )
        ]
    return []


# --- services -------------------------------------------------------------------------------

_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")


def _default_service(svc: dict[str, Any], alloc: Allocator) -> None:
    spec = svc.setdefault("spec", {})
    kind = spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    if kind != "ExternalName":
        if spec.get("clusterIP") in (None, ""):
            spec["clusterIP"] = alloc.cluster_ip()
        spec.setdefault("clusterIPs", [spec["clusterIP"]])
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    for port in spec.get("ports") or []:
        if not isinstance(port, dict):
            continue
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port.get("port"))
        if kind in ("NodePort", "LoadBalancer") and not port.get("nodePort"):
            port["nodePort"] = alloc.node_port()
    if kind in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if kind == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)
    svc["status"] = {"loadBalancer": {}}


def _validate_service(svc: dict[str, Any]) -> list[Cause]:
    spec = svc.get("spec")
    if not isinstance(spec, dict):
        return [Cause("spec", "Required value")]
    causes: list[Cause] = []
    kind = spec.get("type", "ClusterIP")
    if kind not in _SERVICE_TYPES:
        causes.append(Cause("spec.type", "Unsupported value", f'"{kind}"'))
    ports = spec.get("ports")
    if kind != "ExternalName" and spec.get("clusterIP") != "None" and not ports:
        causes.append(Cause("spec.ports", "Required value"))
    for i, port in enumerate(ports or []):
        number = port.get("port") if isinstance(port, dict) else None
        if not isinstance(number, int) or not 0 < number < 65536:
            causes.append(
                Cause(
                    f"spec.ports[{i}].port",
                    "Invalid value",
                    f"{number}: must be between 1 and 65535",
                )
            )
    if len(ports or []) > 1 and any(not (isinstance(p, dict) and p.get("name")) for p in ports):
        causes.append(Cause("spec.ports[0].name", "Required value"))
    return causes


def _prepare_service_update(
    old: dict[str, Any], new: dict[str, Any], sub: str | None
) -> list[Cause]:
    if sub == "status":
        new["spec"] = copy.deepcopy(old.get("spec"))
        return []
    new["status"] = copy.deepcopy(old.get("status"))
    old_spec = old.get("spec") or {}
    new_spec = new.get("spec")
    if not isinstance(new_spec, dict):
        return [Cause("spec", "Required value")]
    if new_spec.get("clusterIP") in (None, "") and "clusterIP" in old_spec:
        new_spec["clusterIP"] = old_spec["clusterIP"]
        new_spec.setdefault("clusterIPs", old_spec.get("clusterIPs"))
    if old_spec.get("clusterIP") and new_spec.get("clusterIP") != old_spec.get("clusterIP"):
        return [
            Cause(
                "spec.clusterIP",
                "Invalid value",
                f'"{new_spec.get("clusterIP")}": field is immutable',
            )
        ]
    old_ports = {(p.get("port"), p.get("protocol", "TCP")): p for p in old_spec.get("ports") or []}
    for port in new_spec.get("ports") or []:
        if isinstance(port, dict) and not port.get("nodePort"):
            previous = old_ports.get((port.get("port"), port.get("protocol", "TCP")))
            if previous and previous.get("nodePort"):
                port["nodePort"] = previous["nodePort"]
    return []


# --- secrets and config maps ----------------------------------------------------------------


def _default_secret(secret: dict[str, Any], alloc: Allocator) -> None:
    secret.setdefault("type", "Opaque")
    _fold_string_data(secret)


def _fold_string_data(secret: dict[str, Any]) -> None:
    string_data = secret.pop("stringData", None)
    if isinstance(string_data, dict):
        data = secret.get("data") if isinstance(secret.get("data"), dict) else {}
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        secret["data"] = data


def _validate_data_keys(obj: dict[str, Any], sections: tuple[str, ...]) -> list[Cause]:
    causes: list[Cause] = []
    for section in sections:
        data = obj.get(section)
        if data is None:
            continue
        if not isinstance(data, dict):
            causes.append(Cause(section, "Invalid value", "must be an object"))
            continue
        for key in data:
            if not CONFIG_KEY_RE.match(key) or key in (".", ".."):
                causes.append(
                    Cause(f"{section}[{key}]", "Invalid value", f'"{key}": a valid config key')
                )
    return causes


def _validate_secret(secret: dict[str, Any]) -> list[Cause]:
    causes = _validate_data_keys(secret, ("data",))
    for key, value in (
        (secret.get("data") or {}).items() if isinstance(secret.get("data"), dict) else []
    ):
        try:
            base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            causes.append(Cause(f"data[{key}]", "Invalid value", "illegal base64 data"))
    return causes


def _prepare_secret_update(
    old: dict[str, Any], new: dict[str, Any], sub: str | None
) -> list[Cause]:
    _fold_string_data(new)
    new.setdefault("type", old.get("type", "Opaque"))
    if new.get("type") != old.get("type"):
        return [Cause("type", "Invalid value", f'"{new.get("type")}": field is immutable')]
    if old.get("immutable") and (new.get("data") != old.get("data") or not new.get("immutable")):
        return [Cause("data", "Forbidden", "field is immutable when `immutable` is set")]
    return []


def _prepare_configmap_update(
    old: dict[str, Any], new: dict[str, Any], sub: str | None
) -> list[Cause]:
    if old.get("immutable") and (
        new.get("data") != old.get("data")
        or new.get("binaryData") != old.get("binaryData")
        or not new.get("immutable")
    ):
        return [Cause("data", "Forbidden", "field is immutable when `immutable` is set")]
    return []


# --- namespaces -----------------------------------------------------------------------------


def _default_namespace(ns: dict[str, Any], alloc: Allocator) -> None:
    ns.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    ns["status"] = {"phase": "Active"}
    name = ns.get("metadata", {}).get("name")
    if name:
        ns["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name


def _prepare_namespace_update(
    old: dict[str, Any], new: dict[str, Any], sub: str | None
) -> list[Cause]:
    new["status"] = copy.deepcopy(old.get("status"))
    return []


RESOURCES: dict[str, ResourceType] = {
    rt.plural: rt
    for rt in (
        ResourceType(
            "pods",
            "Pod",
            fields=_meta_fields(
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ),
            has_status=True,
            delete_returns_object=True,
            graceful_delete=True,
            tracks_generation=True,
            default=_default_pod,
            validate=_validate_pod,
            prepare_update=_prepare_pod_update,
        ),
        ResourceType(
            "services",
            "Service",
            fields=_meta_fields("spec.clusterIP", "spec.type"),
            has_status=True,
            delete_returns_object=True,
            tracks_generation=True,
            name_check="dns1035",
            default=_default_service,
            validate=_validate_service,
            prepare_update=_prepare_service_update,
        ),
        ResourceType(
            "secrets",
            "Secret",
            fields=_meta_fields("type"),
            default=_default_secret,
            validate=_validate_secret,
            prepare_update=_prepare_secret_update,
        ),
        ResourceType(
            "configmaps",
            "ConfigMap",
            fields=_meta_fields(),
            validate=lambda obj: _validate_data_keys(obj, ("data", "binaryData")),
            prepare_update=_prepare_configmap_update,
        ),
        ResourceType(
            "namespaces",
            "Namespace",
            namespaced=False,
            fields={
                "metadata.name": _getter("metadata.name"),
                "status.phase": _getter("status.phase"),
            },
            has_status=True,
            name_check="label",
            default=_default_namespace,
            prepare_update=_prepare_namespace_update,
        ),
    )
}


def resource_for(plural: str) -> ResourceType | None:
    return RESOURCES.get(plural)


# --- metadata validation shared by every kind -----------------------------------------------


def name_problem(rt: ResourceType, name: str) -> str | None:
    if rt.name_check == "dns1035":
        ok = len(name) <= 63 and DNS_1035_RE.match(name)
        what = "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character"
    elif rt.name_check == "label":
        ok = len(name) <= 63 and DNS_LABEL_RE.match(name)
        what = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
    else:
        ok = len(name) <= 253 and DNS_SUBDOMAIN_RE.match(name)
        what = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
    return None if ok else f'"{name}": {what}'


def validate_metadata(rt: ResourceType, meta: Mapping[str, Any]) -> list[Cause]:
    causes: list[Cause] = []
    name = meta.get("name")
    if not name:
        causes.append(Cause("metadata.name", "Required value", "name or generateName is required"))
    else:
        problem = name_problem(rt, str(name))
        if problem:
            causes.append(Cause("metadata.name", "Invalid value", problem))
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        causes.append(Cause("metadata.labels", "Invalid value", "must be an object"))
        labels = {}
    for key, value in labels.items():
        problem = label_key_problem(str(key))
        if problem is None:
            problem = label_value_problem(value) if isinstance(value, str) else "must be a string"
        if problem:
            causes.append(Cause("metadata.labels", "Invalid value", problem))
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        causes.append(Cause("metadata.annotations", "Invalid value", "must be an object"))
        annotations = {}
    for key, value in annotations.items():
        problem = label_key_problem(str(key))
        if problem:
            causes.append(Cause("metadata.annotations", "Invalid value", problem))
        if not isinstance(value, str):
            causes.append(
                Cause(f"metadata.annotations[{key}]", "Invalid value", "must be a string")
            )
    if sum(len(str(k)) + len(str(v)) for k, v in annotations.items()) > MAX_ANNOTATIONS_BYTES:
        causes.append(Cause("metadata.annotations", "Too long", "must have at most 262144 bytes"))
    for key in ("ownerReferences", "finalizers"):
        if not isinstance(meta.get(key) or [], list):
            causes.append(Cause(f"metadata.{key}", "Invalid value", "must be a list"))
            return causes
    for i, ref in enumerate(meta.get("ownerReferences") or []):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not (isinstance(ref, dict) and ref.get(key)):
                causes.append(Cause(f"metadata.ownerReferences[{i}].{key}", "Required value"))
    controllers = [
        r for r in meta.get("ownerReferences") or [] if isinstance(r, dict) and r.get("controller")
    ]
    if len(controllers) > 1:
        causes.append(
            Cause(
                "metadata.ownerReferences",
                "Invalid value",
                "Only one reference can have Controller set to true",
            )
        )
    for i, fin in enumerate(meta.get("finalizers") or []):
        if not isinstance(fin, str) or label_key_problem(fin):
            causes.append(Cause(f"metadata.finalizers[{i}]", "Invalid value", f'"{fin}"'))
    return causes


def check_body_shape(rt: ResourceType, body: Any) -> dict[str, Any]:
    """A request body must be a JSON object of the right kind; returns it (400 otherwise)."""
    if not isinstance(body, dict):
        raise bad_request(f"the body of the request was not a valid {rt.kind} object")
    kind = body.get("kind")
    if kind not in (None, "", rt.kind):
        raise bad_request(f"the object provided is unrecognized ({kind})")
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise bad_request("metadata must be an object")
    return body


def raise_invalid(rt: ResourceType, name: str, causes: list[Cause]) -> None:
    if causes:
        raise invalid(rt.kind, name, causes)
