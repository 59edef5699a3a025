"""The Kubernetes objects of one Dask cluster, built as plain dicts (pure: no client, no I/O).

Theory of operation
-------------------
Each cluster is three kinds of objects in the backend's namespace, all labelled
``app.kubernetes.io/name=dask-gateway``, ``gateway.dask.org/instance=<gateway instance>``,
``gateway.dask.org/cluster=<cluster id>``, ``gateway.dask.org/component=...`` and
``gateway.dask.org/user=<sanitised user name>``:

* the Secret ``dask-gateway-<id>`` (component ``credentials``): data keys ``dask.crt``,
  ``dask.pem`` and ``api-token``, mounted read-only at ``/etc/dask-credentials/`` in every
  pod (spec §5.1). Its annotation ``gateway.dask.org/cluster-record`` holds the cluster's
  record (see :mod:`dask_gateway_api.kube_store`): the Secret *is* the cluster object, as an
  instance of a custom resource would be, and it outlives the pods until the record expires;
* the scheduler Pod ``dask-scheduler-<id>``, owned by the Secret;
* one Pod per worker, ``dask-worker-<id>-<worker name>``, owned by the scheduler Pod.

Ownership chain Secret → scheduler Pod → worker Pods: the Secret exists before any pod
mounts it (no patch of owner references after the fact), deleting the scheduler Pod
garbage-collects the workers (they are useless without it) while the record survives and
says FAILED, and deleting the Secret removes everything.

Pods run the official preload with the fixed ports of spec §5.1 (8786 scheduler, 8787
dashboard, 8788 preload API), bound to the pod's own IP (``$(POD_IP)``, from the downward
API), with a readiness probe on ``GET :8788/api/health``. ``restartPolicy: Never``: a dead
pod is replaced by a new worker (the manager decides), never restarted in place under the
same name.

Per-cluster Kubernetes settings (image, pull policy and secrets, service account, node
selector, tolerations, resource limits, extra pod/container config, labels, annotations)
come from the cluster config's ``extra`` mapping, so cluster options can override them; see
:data:`KUBE_CLUSTER_DEFAULTS` and :func:`kube_cluster_spec`.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..resources import ClusterConfig, parse_memory
from .base import ClusterLaunch

__all__ = [
    "ANNOTATION_CLUSTER_NAME",
    "ANNOTATION_CLUSTER_RECORD",
    "ANNOTATION_WORKER_NAME",
    "ANNOTATION_WORKER_RECORD",
    "APP_NAME",
    "COMPONENT_CREDENTIALS",
    "COMPONENT_SCHEDULER",
    "COMPONENT_WORKER",
    "CREDENTIALS_MOUNT",
    "ClusterIdentity",
    "KUBE_CLUSTER_DEFAULTS",
    "KubeClusterSpec",
    "KubeSpecError",
    "LABEL_CLUSTER",
    "LABEL_COMPONENT",
    "LABEL_INSTANCE",
    "LABEL_NAME",
    "LABEL_USER",
    "LABEL_WORKER",
    "check_kube_cluster_values",
    "cluster_id",
    "deep_merge",
    "format_cpu",
    "instance_selector",
    "is_dns_label",
    "kube_cluster_spec",
    "label_value",
    "make_scheduler_pod",
    "make_secret",
    "make_worker_pod",
    "owner_reference",
    "scheduler_args",
    "worker_args",
]

APP_NAME = "dask-gateway"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "gateway.dask.org/instance"
LABEL_CLUSTER = "gateway.dask.org/cluster"
LABEL_COMPONENT = "gateway.dask.org/component"
LABEL_USER = "gateway.dask.org/user"
LABEL_WORKER = "gateway.dask.org/worker"
ANNOTATION_CLUSTER_NAME = "gateway.dask.org/cluster-name"
ANNOTATION_CLUSTER_RECORD = "gateway.dask.org/cluster-record"
ANNOTATION_WORKER_RECORD = "gateway.dask.org/worker-record"
ANNOTATION_WORKER_NAME = "gateway.dask.org/worker-name"

COMPONENT_CREDENTIALS = "credentials"
COMPONENT_SCHEDULER = "scheduler"
COMPONENT_WORKER = "worker"

CREDENTIALS_VOLUME = "dask-credentials"
CREDENTIALS_MOUNT = "/etc/dask-credentials"
CERT_PATH = f"{CREDENTIALS_MOUNT}/dask.crt"
KEY_PATH = f"{CREDENTIALS_MOUNT}/dask.pem"
TOKEN_PATH = f"{CREDENTIALS_MOUNT}/api-token"

SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
PRELOAD_API_PORT = 8788

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")


class KubeSpecError(ValueError):
    """Per-cluster Kubernetes settings are invalid; ``problems`` lists every one."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


