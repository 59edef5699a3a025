"""The API's settings: defaults < YAML file < environment, validated all at once.

Theory of operation
-------------------
:data:`SCHEMA` lists every key: its section, kind, default and whether it is a secret.
:func:`load_settings` reads the YAML file (if any) and overlays the environment:

* a top-level key ``k`` is read from ``DASK_GATEWAY_<K>`` (``DASK_GATEWAY_PROXY_TOKEN``);
  a key ``k`` of section ``s`` from ``DASK_GATEWAY_<S>__<K>``
  (``DASK_GATEWAY_AUTH__PASSWORD``); an environment value wins over the file;
* ``JUPYTERHUB_API_URL``, ``JUPYTERHUB_API_TOKEN`` and ``JUPYTERHUB_SERVICE_NAME`` (set by
  JupyterHub for its services) fill the matching ``auth.jupyterhub_*`` keys only when
  neither the file nor a ``DASK_GATEWAY_AUTH__...`` variable sets them.

Environment values are strings, converted by kind: ``int``/``float``/``bool``
(true/false/yes/no/on/off/1/0) are parsed, memory sizes stay strings (``"2 G"``), mappings
and lists are parsed as YAML (so JSON works), ``encrypt_keys`` is split on ``;``. An empty
value unsets an optional key.

Every problem -- an unknown key (with a "did you mean"), a wrong type, a bad value, a
missing ``proxy_token`` -- is collected and raised at the end as one
:class:`~dask_gateway_common.settings.SettingsError`. Messages name the key or variable,
never a secret's value.

The ``backend.kubernetes`` mapping has keys of its own (:data:`KUBERNETES_SCHEMA` for the
backend, :data:`~.backends.kube_objects.KUBE_CLUSTER_DEFAULTS` for per-cluster pod
settings), each also read from ``DASK_GATEWAY_BACKEND__KUBERNETES__<KEY>``. With
``backend.type: kubernetes`` the per-cluster keys are declared in ``cluster.extra`` (values
from ``backend.kubernetes``, overridden by ``cluster.extra``) so cluster options may
override them.

Everything here is pure apart from reading the one YAML file and importing the options
handler module (so that a bad handler is a start-up problem, not a failed request).
"""

from __future__ import annotations

import base64
import binascii
import copy
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from dask_gateway_common.settings import SettingsError, log_level, parse_host_port

from .backends.kube_objects import (
    KUBE_CLUSTER_DEFAULTS,
    check_kube_cluster_values,
    is_dns_label,
    label_value,
)
from .lifecycle import Timeouts
from .limits import UserLimits
from .options import (
    Field,
    OptionsConfig,
    OptionsConfigError,
    field_from_config,
    load_handler,
)
from .resources import (
    CLUSTER_CONFIG_FIELDS,
    ClusterConfig,
    ClusterConfigError,
    check_cluster_config,
    parse_memory,
    resolve_cluster_config,
)

__all__ = [
    "AUTH_TYPES",
    "AuthSettings",
    "DASHBOARD_MODES",
    "DashboardSettings",
    "BACKEND_TYPES",
    "KUBERNETES_SCHEMA",
    "KubernetesSettings",
    "BackendSettings",
    "ClusterSettings",
    "SCHEMA",
    "Settings",
    "SettingsError",
    "env_var_name",
    "load_settings",
    "settings_from_mapping",
]

AUTH_TYPES = ("simple", "jupyterhub", "kerberos")
DASHBOARD_MODES = ("owner", "none")
BACKEND_TYPES = ("local", "kubernetes")
TOP = ""  # the section name of top-level keys


@dataclass(frozen=True)
class Key:
    """One setting: its kind, default, and whether its value must never be shown."""

    kind: str  # str | int | float | bool | memory | map | list | keys | cmd | any
    default: Any = None
    optional: bool = False
    secret: bool = False


_CLUSTER_DEFAULTS = ClusterConfig()

