"""Per-cluster resources: memory sizes and the resolved :class:`ClusterConfig` (spec §6.4).

A cluster's configuration is built once, at creation, from the server defaults (the
``cluster`` section of the settings) overlaid with the overrides that came out of the
user's options (directly, or through the options handler). The result is an immutable
:class:`ClusterConfig`; it is persisted with the cluster (:meth:`ClusterConfig.to_dict`,
:meth:`ClusterConfig.from_dict`) and never changes afterwards.

Override rules:

* any :class:`ClusterConfig` field may be overridden;
* ``environment`` overrides are *merged* over the default environment (a user option can
  add variables, and can replace a variable, but cannot drop the operator's others);
* backend-specific keys (e.g. ``image`` for Kubernetes) live in ``extra``; an override
  may set a key at top level only if the defaults' ``extra`` declares it, or inside an
  explicit ``extra`` mapping;
* any other key is an error (``Unknown cluster config fields ['x']``).

Every error is a :class:`ClusterConfigError`, a ``ValueError`` that the HTTP layer answers
with 422, as the spec wants for option-derived config problems.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dask_gateway_common.errors import GatewayError

__all__ = [
    "CLUSTER_CONFIG_FIELDS",
    "ClusterConfig",
    "ClusterConfigError",
    "check_cluster_config",
    "format_cores",
    "format_memory",
    "merge_overrides",
    "parse_memory",
    "resolve_cluster_config",
]

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_MEMORY_RE = re.compile(
    r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[KMGTP]?)(?P<i>i?)(?P<b>B?)\s*$",
    re.IGNORECASE,
)


class ClusterConfigError(GatewayError, ValueError):
    """A cluster configuration cannot be built; the message says why (HTTP 422)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=422)