# --- names and labels -------------------------------------------------------------------


def is_dns_label(text: str) -> bool:
    """Whether ``text`` is an RFC 1123 label (namespace names, name parts)."""
    return len(text) <= 63 and bool(_DNS_LABEL.match(text))


def cluster_id(name: str) -> str:
    """The DNS-safe id of a cluster, used in object names and the cluster label.

    Manager names are uuid4 hex (used as they are); a spec §5.1 style name
    ``<namespace>.<hex>`` gives its last part. Anything else gets a stable hash.
    """
    tail = name.rsplit(".", 1)[-1]
    if len(tail) <= 40 and _DNS_LABEL.match(tail):
        return tail
    return "h" + hashlib.sha256(name.encode()).hexdigest()[:32]


def label_value(text: str) -> str:
    """``text`` as a valid label value (≤ 63 characters of ``[A-Za-z0-9_.-]``, alphanumeric
    at both ends), for selectors and people; the exact value lives in annotations."""
    if len(text) <= 63 and _LABEL_VALUE.match(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63]
    cleaned = re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned)
    return cleaned or "x"


def instance_selector(instance: str) -> str:
    """The label selector of every object of one gateway instance."""
    return f"{LABEL_NAME}={APP_NAME},{LABEL_INSTANCE}={label_value(instance)}"


@dataclass(frozen=True)
class ClusterIdentity:
    """Where a cluster's objects live and how they are named and labelled."""

    namespace: str
    instance: str
    name: str
    username: str

    @property
    def id(self) -> str:
        return cluster_id(self.name)

    @property
    def secret_name(self) -> str:
        return f"dask-gateway-{self.id}"

    @property
    def scheduler_pod_name(self) -> str:
        return f"dask-scheduler-{self.id}"

    def worker_pod_name(self, worker_name: str) -> str:
        part = worker_name if is_dns_label(worker_name) else cluster_id(worker_name)
        return f"dask-worker-{self.id}-{part}"

    def labels(self, component: str) -> dict[str, str]:
        return {
            LABEL_NAME: APP_NAME,
            LABEL_INSTANCE: label_value(self.instance),
            LABEL_CLUSTER: self.id,
            LABEL_COMPONENT: component,
            LABEL_USER: label_value(self.username),
        }


# --- per-cluster Kubernetes settings (ClusterConfig.extra) ------------------------------

#: The per-cluster keys this backend reads from ``ClusterConfig.extra``, with defaults.
#: With ``backend.type: kubernetes`` they are all declared in the defaults' ``extra``, so
#: cluster options (or the options handler) may override any of them per cluster.
KUBE_CLUSTER_DEFAULTS: dict[str, Any] = {
    "image": "ghcr.io/dask-gateway-trio/cluster:0.1.0",
    "image_pull_policy": None,
    "image_pull_secrets": [],
    "service_account": None,
    "node_selector": {},
    "tolerations": [],
    "scheduler_cores_limit": None,
    "scheduler_memory_limit": None,
    "worker_cores_limit": None,
    "worker_memory_limit": None,
    "scheduler_extra_pod_config": {},
    "scheduler_extra_container_config": {},
    "scheduler_extra_pod_labels": {},
    "scheduler_extra_pod_annotations": {},
    "worker_extra_pod_config": {},
    "worker_extra_container_config": {},
    "worker_extra_pod_labels": {},
    "worker_extra_pod_annotations": {},
}


