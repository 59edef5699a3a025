"""From a pod spec to what the kubelet emulator runs: env, argv, volume files, probes (pure).

* ``$(VAR)`` expansion follows Kubernetes: a reference to a defined variable is replaced,
  an undefined one stays verbatim, ``$$`` is a literal ``$``. Env values may refer to the
  variables defined before them; ``command`` and ``args`` to all of the container's env.
* Volumes are not mounted: each ``volumeMounts[].mountPath`` maps to a private directory on
  the host, and :func:`rewrite_paths` replaces the mount path prefix in env values, command,
  args and ``workingDir`` with that directory. A process told ``--tls-cert
  /etc/dask-credentials/dask.crt`` gets ``<pod dir>/volumes/<volume>/dask.crt``.
* Missing Secrets or ConfigMaps raise :class:`ContainerProblem` with the reason the real
  kubelet reports (``CreateContainerConfigError`` for env references; mounts wait in
  ``ContainerCreating``) so the caller can retry.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ContainerProblem",
    "ProbeSpec",
    "ProbeState",
    "expand",
    "probe_spec",
    "resolve_env",
    "rewrite_paths",
    "volume_files",
]

MIN_PROBE_PERIOD = 0.05
Lookup = Callable[[str], "dict[str, Any] | None"]


class ContainerProblem(Exception):
    """Why a container cannot start yet: ``reason`` as in ``state.waiting.reason``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "$" or i + 1 >= len(text):
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(env[name] if name in env else f"$({name})")
            i = end + 1
        else:
            out.append(ch + nxt)
            i += 2
    return "".join(out)


def rewrite_paths(text: str, mounts: Sequence[tuple[str, str]]) -> str:
    """Replace each mount path (a whole path prefix) in ``text`` with its host directory."""
    for mount_path, host_dir in sorted(mounts, key=lambda m: -len(m[0])):
        prefix = mount_path.rstrip("/") or "/"
        pattern = re.compile(r"(?<![\w.\-/])" + re.escape(prefix) + r"(?=/|$|[^\w.\-])")
        text = pattern.sub(lambda _m, d=host_dir: d, text)
    return text


_FIELD_RE = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def _field_ref(path: str, pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP"),
        "status.podIPs": ",".join(ip.get("ip", "") for ip in status.get("podIPs") or []),
        "status.hostIP": status.get("hostIP"),
        "status.hostIPs": ",".join(ip.get("ip", "") for ip in status.get("hostIPs") or []),
    }
    if path in simple:
        return str(simple[path] or "")
    match = _FIELD_RE.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ContainerProblem("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}")


def _decoded(source: Mapping[str, Any], kind: str) -> dict[str, bytes]:
    data: dict[str, bytes] = {}
    if kind == "Secret":
        for key, value in (source.get("data") or {}).items():
            data[key] = base64.b64decode(value or "")
        for key, value in (source.get("stringData") or {}).items():
            data[key] = str(value).encode()
    else:
        for key, value in (source.get("data") or {}).items():
            data[key] = str(value).encode()
        for key, value in (source.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value or "")
    return data


def _key_ref(ref: Mapping[str, Any], kind: str, lookup: Lookup, namespace: str) -> str | None:
    name = ref.get("name") or ""
    key = ref.get("key") or ""
    obj = lookup(name)
    if obj is None:
        if ref.get("optional"):
            return None
        noun = "secret" if kind == "Secret" else "configmap"
        raise ContainerProblem("CreateContainerConfigError", f'{noun} "{name}" not found')
    data = _decoded(obj, kind)
    if key not in data:
        if ref.get("optional"):
            return None
        raise ContainerProblem(
            "CreateContainerConfigError", f"couldn't find key {key} in {kind} {namespace}/{name}"
        )
    return data[key].decode(errors="replace")


def resolve_env(
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    *,
    secrets: Lookup,
    configmaps: Lookup,
) -> dict[str, str]:
    """The container's environment (``envFrom`` first, then ``env`` in order), expanded."""
    namespace = (pod.get("metadata") or {}).get("namespace") or ""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for kind, ref_key, lookup in (
            ("Secret", "secretRef", secrets),
            ("ConfigMap", "configMapRef", configmaps),
        ):
            ref = source.get(ref_key)
            if not ref:
                continue
            obj = lookup(ref.get("name") or "")
            if obj is None:
                if ref.get("optional"):
                    continue
                noun = "secret" if kind == "Secret" else "configmap"
                raise ContainerProblem(
                    "CreateContainerConfigError", f'{noun} "{ref.get("name")}" not found'
                )
            for key, value in _decoded(obj, kind).items():
                env[prefix + key] = value.decode(errors="replace")
    for var in container.get("env") or []:
        name = var.get("name")
        if "valueFrom" not in var or var.get("valueFrom") is None:
            env[name] = expand(str(var.get("value") or ""), env)
            continue
        source = var["valueFrom"]
        value: str | None
        if source.get("fieldRef"):
            value = _field_ref(source["fieldRef"].get("fieldPath", ""), pod)
        elif source.get("secretKeyRef"):
            value = _key_ref(source["secretKeyRef"], "Secret", secrets, namespace)
        elif source.get("configMapKeyRef"):
            value = _key_ref(source["configMapKeyRef"], "ConfigMap", configmaps, namespace)
        else:
            raise ContainerProblem(
                "CreateContainerConfigError",
                f"env {name}: only fieldRef, secretKeyRef and configMapKeyRef are emulated",
            )
        if value is not None:
            env[name] = value
    return env


