"""Limits: request-body checks and clamps for scale/adapt, and per-user budgets.

Two kinds of limit, both pure arithmetic:

* **Per cluster** (spec §1.2, §6.4): ``ClusterConfig.max_workers``. Scale and adapt
  requests above it are *not errors*: they are reduced, and the reply is ``200 {"ok":
  false, "msg": ...}`` which the client turns into a ``GatewayWarning``
  (:func:`clamp_scale`, :func:`clamp_adapt`).
* **Per user** (spec §6.5, our addition mapped onto the current wire): a maximum number
  of active clusters, total cores and total memory over the user's active clusters
  (scheduler plus workers of each). Creating a cluster over a budget is a 422
  (:func:`check_new_cluster` raises :class:`LimitError`); scaling over it is reduced
  with a warning (:func:`clamp_to_user_limits`, :func:`clamp_adapt_to_user_limits`).

:func:`limit_scale` and :func:`limit_adapt` apply both, per-cluster first, and are what
the manager calls. Usage of a cluster counts its scheduler plus its desired worker
count (see :func:`cluster_usage`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dask_gateway_common.errors import GatewayError

from .resources import ClusterConfig, format_cores, format_memory

__all__ = [
    "InvalidRequest",
    "LimitError",
    "Usage",
    "UserLimits",
    "check_new_cluster",
    "clamp_adapt",
    "clamp_adapt_to_user_limits",
    "clamp_scale",
    "clamp_to_user_limits",
    "cluster_usage",
    "limit_adapt",
    "limit_scale",
    "total_usage",
    "validate_adapt_body",
    "validate_scale_body",
    "validate_scale_count",
]


class LimitError(GatewayError, ValueError):
    """A request would exceed a limit (HTTP 422, client ``ValueError``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=422)


class InvalidRequest(GatewayError, ValueError):
    """A scale/adapt request body is malformed (HTTP 422, client ``ValueError``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=422)


# --- request bodies ---------------------------------------------------------------------


def validate_scale_count(value: Any) -> int:
    """Check the ``count`` of a scale request: a non-negative integer.

    As upstream (spec §1.2 note), JSON ``true`` passes, as 1 (``false`` as 0).
    """
    if not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"Scale expects a non-negative integer, got {value}")
    return int(value)


def validate_scale_body(body: Any) -> int:
    """The count of a scale request body ``{"count": n}`` (a missing count is ``None``)."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"Scale expects a JSON object body, got {type(body).__name__}")
    return validate_scale_count(body.get("count"))