#: section -> key -> Key. The order here is the order of docs/configuration.md.
SCHEMA: dict[str, dict[str, Key]] = {
    TOP: {
        "address": Key("str", "127.0.0.1:8001"),
        "public_url": Key("str", "http://127.0.0.1:8000"),
        "api_url": Key("str", None, optional=True),
        "internal_url": Key("str", None, optional=True),
        "prefix": Key("str", ""),
        "proxy_token": Key("str", None, optional=True, secret=True),
        "db_path": Key("str", ".run/gateway.sqlite"),
        "encrypt_keys": Key("keys", (), secret=True),
        "stop_clusters_on_shutdown": Key("bool", False),
        "stopped_record_max_age": Key("float", 86400.0),
        "log_level": Key("str", "INFO"),
    },
    "auth": {
        "type": Key("str", "simple"),
        "password": Key("str", None, optional=True, secret=True),
        "cookie_max_age": Key("float", 300.0),
        "jupyterhub_api_url": Key("str", None, optional=True),
        "jupyterhub_api_token": Key("str", None, optional=True, secret=True),
        "jupyterhub_service_name": Key("str", ""),
        "jupyterhub_use_service_access_scopes": Key("bool", None, optional=True),
        "jupyterhub_legacy_api": Key("bool", False),
        "jupyterhub_tls_ca": Key("str", None, optional=True),
        "jupyterhub_tls_cert": Key("str", None, optional=True),
        "jupyterhub_tls_key": Key("str", None, optional=True),
        "jupyterhub_timeout": Key("float", 10.0),
        "jupyterhub_cache_ttl": Key("float", 60.0),
        "jupyterhub_cache_size": Key("int", 1024),
        "kerberos_service_name": Key("str", "HTTP"),
        "kerberos_keytab": Key("str", "dask_gateway.keytab"),
    },
    "dashboards": {
        "auth": Key("str", "owner"),
        "jupyterhub_oauth": Key("bool", None, optional=True),
        "oauth_client_id": Key("str", None, optional=True),
        "oauth_redirect_uri": Key("str", None, optional=True),
        "oauth_authorize_url": Key("str", None, optional=True),
    },
    "backend": {
        "type": Key("str", "local"),
        "workdir": Key("str", ".run/clusters"),
        "status_period": Key("float", 30.0),
        "stop_grace": Key("float", 5.0),
        "fork_server": Key("bool", True),
        "kubernetes": Key("map", {}),
    },
    "cluster": {
        "scheduler_cmd": Key("cmd", _CLUSTER_DEFAULTS.scheduler_cmd),
        "worker_cmd": Key("cmd", _CLUSTER_DEFAULTS.worker_cmd),
        "environment": Key("map", {}),
        "worker_cores": Key("int", _CLUSTER_DEFAULTS.worker_cores),
        "worker_threads": Key("int", None, optional=True),
        "worker_memory": Key("memory", "2 G"),
        "scheduler_cores": Key("int", _CLUSTER_DEFAULTS.scheduler_cores),
        "scheduler_memory": Key("memory", "2 G"),
        "adaptive_period": Key("float", _CLUSTER_DEFAULTS.adaptive_period),
        "idle_timeout": Key("float", _CLUSTER_DEFAULTS.idle_timeout),
        "cluster_max_cores": Key("float", None, optional=True),
        "cluster_max_memory": Key("memory", None, optional=True),
        "cluster_max_workers": Key("int", None, optional=True),
        "extra": Key("map", {}),
        "heartbeat_period": Key("float", 15.0),
        "heartbeat_timeout": Key("float", None, optional=True),
        "start_timeout": Key("float", 60.0),
        "worker_start_timeout": Key("float", 60.0),
        "worker_start_failure_limit": Key("int", 3),
        "check_period": Key("float", None, optional=True),
        "scheduler_api_retries": Key("int", 3),
    },
    "user_limits": {
        "max_clusters": Key("int", None, optional=True),
        "max_cores": Key("float", None, optional=True),
        "max_memory": Key("memory", None, optional=True),
    },
    "options": {
        "fields": Key("list", []),
        "groups": Key("map", None, optional=True),
        "handler": Key("str", None, optional=True),
    },
}

#: Standard variables that fill a key only when nothing else set it.
FALLBACK_ENV = {
    ("auth", "jupyterhub_api_url"): "JUPYTERHUB_API_URL",
    ("auth", "jupyterhub_api_token"): "JUPYTERHUB_API_TOKEN",
    ("auth", "jupyterhub_service_name"): "JUPYTERHUB_SERVICE_NAME",
    ("dashboards", "oauth_client_id"): "JUPYTERHUB_CLIENT_ID",
    ("dashboards", "oauth_redirect_uri"): "JUPYTERHUB_OAUTH_CALLBACK_URL",
}


# --- settings types ---------------------------------------------------------------------


@dataclass(frozen=True)
class AuthSettings:
    type: str = "simple"
    password: str | None = field(default=None, repr=False)
    cookie_max_age: float = 300.0
    jupyterhub_api_url: str | None = None
    jupyterhub_api_token: str | None = field(default=None, repr=False)
    jupyterhub_service_name: str = ""
    #: ``None``: check the service access scope iff a service name is set (not legacy).
    jupyterhub_use_service_access_scopes: bool | None = None
    jupyterhub_legacy_api: bool = False
    jupyterhub_tls_ca: str | None = None
    jupyterhub_tls_cert: str | None = None
    jupyterhub_tls_key: str | None = None
    jupyterhub_timeout: float = 10.0
    jupyterhub_cache_ttl: float = 60.0
    jupyterhub_cache_size: int = 1024
    kerberos_service_name: str = "HTTP"
    kerberos_keytab: str = "dask_gateway.keytab"