def volume_files(
    volume: Mapping[str, Any], *, secrets: Lookup, configmaps: Lookup
) -> dict[str, tuple[bytes, int]]:
    """Files (relative path -> content, mode) of a secret / configMap / projected volume.

    ``emptyDir`` gives no files. Other volume types raise :class:`ContainerProblem`.
    """
    name = volume.get("name")
    if "emptyDir" in volume:
        return {}
    if volume.get("secret") is not None:
        src = volume["secret"]
        return _source_files(name, "Secret", src.get("secretName") or "", src, secrets)
    if volume.get("configMap") is not None:
        src = volume["configMap"]
        return _source_files(name, "ConfigMap", src.get("name") or "", src, configmaps)
    if volume.get("projected") is not None:
        files: dict[str, tuple[bytes, int]] = {}
        default = volume["projected"].get("defaultMode", 0o644)
        for source in volume["projected"].get("sources") or []:
            if source.get("secret") is not None:
                src = dict(source["secret"], defaultMode=default)
                files.update(_source_files(name, "Secret", src.get("name") or "", src, secrets))
            elif source.get("configMap") is not None:
                src = dict(source["configMap"], defaultMode=default)
                files.update(
                    _source_files(name, "ConfigMap", src.get("name") or "", src, configmaps)
                )
            else:
                raise ContainerProblem(
                    "ContainerCreating",
                    f'volume "{name}": only secret and configMap projections are emulated',
                )
        return files
    raise ContainerProblem(
        "ContainerCreating",
        f'volume "{name}": only secret, configMap, projected and emptyDir are emulated',
    )


def _source_files(
    volume: Any, kind: str, source_name: str, src: Mapping[str, Any], lookup: Lookup
) -> dict[str, tuple[bytes, int]]:
    obj = lookup(source_name)
    noun = "secret" if kind == "Secret" else "configmap"
    if obj is None:
        if src.get("optional"):
            return {}
        raise ContainerProblem(
            "ContainerCreating",
            f'MountVolume.SetUp failed for volume "{volume}" : {noun} "{source_name}" not found',
        )
    data = _decoded(obj, kind)
    default_mode = int(src.get("defaultMode", 0o644))
    items = src.get("items")
    if not items:
        return {key: (value, default_mode) for key, value in data.items()}
    files: dict[str, tuple[bytes, int]] = {}
    for item in items:
        key = item.get("key")
        if key not in data:
            if src.get("optional"):
                continue
            raise ContainerProblem(
                "ContainerCreating",
                f'MountVolume.SetUp failed for volume "{volume}" : configmap references non-existent config key: {key}'
                if kind == "ConfigMap"
                else f'MountVolume.SetUp failed for volume "{volume}" : references non-existent secret key: {key}',
            )
        files[item.get("path") or key] = (data[key], int(item.get("mode", default_mode)))
    return files


@dataclass(frozen=True)
class ProbeSpec:
    """A probe with the real defaults; ``kind`` is ``http``, ``tcp`` or ``exec``."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = "/"
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def _port(value: Any, container: Mapping[str, Any]) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    for port in container.get("ports") or []:
        if port.get("name") == value:
            return int(port.get("containerPort"))
    raise ContainerProblem(
        "CreateContainerConfigError", f"probe port {value!r} is not a container port"
    )


def probe_spec(
    probe: Mapping[str, Any] | None, container: Mapping[str, Any], pod_ip: str
) -> ProbeSpec | None:
    """Parse a ``readinessProbe`` / ``livenessProbe`` / ``startupProbe``; ``None`` if absent."""
    if not probe:
        return None
    timing = {
        "initial_delay": float(probe.get("initialDelaySeconds") or 0),
        "period": float(probe.get("periodSeconds") or 10),
        "timeout": float(probe.get("timeoutSeconds") or 1),
        "success_threshold": int(probe.get("successThreshold") or 1),
        "failure_threshold": int(probe.get("failureThreshold") or 3),
    }
    if probe.get("httpGet"):
        get = probe["httpGet"]
        headers = tuple(
            (h.get("name", ""), h.get("value", "")) for h in get.get("httpHeaders") or []
        )
        return ProbeSpec(
            "http",
            host=get.get("host") or pod_ip,
            port=_port(get.get("port"), container),
            path=get.get("path") or "/",
            scheme=(get.get("scheme") or "HTTP").upper(),
            headers=headers,
            **timing,
        )
    if probe.get("tcpSocket"):
        sock = probe["tcpSocket"]
        return ProbeSpec(
            "tcp",
            host=sock.get("host") or pod_ip,
            port=_port(sock.get("port"), container),
            **timing,
        )
    if probe.get("exec"):
        return ProbeSpec("exec", command=tuple(probe["exec"].get("command") or ()), **timing)
    raise ContainerProblem(
        "CreateContainerConfigError", "probe: only httpGet, tcpSocket and exec are emulated"
    )


@dataclass
class ProbeState:
    """Threshold bookkeeping of one probe: ``record`` returns the new verdict on a flip."""

    spec: ProbeSpec
    started_at: float
    time_scale: float = 1.0
    passing: bool | None = None
    _streak_ok: int = 0
    _streak_fail: int = 0
    next_due: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.next_due = self.started_at + self.spec.initial_delay * self.time_scale

    def record(self, ok: bool, now: float) -> bool | None:
        self.next_due = now + max(self.spec.period * self.time_scale, MIN_PROBE_PERIOD)
        if ok:
            self._streak_ok += 1
            self._streak_fail = 0
            if self.passing is not True and self._streak_ok >= self.spec.success_threshold:
                self.passing = True
                return True
        else:
            self._streak_fail += 1
            self._streak_ok = 0
            if self.passing is not False and self._streak_fail >= self.spec.failure_threshold:
                self.passing = False
                return False
        return None