def _adapt_bound(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(
            f"Adapt expects {key} to be a non-negative integer or null, got {value!r}"
        )
    return value


def validate_adapt_body(body: Any) -> tuple[int | None, int | None, bool]:
    """``(minimum, maximum, active)`` of ``{"minimum": n|null, "maximum": n|null, "active":
    bool}``; missing bounds are null, a missing ``active`` is true (as upstream)."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidRequest(f"Adapt expects a JSON object body, got {type(body).__name__}")
    minimum = _adapt_bound(body, "minimum")
    maximum = _adapt_bound(body, "maximum")
    active = body.get("active", True)
    if not isinstance(active, bool):
        raise InvalidRequest(f"Adapt expects active to be true or false, got {active!r}")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise InvalidRequest(
            f"Adapt expects minimum <= maximum, got minimum={minimum}, maximum={maximum}"
        )
    return minimum, maximum, active


# --- per-cluster clamps (§1.2) ----------------------------------------------------------


def clamp_scale(count: int, max_workers: int | None) -> tuple[int, str | None]:
    """Reduce a scale request to ``max_workers``; the message is the §1.2 warning."""
    if max_workers is None or count <= max_workers:
        return count, None
    return max_workers, (
        f"Scale request of {count} workers would exceed resource limit of "
        f"{max_workers} workers. Scaling to {max_workers} instead."
    )


def clamp_adapt(
    minimum: int | None, maximum: int | None, max_workers: int | None
) -> tuple[int | None, int | None, str | None]:
    """Bound an adapt request by ``max_workers`` (spec E9).

    With a limit, a null maximum becomes the limit and a null minimum becomes 0; if either
    bound exceeds the limit both are reduced to at most the limit, with the warning.
    """
    if max_workers is None:
        return minimum, maximum, None
    maximum = max_workers if maximum is None else maximum
    minimum = 0 if minimum is None else minimum
    if maximum <= max_workers and minimum <= max_workers:
        return minimum, maximum, None
    new_max, new_min = min(maximum, max_workers), min(minimum, max_workers)
    return (
        new_min,
        new_max,
        f"Adapt with `maximum={maximum}, minimum={minimum}` workers would exceed resource "
        f"limit of {max_workers} workers. Using `maximum={new_max}, minimum={new_min}` instead.",
    )


# --- per-user limits (§6.5) -------------------------------------------------------------


@dataclass(frozen=True)
class UserLimits:
    """Per-user budgets over active clusters; ``None`` = unlimited."""

    max_clusters: int | None = None
    max_cores: float | None = None
    max_memory: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.max_clusters is None and self.max_cores is None and self.max_memory is None


@dataclass(frozen=True)
class Usage:
    """What a set of active clusters holds: how many, total cores, total memory (bytes)."""

    clusters: int = 0
    cores: float = 0
    memory: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.clusters + other.clusters, self.cores + other.cores, self.memory + other.memory
        )


def cluster_usage(config: ClusterConfig, workers: int) -> Usage:
    """One active cluster with ``workers`` workers: its scheduler plus the workers."""
    return Usage(
        clusters=1,
        cores=config.scheduler_cores + workers * config.worker_cores,
        memory=config.scheduler_memory + workers * config.worker_memory,
    )


def total_usage(clusters: Iterable[tuple[ClusterConfig, int]]) -> Usage:
    """Sum :func:`cluster_usage` over ``(config, workers)`` pairs."""
    total = Usage()
    for config, workers in clusters:
        total = total + cluster_usage(config, workers)
    return total


def check_new_cluster(limits: UserLimits, active_usage: Usage, new_config: ClusterConfig) -> None:
    """Raise :class:`LimitError` if a new cluster (scheduler only, no workers yet) would
    exceed one of the user's budgets; the message says which one."""
    if limits.max_clusters is not None and active_usage.clusters + 1 > limits.max_clusters:
        raise LimitError(
            "Cannot start new cluster, would exceed user limit of "
            f"{limits.max_clusters} active clusters."
        )
    if limits.max_cores is not None and (
        active_usage.cores + new_config.scheduler_cores > limits.max_cores + 1e-9
    ):
        raise LimitError(
            "Cannot start a new cluster, would exceed user cores limit of "
            f"{format_cores(limits.max_cores)}"
        )
    if limits.max_memory is not None and (
        active_usage.memory + new_config.scheduler_memory > limits.max_memory
    ):
        raise LimitError(
            "Cannot start a new cluster, would exceed user memory limit of "
            f"{format_memory(limits.max_memory)}"
        )


def _user_worker_allowance(
    limits: UserLimits, usage: Usage, config: ClusterConfig
) -> tuple[int | None, str]:
    """Most workers this cluster may have within the user's budgets, and which budget binds."""
    best: int | None = None
    reason = ""
    if limits.max_cores is not None:
        spare = limits.max_cores - usage.cores - config.scheduler_cores
        n = max(0, math.floor(spare / config.worker_cores + 1e-9))
        best, reason = n, f"user cores limit of {format_cores(limits.max_cores)}"
    if limits.max_memory is not None:
        spare_memory = limits.max_memory - usage.memory - config.scheduler_memory
        n = max(0, spare_memory // config.worker_memory)
        if best is None or n < best:
            best, reason = n, f"user memory limit of {format_memory(limits.max_memory)}"
    return best, reason


def _scale_msg(requested: int, reason: str, allowed: int) -> str:
    return (
        f"Scale request of {requested} workers would exceed {reason}. Scaling to {allowed} instead."
    )


def _adapt_msg(
    maximum: int | None, minimum: int | None, reason: str, new_max: int, new_min: int
) -> str:
    return (
        f"Adapt with `maximum={maximum}, minimum={minimum}` workers would exceed {reason}. "
        f"Using `maximum={new_max}, minimum={new_min}` instead."
    )


def clamp_to_user_limits(
    limits: UserLimits,
    usage_excluding_this_cluster: Usage,
    config: ClusterConfig,
    requested_workers: int,
) -> tuple[int, str | None]:
    """Reduce a worker count so the user's total stays within budget.

    ``usage_excluding_this_cluster`` is the usage of the user's *other* active clusters.
    """
    allowed, reason = _user_worker_allowance(limits, usage_excluding_this_cluster, config)
    if allowed is None or requested_workers <= allowed:
        return requested_workers, None
    return allowed, _scale_msg(requested_workers, reason, allowed)


def clamp_adapt_to_user_limits(
    limits: UserLimits,
    usage_excluding_this_cluster: Usage,
    config: ClusterConfig,
    minimum: int | None,
    maximum: int | None,
) -> tuple[int | None, int | None, str | None]:
    """Like :func:`clamp_adapt`, with the user's remaining budget as the worker limit."""
    allowed, reason = _user_worker_allowance(limits, usage_excluding_this_cluster, config)
    if allowed is None:
        return minimum, maximum, None
    new_min, new_max, msg = clamp_adapt(minimum, maximum, allowed)
    if msg is None:
        return new_min, new_max, None
    assert new_min is not None and new_max is not None
    shown_max = allowed if maximum is None else maximum
    shown_min = 0 if minimum is None else minimum
    return new_min, new_max, _adapt_msg(shown_max, shown_min, reason, new_max, new_min)


def limit_scale(
    count: int, config: ClusterConfig, limits: UserLimits, usage_excluding_this_cluster: Usage
) -> tuple[int, str | None]:
    """Apply the cluster limit, then the user budgets, to a (validated) scale count.

    The message names the last limit that reduced the count and the original request
    (``None`` if nothing was reduced).
    """
    clamped, msg = clamp_scale(count, config.max_workers)
    allowed, reason = _user_worker_allowance(limits, usage_excluding_this_cluster, config)
    if allowed is not None and clamped > allowed:
        return allowed, _scale_msg(count, reason, allowed)
    return clamped, msg


def limit_adapt(
    minimum: int | None,
    maximum: int | None,
    config: ClusterConfig,
    limits: UserLimits,
    usage_excluding_this_cluster: Usage,
) -> tuple[int | None, int | None, str | None]:
    """Bound a (validated) adapt request by the tighter of the cluster limit and the
    user's remaining budget; the message names that limit and the original request."""
    cluster_limit = config.max_workers
    allowed, reason = _user_worker_allowance(limits, usage_excluding_this_cluster, config)
    if allowed is None or (cluster_limit is not None and cluster_limit <= allowed):
        return clamp_adapt(minimum, maximum, cluster_limit)
    lo, hi, msg = clamp_adapt(minimum, maximum, allowed)
    if msg is None:
        return lo, hi, None
    assert lo is not None and hi is not None
    shown_max = allowed if maximum is None else maximum
    return lo, hi, _adapt_msg(shown_max, 0 if minimum is None else minimum, reason, hi, lo)