@dataclass(frozen=True)
class DashboardSettings:
    """``dashboards``: who may open a cluster's dashboard, and the hub OAuth client that
    logs browsers in with ``auth.type: jupyterhub`` (see ``dashboard_auth``)."""

    auth: str = "owner"
    #: ``None``: on iff auth is jupyterhub and a client id and the hub token are known.
    jupyterhub_oauth: bool | None = None
    oauth_client_id: str | None = None
    oauth_redirect_uri: str | None = None
    oauth_authorize_url: str | None = None


#: ``backend.kubernetes`` keys that configure the backend itself. The per-cluster keys
#: (image, pod and container config...) are ``KUBE_CLUSTER_DEFAULTS``.
KUBERNETES_SCHEMA: dict[str, Key] = {
    "kubeconfig": Key("str", None, optional=True),
    "context": Key("str", None, optional=True),
    "namespace": Key("str", None, optional=True),
    "instance": Key("str", "dask-gateway"),
    "api_concurrency": Key("int", 4),
    "request_timeout": Key("float", 30.0),
    "watch_timeout": Key("float", 300.0),
}


def _kube_cluster_kind(key: str) -> Key:
    """How an environment value of a per-cluster Kubernetes key is parsed."""
    if key in ("image", "image_pull_policy", "service_account"):
        return Key("str", None, optional=key != "image")
    if key in ("image_pull_secrets", "tolerations"):
        return Key("list", [])
    if key.endswith("_cores_limit"):
        return Key("float", None, optional=True)
    if key.endswith("_memory_limit"):
        return Key("memory", None, optional=True)
    return Key("map", {})


