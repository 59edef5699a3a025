"""Cluster and worker records, statuses, and the cluster object on the wire (spec §1.3, §7).

The records are plain mutable dataclasses owned by the manager and persisted by the store;
everything that decides how they change lives in :mod:`.lifecycle`. Times are integer
milliseconds since the Unix epoch.

:func:`to_wire` is the only way a cluster leaves the API: the official client turns every
key of the object into a constructor argument, so an extra key crashes it. The function
therefore builds the object from scratch with exactly the keys of §1.3.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .resources import ClusterConfig

__all__ = [
    "ACTIVE_STATUSES",
    "Cluster",
    "ClusterStatus",
    "WIRE_KEYS",
    "Worker",
    "WorkerStatus",
    "dashboard_route",
    "parse_status_filter",
    "to_wire",
]


class ClusterStatus(enum.IntEnum):
    """Wire statuses of a cluster (§7.1); sent by name, never by number."""

    PENDING = 1
    RUNNING = 2
    STOPPING = 3
    STOPPED = 4
    FAILED = 5

    @property
    def is_active(self) -> bool:
        """PENDING or RUNNING: counts toward limits, shown by default in lists."""
        return self in ACTIVE_STATUSES

    @property
    def is_finished(self) -> bool:
        """STOPPED or FAILED: nothing runs any more."""
        return self >= ClusterStatus.STOPPED

    @classmethod
    def from_name(cls, name: str) -> ClusterStatus:
        """Case-insensitive lookup; ``ValueError("'<name>' is not a valid ClusterStatus")``."""
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"{name!r} is not a valid ClusterStatus") from None


ACTIVE_STATUSES = frozenset({ClusterStatus.PENDING, ClusterStatus.RUNNING})


class WorkerStatus(enum.IntEnum):
    """Statuses of one worker (internal only, never on the wire)."""

    PENDING = 1  # record created; process launched (``launched``) or about to be
    RUNNING = 2  # seen by the scheduler
    STOPPING = 3  # cancelled / retiring; process being stopped
    STOPPED = 4  # gone as expected
    FAILED = 5  # gone unexpectedly, or never started

    @property
    def is_finished(self) -> bool:
        return self >= WorkerStatus.STOPPED


def parse_status_filter(value: str) -> set[ClusterStatus]:
    """Parse E4's ``?status=`` value: comma-separated names, case-insensitive.

    Raises ``ValueError("'<token>' is not a valid ClusterStatus")`` for the first bad
    token (an empty value or an empty token is bad too, as upstream).
    """
    return {ClusterStatus.from_name(token) for token in value.split(",")}


@dataclass
class Cluster:
    """One cluster's record. Secrets (``token``, ``key_pem``) never appear in repr."""

    name: str
    username: str
    token: str = field(repr=False)
    status: ClusterStatus
    #: The validated user options (§6.3), defaults filled in: what the wire shows.
    options: dict[str, Any]
    config: ClusterConfig
    cert_pem: str = field(repr=False)
    key_pem: str = field(repr=False)
    start_time_ms: int
    stop_time_ms: int | None = None
    #: Where the status is heading: RUNNING while alive; STOPPED or FAILED once stopping.
    target: ClusterStatus = ClusterStatus.RUNNING
    scheduler_address: str = ""
    dashboard_address: str = ""
    api_address: str = ""
    #: Desired number of workers (the scheduler's count, clamped).
    count: int = 0
    adaptive: bool = False
    adapt_minimum: int | None = None
    adapt_maximum: int | None = None
    #: Time (ms) of the last heartbeat from the scheduler, ``None`` before the first.
    last_heartbeat: int | None = None
    #: Consecutive worker start failures (reset when a worker starts).
    worker_start_failures: int = 0
    #: Backend data for the scheduler (pids, paths...), JSON-able.
    state: dict[str, Any] = field(default_factory=dict)
    failure_reason: str | None = None

    @property
    def is_active(self) -> bool:
        return self.status.is_active


@dataclass
class Worker:
    """One worker's record (name = ``--name`` given to ``dask worker``)."""

    name: str
    cluster_name: str
    status: WorkerStatus = WorkerStatus.PENDING
    #: Creation time of the record (ms).
    start_time_ms: int = 0
    stop_time_ms: int | None = None
    #: The scheduler chose to retire it (or we cancelled it): its exit is not a failure.
    close_expected: bool = False
    #: Whether the backend was asked to start its process (False = record only).
    launched: bool = False
    #: Backend data (pid...), JSON-able.
    state: dict[str, Any] = field(default_factory=dict)


#: Every key a cluster object may have on the wire (§1.3). Nothing else, ever.
WIRE_KEYS = frozenset(
    {"name", "status", "dashboard_route", "start_time", "stop_time", "options"}
    | {"tls_cert", "tls_key"}
)


def dashboard_route(cluster: Cluster) -> str | None:
    """``/clusters/{name}/status`` when RUNNING with a dashboard, else ``None``."""
    if cluster.status is ClusterStatus.RUNNING and cluster.dashboard_address:
        return f"/clusters/{cluster.name}/status"
    return None


def to_wire(cluster: Cluster, *, include_tls: bool = True) -> dict[str, Any]:
    """The cluster object of §1.3, with exactly the allowed keys.

    ``status`` is the name; ``tls_cert``/``tls_key`` hold the PEMs only while RUNNING
    (null otherwise) and are left out entirely with ``include_tls=False``.
    """
    obj: dict[str, Any] = {
        "name": cluster.name,
        "status": cluster.status.name,
        "dashboard_route": dashboard_route(cluster),
        "start_time": cluster.start_time_ms,
        "stop_time": cluster.stop_time_ms,
        "options": cluster.options,
    }
    if include_tls:
        running = cluster.status is ClusterStatus.RUNNING
        obj["tls_cert"] = cluster.cert_pem if running else None
        obj["tls_key"] = cluster.key_pem if running else None
    return obj