def parse_memory(value: str | int | float) -> int:
    """Parse a memory size into bytes.

    Integers (and floats) are bytes. Strings are a number and an optional unit: ``K``,
    ``M``, ``G``, ``T``, ``P`` (powers of 1024, case-insensitive), optionally followed by
    ``i`` and/or ``B``: ``"2 G"``, ``"512M"``, ``"1.5 GiB"``, ``"100"``, ``"64kb"``.
    Raises ``ValueError`` with a message naming the bad value.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}: expected bytes or a string like '2 G'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid memory size {value!r}: must not be negative")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"invalid memory size {value!r}: must be a finite, non-negative number"
            )
        return int(value)
    if not isinstance(value, str):
        raise ValueError(
            f"invalid memory size {value!r}: expected bytes or a string like '2 G', "
            f"got {type(value).__name__}"
        )
    match = _MEMORY_RE.match(value)
    if match is None:
        raise ValueError(
            f"invalid memory size {value!r}: expected a number with an optional unit "
            "K, M, G, T or P (powers of 1024), e.g. '2 G', '512M' or '1.5 GiB'"
        )
    unit = match["unit"].upper()
    if match["i"] and not unit:
        raise ValueError(f"invalid memory size {value!r}: 'i' needs a unit before it")
    return int(float(match["num"]) * _UNITS[unit])


def format_memory(n: int) -> str:
    """Format a byte count for people: ``2 GiB``, ``1.5 GiB``, ``512 B``.

    The largest binary unit that gives a value of at least 1 is used, with at most two
    decimals (trailing zeros dropped). ``parse_memory`` reads the result back.
    """
    if n < 1024:
        return f"{n} B"
    units = (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
    suffix, size = next(u for u in units if n >= u[1])
    if n % size == 0:
        return f"{n // size} {suffix}"
    text = f"{n / size:.2f}".rstrip("0").rstrip(".")
    return f"{text} {suffix}"


def format_cores(x: float) -> str:
    """Format a core count without a spurious ``.0`` (``4``, ``1.5``)."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class ClusterConfig:
    """The resolved resources and commands of one cluster. Memory is in bytes."""

    scheduler_cmd: str = "dask scheduler"
    worker_cmd: str = "dask worker"
    environment: dict[str, str] = field(default_factory=dict)
    worker_cores: int = 1
    worker_threads: int | None = None
    worker_memory: int = 2 * 2**30
    scheduler_cores: int = 1
    scheduler_memory: int = 2 * 2**30
    adaptive_period: float = 3.0
    idle_timeout: float = 0.0
    cluster_max_cores: float | None = None
    cluster_max_memory: int | None = None
    cluster_max_workers: int | None = None
    #: Backend-specific settings (e.g. ``image`` for Kubernetes); JSON-able values.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        """Threads per worker: ``worker_threads``, or ``worker_cores`` when unset."""
        return self.worker_threads if self.worker_threads is not None else self.worker_cores

    @property
    def scheduler_argv(self) -> tuple[str, ...]:
        """``scheduler_cmd`` split like a shell would."""
        return tuple(shlex.split(self.scheduler_cmd))

    @property
    def worker_argv(self) -> tuple[str, ...]:
        """``worker_cmd`` split like a shell would."""
        return tuple(shlex.split(self.worker_cmd))

    @property
    def max_workers(self) -> int | None:
        """The effective worker limit of §6.4, or ``None`` when unlimited.

        The smallest of ``cluster_max_workers``, ``(cluster_max_memory - scheduler_memory)
        // worker_memory`` and ``floor((cluster_max_cores - scheduler_cores) /
        worker_cores)``, among those that are set; never below 0.
        """
        limits: list[int] = []
        if self.cluster_max_workers is not None:
            limits.append(self.cluster_max_workers)
        if self.cluster_max_memory is not None:
            spare = self.cluster_max_memory - self.scheduler_memory
            limits.append(spare // self.worker_memory if self.worker_memory > 0 else 0)
        if self.cluster_max_cores is not None:
            spare_cores = self.cluster_max_cores - self.scheduler_cores
            # A small epsilon so that e.g. 0.3 - 0.1 cores still counts as 0.2.
            limits.append(math.floor(spare_cores / self.worker_cores + 1e-9))
        if not limits:
            return None
        return max(0, min(limits))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict that :meth:`from_dict` turns back into an equal config."""
        return {
            f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v)
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterConfig:
        """Rebuild a config saved with :meth:`to_dict`. Raises :class:`ClusterConfigError`."""
        return resolve_cluster_config(data, {})


#: Names of every ClusterConfig field (the keys an override may set).
CLUSTER_CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ClusterConfig))


# --- validation -------------------------------------------------------------------------


def _int(name: str, value: Any, minimum: int, problems: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{name} must be an integer >= {minimum}, got {value!r}")
        return None
    if value < minimum:
        problems.append(f"{name} must be an integer >= {minimum}, got {value!r}")
        return None
    return value


def _float(name: str, value: Any, problems: list[str], *, positive: bool) -> float | None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (value > 0 if positive else value >= 0)
    )
    if not ok:
        what = "a number > 0" if positive else "a number >= 0"
        problems.append(f"{name} must be {what}, got {value!r}")
        return None
    return float(value)


def _memory(name: str, value: Any, problems: list[str]) -> int | None:
    try:
        return parse_memory(value)
    except ValueError as exc:
        problems.append(f"{name}: {exc}")
        return None


def _command(name: str, value: Any, problems: list[str]) -> str | None:
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return shlex.join(value)
    if not isinstance(value, str):
        problems.append(f"{name} must be a command string, got {value!r}")
        return None
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        problems.append(f"{name} is not a valid command line ({exc}): {value!r}")
        return None
    if not argv:
        problems.append(f"{name} must not be empty")
        return None
    return value


def _environment(name: str, value: Any, problems: list[str]) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        problems.append(f"{name} must be a mapping of strings to strings, got {value!r}")
        return None
    bad = [k for k, v in value.items() if not isinstance(k, str) or not k or not isinstance(v, str)]
    if bad:
        problems.append(
            f"{name} must be a mapping of strings to strings; bad entries for keys {sorted(map(str, bad))!r}"
        )
        return None
    return dict(value)


def check_cluster_config(values: Mapping[str, Any]) -> tuple[ClusterConfig | None, list[str]]:
    """Validate a full mapping of config values; return ``(config, [])`` or ``(None, problems)``.

    ``values`` may omit keys (their defaults apply) but must not hold unknown keys. Each
    problem message names its key. Used by :func:`resolve_cluster_config` and by the
    settings loader, which wants every problem at once.
    """
    problems: list[str] = []
    unknown = sorted(str(k) for k in values if k not in CLUSTER_CONFIG_FIELDS)
    if unknown:
        problems.append(f"Unknown cluster config fields {unknown!r}")
    d = ClusterConfig()
    get = values.get

    scheduler_cmd = _command("scheduler_cmd", get("scheduler_cmd", d.scheduler_cmd), problems)
    worker_cmd = _command("worker_cmd", get("worker_cmd", d.worker_cmd), problems)
    environment = _environment("environment", get("environment", d.environment), problems)
    worker_cores = _int("worker_cores", get("worker_cores", d.worker_cores), 1, problems)
    threads_value = get("worker_threads", d.worker_threads)
    worker_threads = (
        None if threads_value is None else _int("worker_threads", threads_value, 1, problems)
    )
    worker_memory = _memory("worker_memory", get("worker_memory", d.worker_memory), problems)
    if worker_memory is not None and worker_memory <= 0:
        problems.append(f"worker_memory must be more than 0 bytes, got {worker_memory}")
    scheduler_cores = _int(
        "scheduler_cores", get("scheduler_cores", d.scheduler_cores), 1, problems
    )
    scheduler_memory = _memory(
        "scheduler_memory", get("scheduler_memory", d.scheduler_memory), problems
    )
    if scheduler_memory is not None and scheduler_memory <= 0:
        problems.append(f"scheduler_memory must be more than 0 bytes, got {scheduler_memory}")
    adaptive_period = _float(
        "adaptive_period", get("adaptive_period", d.adaptive_period), problems, positive=True
    )
    idle_timeout = _float(
        "idle_timeout", get("idle_timeout", d.idle_timeout), problems, positive=False
    )
    max_cores_value = get("cluster_max_cores")
    max_cores = (
        None
        if max_cores_value is None
        else _float("cluster_max_cores", max_cores_value, problems, positive=False)
    )
    max_memory_value = get("cluster_max_memory")
    max_memory = (
        None
        if max_memory_value is None
        else _memory("cluster_max_memory", max_memory_value, problems)
    )
    max_workers_value = get("cluster_max_workers")
    max_workers = (
        None
        if max_workers_value is None
        else _int("cluster_max_workers", max_workers_value, 0, problems)
    )
    extra_value = get("extra", {})
    extra: dict[str, Any] | None
    if isinstance(extra_value, Mapping) and all(isinstance(k, str) for k in extra_value):
        extra = dict(extra_value)
    else:
        problems.append(f"extra must be a mapping with string keys, got {extra_value!r}")
        extra = None

    if problems:
        return None, problems
    assert worker_cores is not None and scheduler_cores is not None  # for type checkers
    assert scheduler_memory is not None
    if max_memory is not None and scheduler_memory > max_memory:
        problems.append(
            f"Scheduler memory request of {format_memory(scheduler_memory)} exceeds "
            f"cluster memory limit of {format_memory(max_memory)}"
        )
    if max_cores is not None and scheduler_cores > max_cores:
        problems.append(
            f"Scheduler cores request of {scheduler_cores} exceeds cluster cores limit "
            f"of {format_cores(max_cores)}"
        )
    if problems:
        return None, problems
    config = ClusterConfig(
        scheduler_cmd=scheduler_cmd,  # type: ignore[arg-type]
        worker_cmd=worker_cmd,  # type: ignore[arg-type]
        environment=environment,  # type: ignore[arg-type]
        worker_cores=worker_cores,
        worker_threads=worker_threads,
        worker_memory=worker_memory,  # type: ignore[arg-type]
        scheduler_cores=scheduler_cores,
        scheduler_memory=scheduler_memory,
        adaptive_period=adaptive_period,  # type: ignore[arg-type]
        idle_timeout=idle_timeout,  # type: ignore[arg-type]
        cluster_max_cores=max_cores,
        cluster_max_memory=max_memory,
        cluster_max_workers=max_workers,
        extra=extra,  # type: ignore[arg-type]
    )
    return config, []


def merge_overrides(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay ``overrides`` on ``defaults`` by the rules in the module docstring.

    Raises :class:`ClusterConfigError` for override keys that are neither config fields
    nor declared extras.
    """
    merged = dict(defaults)
    default_extra = defaults.get("extra") or {}
    extra = dict(default_extra) if isinstance(default_extra, Mapping) else default_extra
    unknown: list[str] = []
    for key, value in overrides.items():
        if key == "environment" and isinstance(value, Mapping):
            base = merged.get("environment") or {}
            merged["environment"] = {**base, **value} if isinstance(base, Mapping) else value
        elif key == "extra" and isinstance(value, Mapping) and isinstance(extra, dict):
            extra.update(value)
        elif key in CLUSTER_CONFIG_FIELDS:
            merged[key] = value
        elif isinstance(extra, dict) and isinstance(key, str) and key in default_extra:
            extra[key] = value
        else:
            unknown.append(str(key))
    if unknown:
        raise ClusterConfigError(f"Unknown cluster config fields {sorted(unknown)!r}")
    merged["extra"] = extra
    return merged


def resolve_cluster_config(
    defaults: Mapping[str, Any] | ClusterConfig, overrides: Mapping[str, Any]
) -> ClusterConfig:
    """Build a :class:`ClusterConfig` from server defaults and per-cluster overrides.

    Raises :class:`ClusterConfigError` (a ``ValueError``, HTTP 422) naming every problem,
    including the §6.4 messages ``Scheduler memory request of <m> exceeds cluster memory
    limit of <l>`` and ``Scheduler cores request of <c> exceeds cluster cores limit of <l>``.
    """
    base = defaults.to_dict() if isinstance(defaults, ClusterConfig) else defaults
    merged = merge_overrides(base, overrides)
    config, problems = check_cluster_config(merged)
    if config is None:
        raise ClusterConfigError("; ".join(problems))
    return config