@dataclass(frozen=True)
class KubernetesSettings:
    """``backend.kubernetes``: where the cluster pods go and how the API talks to
    Kubernetes. ``cluster`` holds the per-cluster keys that were set (pod settings)."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    instance: str = "dask-gateway"
    api_concurrency: int = 4
    request_timeout: float = 30.0
    watch_timeout: float = 300.0
    cluster: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendSettings:
    type: str = "local"
    workdir: str = ".run/clusters"
    status_period: float = 30.0
    stop_grace: float = 5.0
    fork_server: bool = True
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)


@dataclass(frozen=True)
class ClusterSettings:
    """The per-cluster defaults (``config``) and the lifecycle timers (seconds)."""

    config: ClusterConfig = field(default_factory=ClusterConfig)
    heartbeat_period: float = 15.0
    heartbeat_timeout: float = 30.0
    start_timeout: float = 60.0
    worker_start_timeout: float = 60.0
    worker_start_failure_limit: int = 3
    check_period: float = 15.0
    scheduler_api_retries: int = 3

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(
            start_timeout=self.start_timeout,
            heartbeat_timeout=self.heartbeat_timeout,
            worker_start_timeout=self.worker_start_timeout,
            worker_start_failure_limit=self.worker_start_failure_limit,
        )


@dataclass(frozen=True)
class Settings:
    """Everything the API needs, validated. Secrets are left out of repr."""

    proxy_token: str = field(repr=False)
    address: str = "127.0.0.1:8001"
    public_url: str = "http://127.0.0.1:8000"
    #: The ``DASK_GATEWAY_API_URL`` given to schedulers (``public_url + prefix + "/api"``
    #: unless configured).
    api_url: str = "http://127.0.0.1:8000/api"
    #: Where the proxies reach the API itself (the target of the ``<prefix>/`` route);
    #: ``None`` means ``http://<host of address, or this host's name>:<bound port>``.
    internal_url: str | None = None
    prefix: str = ""
    db_path: str = ".run/gateway.sqlite"
    encrypt_keys: tuple[str, ...] = field(default=(), repr=False)
    stop_clusters_on_shutdown: bool = False
    stopped_record_max_age: float = 86400.0
    log_level: str = "INFO"
    auth: AuthSettings = field(default_factory=AuthSettings)
    dashboards: DashboardSettings = field(default_factory=DashboardSettings)
    backend: BackendSettings = field(default_factory=BackendSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    user_limits: UserLimits = field(default_factory=UserLimits)
    options: OptionsConfig = field(default_factory=OptionsConfig)

    @property
    def bind(self) -> tuple[str, int]:
        """``(host, port)`` of :attr:`address`."""
        return parse_host_port(self.address, what="address")


# --- raw values: file + environment -----------------------------------------------------


def env_var_name(section: str, key: str) -> str:
    """``DASK_GATEWAY_<KEY>`` for top-level keys, ``DASK_GATEWAY_<SECTION>__<KEY>`` else."""
    if section == TOP:
        return f"DASK_GATEWAY_{key.upper()}"
    return f"DASK_GATEWAY_{section.upper()}__{key.upper()}"


def _where(section: str, key: str) -> str:
    return key if section == TOP else f"{section}.{key}"


def _unknown(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {name!r}{hint}"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_KIND_NAMES = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "memory": "a memory size such as '2 G' or a number of bytes",
    "map": "a mapping",
    "list": "a list",
    "keys": "a list of keys (or one ';'-separated string)",
    "cmd": "a command (a string or a list of strings)",
}


def _describe(value: Any, secret: bool) -> str:
    return "a value of the wrong type" if secret else repr(value)


def _from_env(spec: Key, raw: str) -> Any:
    """Convert an environment string by kind; raises ValueError (message without value)."""
    text = raw.strip()
    if spec.optional and text.lower() in ("", "null", "none"):
        return None
    kind = spec.kind
    if kind in ("str", "memory", "cmd"):
        return raw if kind == "str" else text
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError
    if kind == "keys":
        return [k.strip() for k in text.split(";") if k.strip()]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError from None


def _check_kind(spec: Key, value: Any) -> bool:
    if value is None:
        return spec.optional
    kind = spec.kind
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "memory":
        return isinstance(value, str | int | float) and not isinstance(value, bool)
    if kind == "map":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    if kind == "keys":
        return isinstance(value, str) or (
            isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        )
    if kind == "cmd":
        return isinstance(value, str) or (
            isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
        )
    return True


def _gather(
    data: Mapping[str, Any], env: Mapping[str, str], problems: list[str]
) -> dict[str, dict[str, Any]]:
    """Merge defaults < file < environment into ``section -> key -> value``, type-checked."""
    values: dict[str, dict[str, Any]] = {s: {} for s in SCHEMA}
    sections = [s for s in SCHEMA if s != TOP]
    top_keys = list(SCHEMA[TOP])
    for name, value in data.items():
        if name in SCHEMA[TOP]:
            values[TOP][name] = value
        elif name in sections:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                problems.append(f"{name}: expected a mapping of settings, got {value!r}")
                continue
            for key, item in value.items():
                if key in SCHEMA[name]:
                    values[name][key] = item
                else:
                    problems.append(_unknown(f"{name}.{key}", list(SCHEMA[name])))
        else:
            problems.append(_unknown(str(name), top_keys + sections))

    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            var = env_var_name(section, key)
            where = _where(section, key)
            if var in env:
                try:
                    values[section][key] = _from_env(spec, env[var])
                except (ValueError, TypeError):
                    shown = "" if spec.secret else f", got {env[var]!r}"
                    problems.append(f"{var}: expected {_KIND_NAMES[spec.kind]}{shown}")
                    values[section].pop(key, None)
                    continue
                where = var
            elif key not in values[section] and (section, key) in FALLBACK_ENV:
                fallback = FALLBACK_ENV[(section, key)]
                if env.get(fallback):
                    values[section][key] = env[fallback]
                    where = fallback
            if key in values[section]:
                value = values[section][key]
                if not _check_kind(spec, value):
                    problems.append(
                        f"{where}: expected {_KIND_NAMES[spec.kind]}, "
                        f"got {_describe(value, spec.secret)}"
                    )
                    del values[section][key]
                    continue
                if spec.kind == "keys" and isinstance(value, str):
                    values[section][key] = [k.strip() for k in value.split(";") if k.strip()]
            else:
                values[section][key] = spec.default
    return values


# --- semantic checks --------------------------------------------------------------------


def _url(value: str, what: str, problems: list[str]) -> str:
    text = value.strip().rstrip("/")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or rest.startswith("/"):
        problems.append(f"{what}: expected an http:// or https:// URL, got {value!r}")
    elif any(c.isspace() for c in text) or "?" in text or "#" in text:
        problems.append(f"{what}: URL must not contain spaces, '?' or '#', got {value!r}")
    return text


def _prefix(value: str, problems: list[str]) -> str:
    text = value.strip().rstrip("/")
    if text and not text.startswith("/"):
        problems.append(f"prefix: must start with '/', got {value!r}")
    elif any(c.isspace() or c in "?#%" for c in text) or "//" in text:
        problems.append(
            f"prefix: must be a plain path like '/services/dask-gateway', got {value!r}"
        )
    return text


def _non_negative(
    values: Mapping[str, Any], keys: list[str], section: str, problems: list[str]
) -> None:
    for key in keys:
        value = values.get(key)
        if value is not None and value < 0:
            problems.append(f"{_where(section, key)}: must be >= 0, got {value!r}")


def _positive(
    values: Mapping[str, Any], keys: list[str], section: str, problems: list[str]
) -> None:
    for key in keys:
        value = values.get(key)
        if value is not None and value <= 0:
            problems.append(f"{_where(section, key)}: must be > 0, got {value!r}")


def _fernet_key_ok(key: str) -> bool:
    try:
        raw = base64.urlsafe_b64decode(key.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False
    return len(raw) == 32


def _top(v: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "address" in v:
        try:
            parse_host_port(v["address"], what="address")
            out["address"] = v["address"].strip()
        except ValueError as exc:
            problems.append(str(exc))
    if "public_url" in v:
        out["public_url"] = _url(v["public_url"], "public_url", problems)
    if "prefix" in v:
        out["prefix"] = _prefix(v["prefix"], problems)
    if v.get("api_url") is not None:
        out["api_url"] = _url(v["api_url"], "api_url", problems)
        if not out["api_url"].endswith("/api"):
            problems.append(
                f"api_url: must end in '/api' (schedulers append /v1/clusters/...), "
                f"got {v['api_url']!r}"
            )
    elif "public_url" in out and "prefix" in out:
        out["api_url"] = f"{out['public_url']}{out['prefix']}/api"
    if v.get("internal_url") is not None:
        internal = _url(v["internal_url"], "internal_url", problems)
        if internal is not None:
            out["internal_url"] = internal.rstrip("/")
    token = v.get("proxy_token")
    if token is None or not token.strip():
        problems.append(
            "proxy_token is required: set DASK_GATEWAY_PROXY_TOKEN (or proxy_token in the "
            "config file) to a long random string, e.g. `openssl rand -hex 32`"
        )
    elif any(c.isspace() or not c.isprintable() for c in token.strip()):
        problems.append("proxy_token must not contain whitespace or control characters")
    else:
        out["proxy_token"] = token.strip()
    if "db_path" in v:
        if not v["db_path"].strip():
            problems.append("db_path: must not be empty (use ':memory:' for no persistence)")
        out["db_path"] = v["db_path"]
    if "encrypt_keys" in v:
        keys = tuple(v["encrypt_keys"])
        for i, key in enumerate(keys):
            if not _fernet_key_ok(key):
                problems.append(
                    f"encrypt_keys[{i}]: not a valid Fernet key (expected 32 bytes, "
                    "url-safe base64-encoded)"
                )
        out["encrypt_keys"] = keys
    if "stop_clusters_on_shutdown" in v:
        out["stop_clusters_on_shutdown"] = v["stop_clusters_on_shutdown"]
    if "stopped_record_max_age" in v:
        _non_negative(v, ["stopped_record_max_age"], TOP, problems)
        out["stopped_record_max_age"] = float(v["stopped_record_max_age"])
    if "log_level" in v:
        try:
            out["log_level"] = log_level(v["log_level"])
        except ValueError as exc:
            problems.append(f"log_level: {exc}")
    return out


def _auth(v: dict[str, Any], problems: list[str]) -> AuthSettings:
    if "type" in v and v["type"] not in AUTH_TYPES:
        problems.append(f"auth.type: must be one of {', '.join(AUTH_TYPES)}, got {v['type']!r}")
    _positive(v, ["cookie_max_age"], "auth", problems)
    if v.get("type") == "jupyterhub" and not v.get("jupyterhub_api_url"):
        problems.append(
            "auth.jupyterhub_api_url is required with auth.type jupyterhub "
            "(or set JUPYTERHUB_API_URL)"
        )
    if v.get("jupyterhub_api_url"):
        v["jupyterhub_api_url"] = _url(v["jupyterhub_api_url"], "auth.jupyterhub_api_url", problems)
    _positive(v, ["jupyterhub_timeout", "jupyterhub_cache_size"], "auth", problems)
    _non_negative(v, ["jupyterhub_cache_ttl"], "auth", problems)
    if v.get("type") == "jupyterhub":
        _jupyterhub_problems(v, problems)
    if v.get("type") == "kerberos" and not str(v.get("kerberos_service_name") or "").strip():
        problems.append("auth.kerberos_service_name: must not be empty")
    password = v.get("password")
    if password == "":
        v["password"] = None
    kwargs = {k: val for k, val in v.items() if k in SCHEMA["auth"]}
    for key in ("cookie_max_age", "jupyterhub_timeout", "jupyterhub_cache_ttl"):
        if key in kwargs:
            kwargs[key] = float(kwargs[key])
    return AuthSettings(**kwargs)


def _jupyterhub_problems(v: dict[str, Any], problems: list[str]) -> None:
    """Contradictions between the JupyterHub keys (only checked with that auth type)."""
    legacy = v.get("jupyterhub_legacy_api", False)
    scopes = v.get("jupyterhub_use_service_access_scopes")
    if legacy and not v.get("jupyterhub_api_token"):
        problems.append(
            "auth.jupyterhub_legacy_api needs the gateway's own hub token "
            "(auth.jupyterhub_api_token or JUPYTERHUB_API_TOKEN)"
        )
    if legacy and scopes:
        problems.append(
            "auth.jupyterhub_use_service_access_scopes cannot be enforced with "
            "auth.jupyterhub_legacy_api (the legacy hub API does not report token scopes)"
        )
    elif scopes and not v.get("jupyterhub_service_name"):
        problems.append(
            "auth.jupyterhub_use_service_access_scopes needs auth.jupyterhub_service_name "
            "(or JUPYTERHUB_SERVICE_NAME)"
        )
    token = v.get("jupyterhub_api_token")
    if token is not None:
        token = v["jupyterhub_api_token"] = token.strip() or None
        if token is not None and not (
            token.isascii() and token.isprintable() and not any(c.isspace() for c in token)
        ):
            problems.append("auth.jupyterhub_api_token: must be printable ASCII without whitespace")
    if v.get("jupyterhub_tls_key") and not v.get("jupyterhub_tls_cert"):
        problems.append("auth.jupyterhub_tls_key is set without auth.jupyterhub_tls_cert")


def _dashboards(v: dict[str, Any], auth: AuthSettings, problems: list[str]) -> DashboardSettings:
    where = "dashboards"
    if v.get("auth", "owner") not in DASHBOARD_MODES:
        problems.append(
            f"{where}.auth: must be one of {', '.join(DASHBOARD_MODES)}, got {v['auth']!r}"
        )
    if v.get("oauth_redirect_uri"):
        v["oauth_redirect_uri"] = _url(
            v["oauth_redirect_uri"], f"{where}.oauth_redirect_uri", problems
        )
    authorize = v.get("oauth_authorize_url")
    if authorize and not authorize.strip().startswith("/"):
        v["oauth_authorize_url"] = _url(authorize, f"{where}.oauth_authorize_url", problems)
    elif authorize and (authorize.startswith("//") or any(c.isspace() for c in authorize)):
        problems.append(
            f"{where}.oauth_authorize_url: expected a URL or a path like "
            f"/hub/api/oauth2/authorize, got {authorize!r}"
        )
    if v.get("jupyterhub_oauth"):
        if auth.type != "jupyterhub":
            problems.append(f"{where}.jupyterhub_oauth needs auth.type jupyterhub")
        if not auth.jupyterhub_api_token:
            problems.append(
                f"{where}.jupyterhub_oauth needs the gateway's hub token (the OAuth client "
                "secret): auth.jupyterhub_api_token or JUPYTERHUB_API_TOKEN"
            )
        if not (v.get("oauth_client_id") or auth.jupyterhub_service_name):
            problems.append(
                f"{where}.jupyterhub_oauth needs {where}.oauth_client_id or "
                "auth.jupyterhub_service_name (the client id is then service-<name>)"
            )
    kwargs = {k: val for k, val in v.items() if k in SCHEMA["dashboards"]}
    return DashboardSettings(**kwargs)


def _kubernetes(
    raw: Mapping[str, Any], env: Mapping[str, str], problems: list[str]
) -> KubernetesSettings:
    where = "backend.kubernetes"
    known = list(KUBERNETES_SCHEMA) + list(KUBE_CLUSTER_DEFAULTS)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in known:
            values[key] = value
        else:
            problems.append(_unknown(f"{where}.{key}", known))
    for key in known:
        var = f"DASK_GATEWAY_BACKEND__KUBERNETES__{key.upper()}"
        if var not in env:
            continue
        spec = KUBERNETES_SCHEMA.get(key) or _kube_cluster_kind(key)
        try:
            values[key] = _from_env(spec, env[var])
        except (ValueError, TypeError):
            problems.append(f"{var}: expected {_KIND_NAMES[spec.kind]}, got {env[var]!r}")
            values.pop(key, None)
    out: dict[str, Any] = {}
    for key, spec in KUBERNETES_SCHEMA.items():
        if key not in values:
            continue
        value = values[key]
        if not _check_kind(spec, value):
            problems.append(f"{where}.{key}: expected {_KIND_NAMES[spec.kind]}, got {value!r}")
            continue
        out[key] = value
    for key in ("kubeconfig", "context"):
        if out.get(key) is not None and not out[key].strip():
            problems.append(f"{where}.{key}: must not be empty (use null for the default)")
    namespace = out.get("namespace")
    if namespace is not None and not is_dns_label(namespace):
        problems.append(
            f"{where}.namespace: must be a Kubernetes namespace name (lower case letters, "
            f"digits and '-', at most 63), got {namespace!r}"
        )
    instance = out.get("instance")
    if instance is not None and (not instance or label_value(instance) != instance):
        problems.append(
            f"{where}.instance: must be a valid label value (at most 63 letters, digits, "
            f"'-', '_' or '.', alphanumeric at both ends), got {instance!r}"
        )
    _positive(out, ["api_concurrency", "request_timeout", "watch_timeout"], where, problems)
    for key in ("request_timeout", "watch_timeout"):
        if key in out:
            out[key] = float(out[key])
    cluster = {k: values[k] for k in KUBE_CLUSTER_DEFAULTS if k in values}
    problems.extend(check_kube_cluster_values(cluster, f"{where}."))
    return KubernetesSettings(cluster=copy.deepcopy(cluster), **out)


def _with_kube_extra(
    cluster: ClusterSettings, kube: KubernetesSettings, problems: list[str]
) -> ClusterSettings:
    """Declare the per-cluster Kubernetes keys in the cluster defaults' ``extra``."""
    explicit = cluster.config.extra
    problems.extend(check_kube_cluster_values(explicit, "cluster.extra."))
    extra = {**copy.deepcopy(KUBE_CLUSTER_DEFAULTS), **copy.deepcopy(kube.cluster), **explicit}
    return replace(cluster, config=replace(cluster.config, extra=extra))