@dataclass(frozen=True)
class KubeClusterSpec:
    """Validated per-cluster Kubernetes settings (see :data:`KUBE_CLUSTER_DEFAULTS`)."""

    image: str
    image_pull_policy: str | None
    image_pull_secrets: tuple[str, ...]
    service_account: str | None
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    scheduler_cores_limit: float | None
    scheduler_memory_limit: int | None
    worker_cores_limit: float | None
    worker_memory_limit: int | None
    scheduler_extra_pod_config: Mapping[str, Any]
    scheduler_extra_container_config: Mapping[str, Any]
    scheduler_extra_pod_labels: Mapping[str, str]
    scheduler_extra_pod_annotations: Mapping[str, str]
    worker_extra_pod_config: Mapping[str, Any]
    worker_extra_container_config: Mapping[str, Any]
    worker_extra_pod_labels: Mapping[str, str]
    worker_extra_pod_annotations: Mapping[str, str]


def _str_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _cores(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _parse(values: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """Check the keys of :data:`KUBE_CLUSTER_DEFAULTS` present in ``values``."""
    out: dict[str, Any] = {}
    problems: list[str] = []

    def bad(key: str, what: str) -> None:
        problems.append(f"{where}{key}: must be {what}, got {values[key]!r}")

    for key in KUBE_CLUSTER_DEFAULTS:
        if key not in values:
            continue
        value = values[key]
        if key == "image":
            if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value):
                bad(key, "a non-empty image reference without spaces")
                continue
            out[key] = value
        elif key == "image_pull_policy":
            if value is not None and value not in _PULL_POLICIES:
                bad(key, f"null or one of {', '.join(_PULL_POLICIES)}")
                continue
            out[key] = value
        elif key == "image_pull_secrets":
            names = _secret_names(value)
            if names is None:
                bad(key, "a list of Secret names (or of {name: ...} objects)")
                continue
            out[key] = names
        elif key == "service_account":
            if value is not None and (not isinstance(value, str) or not value):
                bad(key, "null or a service account name")
                continue
            out[key] = value or None
        elif key == "node_selector" or key.endswith(("_pod_labels", "_pod_annotations")):
            if not _str_map(value):
                bad(key, "a mapping of strings to strings")
                continue
            out[key] = dict(value)
        elif key == "tolerations":
            if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
                bad(key, "a list of toleration objects")
                continue
            out[key] = tuple(dict(t) for t in value)
        elif key.endswith("_cores_limit"):
            if value is not None and _cores(value) is None:
                bad(key, "null or a number of cores > 0")
                continue
            out[key] = None if value is None else _cores(value)
        elif key.endswith("_memory_limit"):
            if value is None:
                out[key] = None
                continue
            try:
                parsed = parse_memory(value)
            except ValueError as exc:
                problems.append(f"{where}{key}: {exc}")
                continue
            if parsed <= 0:
                bad(key, "null or a memory size > 0")
                continue
            out[key] = parsed
        else:  # extra pod / container config
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                bad(key, "a mapping")
                continue
            out[key] = copy.deepcopy(dict(value))
    return out, problems


def _secret_names(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list):
        return None
    names = []
    for item in value:
        if isinstance(item, Mapping):
            item = item.get("name")
        if not isinstance(item, str) or not item:
            return None
        names.append(item)
    return tuple(names)


def check_kube_cluster_values(values: Mapping[str, Any], where: str = "") -> list[str]:
    """Problems with the per-cluster Kubernetes keys present in ``values`` (``where`` is
    prefixed to each key in the messages, e.g. ``"backend.kubernetes."``)."""
    return _parse(values, where)[1]


def kube_cluster_spec(extra: Mapping[str, Any]) -> KubeClusterSpec:
    """The Kubernetes settings of one cluster: :data:`KUBE_CLUSTER_DEFAULTS` overlaid with
    the matching keys of its config's ``extra``. Raises :class:`KubeSpecError`."""
    parsed, problems = _parse({**KUBE_CLUSTER_DEFAULTS, **extra}, "")
    if problems:
        raise KubeSpecError(problems)
    return KubeClusterSpec(**parsed)


# --- helpers ----------------------------------------------------------------------------


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` merged into a copy of ``base``: mappings merge recursively, lists are
    appended (``extra``'s items after ``base``'s), anything else is replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = deep_merge(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            out[key] = old + copy.deepcopy(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def format_cpu(cores: float) -> str:
    """A CPU quantity: whole cores as ``"2"``, fractions in millicores (``"1500m"``)."""
    millis = math.ceil(cores * 1000 - 1e-9)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def owner_reference(obj: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """An owner reference to ``obj``, a core/v1 ``kind`` object as the API server returned
    it (with its uid)."""
    meta = obj.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": kind,
        "name": meta.get("name", ""),
        "uid": meta.get("uid", ""),
        "controller": True,
    }


# --- builders ---------------------------------------------------------------------------


def make_secret(
    ident: ClusterIdentity,
    *,
    tls_cert: bytes,
    tls_key: bytes,
    token: str,
    record: str | None = None,
) -> dict[str, Any]:
    """The cluster's credentials Secret; ``record`` is the cluster record annotation."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    annotations = {ANNOTATION_CLUSTER_NAME: ident.name}
    if record is not None:
        annotations[ANNOTATION_CLUSTER_RECORD] = record
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": ident.secret_name,
            "labels": ident.labels(COMPONENT_CREDENTIALS),
            "annotations": annotations,
        },
        "type": "Opaque",
        "data": {
            "dask.crt": b64(tls_cert),
            "dask.pem": b64(tls_key),
            "api-token": b64(token.encode()),
        },
    }


def scheduler_args(launch: ClusterLaunch) -> list[str]:
    """The flags after ``scheduler_cmd`` (spec §5.1, Kubernetes ports, pod IP)."""
    return [
        "--protocol",
        "tls",
        "--port",
        str(SCHEDULER_PORT),
        "--host",
        "$(POD_IP)",
        "--dashboard-address",
        f"$(POD_IP):{DASHBOARD_PORT}",
        "--preload",
        "dask_gateway.scheduler_preload",
        "--dg-api-address",
        f"$(POD_IP):{PRELOAD_API_PORT}",
        "--dg-heartbeat-period",
        _number(launch.heartbeat_period),
        "--dg-adaptive-period",
        _number(launch.adaptive_period),
        "--dg-idle-timeout",
        _number(launch.idle_timeout),
    ]


def worker_args(launch: ClusterLaunch, scheduler_address: str, worker_name: str) -> list[str]:
    """The flags after ``worker_cmd``: connect to ``scheduler_address`` as ``worker_name``."""
    return [
        scheduler_address,
        "--name",
        worker_name,
        "--nthreads",
        str(launch.worker_threads),
        "--memory-limit",
        str(launch.worker_memory),
        "--host",
        "$(POD_IP)",
        "--dashboard-address",
        f"$(POD_IP):{DASHBOARD_PORT}",
    ]


def _env(launch: ClusterLaunch, role: str, extra: Mapping[str, str]) -> list[dict[str, Any]]:
    values = {str(k): str(v) for k, v in launch.environment.items()}
    upper = role.upper()
    values.update(
        {
            "DASK_GATEWAY_API_URL": launch.api_url,
            "DASK_GATEWAY_API_TOKEN": TOKEN_PATH,
            "DASK_GATEWAY_CLUSTER_NAME": launch.name,
            "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": CERT_PATH,
            f"DASK_DISTRIBUTED__COMM__TLS__{upper}__CERT": CERT_PATH,
            f"DASK_DISTRIBUTED__COMM__TLS__{upper}__KEY": KEY_PATH,
            **extra,
        }
    )
    values.pop("POD_IP", None)
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    ]
    env.extend({"name": k, "value": v} for k, v in values.items())
    return env


def _pod(
    ident: ClusterIdentity,
    *,
    name: str,
    component: str,
    command: list[str],
    args: list[str],
    env: list[dict[str, Any]],
    cores: float,
    memory: int,
    cores_limit: float | None,
    memory_limit: int | None,
    ports: list[dict[str, Any]],
    probes: dict[str, Any],
    spec: KubeClusterSpec,
    extra_pod_config: Mapping[str, Any],
    extra_container_config: Mapping[str, Any],
    extra_labels: Mapping[str, str],
    extra_annotations: Mapping[str, str],
    owner: Mapping[str, Any],
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": f"dask-{component}",
        "image": spec.image,
        "command": command,
        "args": args,
        "env": env,
        "resources": {
            "requests": {"cpu": format_cpu(cores), "memory": str(memory)},
            "limits": {
                "cpu": format_cpu(cores_limit if cores_limit is not None else cores),
                "memory": str(memory_limit if memory_limit is not None else memory),
            },
        },
        "ports": ports,
        "volumeMounts": [
            {"name": CREDENTIALS_VOLUME, "mountPath": CREDENTIALS_MOUNT, "readOnly": True}
        ],
        **probes,
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    container = deep_merge(container, extra_container_config)
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": CREDENTIALS_VOLUME, "secret": {"secretName": ident.secret_name}}],
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
    }
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    pod_spec = deep_merge(pod_spec, extra_pod_config)
    # Our labels last: they are what the gateway selects its pods by.
    labels = {**extra_labels, **ident.labels(component)}
    annotations = {**extra_annotations, ANNOTATION_CLUSTER_NAME: ident.name}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [dict(owner)],
        },
        "spec": pod_spec,
    }


def make_scheduler_pod(
    ident: ClusterIdentity,
    launch: ClusterLaunch,
    config: ClusterConfig,
    spec: KubeClusterSpec,
    *,
    owner: Mapping[str, Any],
) -> dict[str, Any]:
    """The scheduler Pod, owned by ``owner`` (the cluster's Secret)."""
    command = list(launch.scheduler_cmd or ("dask", "scheduler"))
    return _pod(
        ident,
        name=ident.scheduler_pod_name,
        component=COMPONENT_SCHEDULER,
        command=command,
        args=scheduler_args(launch),
        env=_env(launch, "scheduler", {}),
        cores=config.scheduler_cores,
        memory=config.scheduler_memory,
        cores_limit=spec.scheduler_cores_limit,
        memory_limit=spec.scheduler_memory_limit,
        ports=[
            {"name": "scheduler", "containerPort": SCHEDULER_PORT},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "api", "containerPort": PRELOAD_API_PORT},
        ],
        probes={
            "readinessProbe": {
                "httpGet": {"port": PRELOAD_API_PORT, "path": "/api/health"},
                "periodSeconds": 5,
                "failureThreshold": 3,
            }
        },
        spec=spec,
        extra_pod_config=spec.scheduler_extra_pod_config,
        extra_container_config=spec.scheduler_extra_container_config,
        extra_labels=spec.scheduler_extra_pod_labels,
        extra_annotations=spec.scheduler_extra_pod_annotations,
        owner=owner,
    )


def make_worker_pod(
    ident: ClusterIdentity,
    launch: ClusterLaunch,
    config: ClusterConfig,
    spec: KubeClusterSpec,
    worker_name: str,
    *,
    owner: Mapping[str, Any],
    record: str | None = None,
) -> dict[str, Any]:
    """One worker Pod, named after ``worker_name``, owned by ``owner`` (the scheduler
    Pod); ``record`` is the worker record annotation."""
    if not launch.scheduler_address:
        raise ValueError(f"cluster {launch.name} has no scheduler address yet")
    command = list(launch.worker_cmd or ("dask", "worker"))
    pod = _pod(
        ident,
        name=ident.worker_pod_name(worker_name),
        component=COMPONENT_WORKER,
        command=command,
        args=worker_args(launch, launch.scheduler_address, worker_name),
        env=_env(launch, "worker", {"DASK_GATEWAY_WORKER_NAME": worker_name}),
        cores=config.worker_cores,
        memory=config.worker_memory,
        cores_limit=spec.worker_cores_limit,
        memory_limit=spec.worker_memory_limit,
        ports=[{"name": "dashboard", "containerPort": DASHBOARD_PORT}],
        probes={},
        spec=spec,
        extra_pod_config=spec.worker_extra_pod_config,
        extra_container_config=spec.worker_extra_container_config,
        extra_labels=spec.worker_extra_pod_labels,
        extra_annotations=spec.worker_extra_pod_annotations,
        owner=owner,
    )
    pod["metadata"]["labels"][LABEL_WORKER] = label_value(worker_name)
    pod["metadata"]["annotations"][ANNOTATION_WORKER_NAME] = worker_name
    if record is not None:
        pod["metadata"]["annotations"][ANNOTATION_WORKER_RECORD] = record
    return pod