def _backend(v: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> BackendSettings:
    if "type" in v and v["type"] not in BACKEND_TYPES:
        problems.append(
            f"backend.type: must be one of {', '.join(BACKEND_TYPES)}, got {v['type']!r}"
        )
    if "workdir" in v and not v["workdir"].strip():
        problems.append("backend.workdir: must not be empty")
    _positive(v, ["status_period"], "backend", problems)
    _non_negative(v, ["stop_grace"], "backend", problems)
    kwargs = {k: val for k, val in v.items() if k in SCHEMA["backend"]}
    kwargs["kubernetes"] = _kubernetes(v.get("kubernetes") or {}, env, problems)
    for k in ("status_period", "stop_grace"):
        if k in kwargs:
            kwargs[k] = float(kwargs[k])
    return BackendSettings(**kwargs)


_TIMER_KEYS = [k for k in SCHEMA["cluster"] if k not in CLUSTER_CONFIG_FIELDS]


def _cluster(v: dict[str, Any], problems: list[str]) -> ClusterSettings | None:
    config_values = {k: val for k, val in v.items() if k in CLUSTER_CONFIG_FIELDS}
    config, config_problems = check_cluster_config(config_values)
    problems.extend(f"cluster: {p}" for p in config_problems)
    timers = {k: v[k] for k in _TIMER_KEYS if k in v}
    before = len(problems)
    _non_negative(
        timers,
        ["heartbeat_period", "heartbeat_timeout", "start_timeout", "worker_start_timeout"],
        "cluster",
        problems,
    )
    _non_negative(timers, ["worker_start_failure_limit"], "cluster", problems)
    _positive(timers, ["check_period", "scheduler_api_retries"], "cluster", problems)
    if len(problems) > before or config is None:
        return None
    period = float(timers.get("heartbeat_period", 15.0))
    timeout = timers.get("heartbeat_timeout")
    timeout = 2 * period if timeout is None else float(timeout)
    if period > 0 and 0 < timeout <= period:
        problems.append(
            f"cluster.heartbeat_timeout ({timeout:g} s) must be longer than "
            f"cluster.heartbeat_period ({period:g} s), or 0 to disable it"
        )
    start_timeout = float(timers.get("start_timeout", 60.0))
    worker_start_timeout = float(timers.get("worker_start_timeout", 60.0))
    check_period = timers.get("check_period")
    if check_period is None:
        enabled = [t for t in (start_timeout, timeout, worker_start_timeout) if t > 0]
        check_period = min([20.0] + [t / 2 for t in enabled])
    return ClusterSettings(
        config=config,
        heartbeat_period=period,
        heartbeat_timeout=timeout,
        start_timeout=start_timeout,
        worker_start_timeout=worker_start_timeout,
        worker_start_failure_limit=int(timers.get("worker_start_failure_limit", 3)),
        check_period=float(check_period),
        scheduler_api_retries=int(timers.get("scheduler_api_retries", 3)),
    )


def _user_limits(v: dict[str, Any], problems: list[str]) -> UserLimits:
    _non_negative(v, ["max_clusters", "max_cores"], "user_limits", problems)
    max_memory = v.get("max_memory")
    if max_memory is not None:
        try:
            max_memory = parse_memory(max_memory)
        except ValueError as exc:
            problems.append(f"user_limits.max_memory: {exc}")
            max_memory = None
    max_cores = v.get("max_cores")
    return UserLimits(
        # 0 means unlimited, as in upstream's old UserLimits.
        max_clusters=v.get("max_clusters") or None,
        max_cores=float(max_cores) if max_cores else None,
        max_memory=max_memory or None,
    )


def _options(
    v: dict[str, Any], cluster: ClusterSettings | None, problems: list[str]
) -> OptionsConfig:
    fields: list[Field] = []
    ok = True
    for i, decl in enumerate(v.get("fields") or []):
        name = decl.get("field") if isinstance(decl, Mapping) else None
        where = f"options.fields[{i}]" + (f" ({name})" if isinstance(name, str) else "")
        try:
            fields.append(field_from_config(decl))
        except OptionsConfigError as exc:
            message = str(exc)
            if isinstance(name, str) and message.startswith(f"{name}: "):
                message = message[len(name) + 2 :]  # the field is already named in `where`
            problems.append(f"{where}: {message}")
            ok = False
    groups_value = v.get("groups")
    groups: dict[str, tuple[str, ...]] | None = None
    if groups_value is not None:
        groups = {}
        for group, names in groups_value.items():
            if (
                not isinstance(group, str)
                or not isinstance(names, list)
                or not all(isinstance(n, str) for n in names)
            ):
                problems.append(
                    f"options.groups: each entry must map a group name to a list of field "
                    f"names, got {group!r}: {names!r}"
                )
                ok = False
                continue
            groups[group] = tuple(names)
    handler = None
    if v.get("handler") is not None:
        try:
            handler = load_handler(v["handler"])
        except OptionsConfigError as exc:
            problems.append(f"options.handler: {exc}")
            ok = False
    if not ok:
        return OptionsConfig()
    try:
        config = OptionsConfig(fields=tuple(fields), groups=groups, handler=handler)
    except OptionsConfigError as exc:
        problems.append(f"options: {exc}")
        return OptionsConfig()
    if handler is None and cluster is not None:
        allowed = set(CLUSTER_CONFIG_FIELDS) | set(cluster.config.extra)
        for i, f in enumerate(config.fields):
            if f.target not in allowed:
                problems.append(
                    f"options.fields[{i}] ({f.field}): target {f.target!r} is not a cluster "
                    "config key; set 'target' to one (e.g. worker_cores) or configure "
                    "options.handler"
                )
                ok = False
        if ok and config.fields:
            spec = config.spec
            try:
                resolve_cluster_config(cluster.config, spec.transform(spec.validate({})))
            except ClusterConfigError as exc:
                problems.append(f"options: the option defaults give an invalid cluster: {exc}")
    return config


def settings_from_mapping(data: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    """Build settings from an already-parsed YAML mapping plus the environment."""
    problems: list[str] = []
    values = _gather(data, env, problems)
    top = _top(values[TOP], problems)
    auth = _auth(values["auth"], problems)
    dashboards = _dashboards(values["dashboards"], auth, problems)
    backend = _backend(values["backend"], env, problems)
    cluster = _cluster(values["cluster"], problems)
    if cluster is not None and backend.type == "kubernetes":
        cluster = _with_kube_extra(cluster, backend.kubernetes, problems)
    user_limits = _user_limits(values["user_limits"], problems)
    options = _options(values["options"], cluster, problems)
    if problems:
        raise SettingsError(problems)
    assert cluster is not None
    return Settings(
        auth=auth,
        dashboards=dashboards,
        backend=backend,
        cluster=cluster,
        user_limits=user_limits,
        options=options,
        **top,
    )


def load_settings(path: str | None, env: Mapping[str, str]) -> Settings:
    """Read the YAML file at ``path`` (``None``: defaults only), overlay ``env``, validate.

    Raises :class:`SettingsError` listing every problem.
    """
    data: Any = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise SettingsError(
                [f"cannot read config file {path}: {exc.strerror or exc}"]
            ) from None
        except UnicodeDecodeError:
            raise SettingsError([f"config file {path} is not UTF-8 text"]) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise SettingsError(
                [f"config file {path} is not valid YAML{where}: {problem}"]
            ) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SettingsError(
                [f"config file {path} must hold a mapping of settings, got {type(data).__name__}"]
            )
    return settings_from_mapping(data, env)
