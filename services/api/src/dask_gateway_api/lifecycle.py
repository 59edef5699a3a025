"""Cluster lifecycle: the status transition table and reconciliation decisions (§5.3, §7).

Theory of operation
-------------------
A cluster's state is the pair ``(status, target)``: ``status`` is what the wire shows,
``target`` where it is heading (RUNNING while alive, STOPPED or FAILED once it is being
torn down). Events move the pair through :data:`CLUSTER_TRANSITIONS`, a table in the
style of ``h11/_state.py``; an event the table does not list for the current status is a
bug in the caller and raises :class:`InvalidTransition`::

    PENDING --REGISTERED--> RUNNING        (first heartbeat: the scheduler is up)
    PENDING/RUNNING --STOP--> STOPPING     (target STOPPED: user, idle timeout, admin)
    PENDING/RUNNING --FAIL--> STOPPING     (target FAILED: a timeout, lost scheduler...)
    STOPPING --TORN_DOWN--> target         (the backend has stopped every process)

``STOP`` and ``FAIL`` are accepted, and change nothing, once the cluster is STOPPING or
finished: deleting a cluster is idempotent, and a late failure report for a cluster that
is already going away must not resurrect or re-fail it.

Workers have their own small table (:data:`WORKER_TRANSITIONS`).

Everything else here is a pure *decision*: given the records and an input (a heartbeat,
the clock), say what should happen, and let the manager do it:

* :func:`decide_heartbeat` -- reconcile the scheduler's view of its workers with ours;
* :func:`decide_timeouts` -- start timeout, heartbeat timeout, worker start timeout and
  the worker start-failure limit.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from dask_gateway_common.errors import GatewayError

from .models import Cluster, ClusterStatus, Worker, WorkerStatus

__all__ = [
    "CLUSTER_TRANSITIONS",
    "ClusterEvent",
    "Heartbeat",
    "HeartbeatDecision",
    "HeartbeatError",
    "InvalidTransition",
    "TimeoutDecision",
    "Timeouts",
    "WORKER_TRANSITIONS",
    "WorkerEvent",
    "apply_event",
    "cluster_transition",
    "decide_heartbeat",
    "decide_timeouts",
    "parse_heartbeat",
    "start_failures_exceeded",
    "worker_transition",
]


class InvalidTransition(RuntimeError):
    """An event that the transition table does not allow in the current status (a bug)."""


class ClusterEvent(enum.Enum):
    REGISTERED = "registered"  # first heartbeat from the scheduler
    STOP = "stop"  # stop requested (user, idle timeout, admin, shutdown)
    FAIL = "fail"  # failure detected (timeouts, lost scheduler, failed start...)
    TORN_DOWN = "torn_down"  # the backend finished stopping every process


_P, _R, _S = ClusterStatus.PENDING, ClusterStatus.RUNNING, ClusterStatus.STOPPING
_STOPPED, _FAILED = ClusterStatus.STOPPED, ClusterStatus.FAILED

#: ``(status, event) -> (new status, new target)``; ``None`` in the target slot means
#: "keep the current target", ``None`` as the status means "the current target".
CLUSTER_TRANSITIONS: dict[
    tuple[ClusterStatus, ClusterEvent], tuple[ClusterStatus | None, ClusterStatus | None]
] = {
    (_P, ClusterEvent.REGISTERED): (_R, _R),
    (_P, ClusterEvent.STOP): (_S, _STOPPED),
    (_R, ClusterEvent.STOP): (_S, _STOPPED),
    (_P, ClusterEvent.FAIL): (_S, _FAILED),
    (_R, ClusterEvent.FAIL): (_S, _FAILED),
    (_S, ClusterEvent.STOP): (_S, None),
    (_S, ClusterEvent.FAIL): (_S, None),
    (_S, ClusterEvent.TORN_DOWN): (None, None),
    (_STOPPED, ClusterEvent.STOP): (_STOPPED, None),
    (_STOPPED, ClusterEvent.FAIL): (_STOPPED, None),
    (_FAILED, ClusterEvent.STOP): (_FAILED, None),
    (_FAILED, ClusterEvent.FAIL): (_FAILED, None),
}


def cluster_transition(
    status: ClusterStatus, target: ClusterStatus, event: ClusterEvent
) -> tuple[ClusterStatus, ClusterStatus]:
    """The ``(status, target)`` after ``event``; raises :class:`InvalidTransition`."""
    try:
        new_status, new_target = CLUSTER_TRANSITIONS[(status, event)]
    except KeyError:
        raise InvalidTransition(
            f"cluster event {event.name} is not allowed in status {status.name}"
        ) from None
    if new_status is None:
        new_status = target
    return new_status, target if new_target is None else new_target


def apply_event(
    cluster: Cluster, event: ClusterEvent, *, now_ms: int, reason: str | None = None
) -> Cluster:
    """A copy of ``cluster`` after ``event``.

    Sets ``stop_time_ms`` when the cluster finishes (TORN_DOWN), and ``failure_reason``
    on the first FAIL that changes the target (``reason`` is for logs, never the wire).
    """
    status, target = cluster_transition(cluster.status, cluster.target, event)
    changes: dict[str, Any] = {"status": status, "target": target}
    if event is ClusterEvent.FAIL and target is _FAILED and cluster.target is not _FAILED:
        changes["failure_reason"] = reason
    if status.is_finished and cluster.stop_time_ms is None:
        changes["stop_time_ms"] = now_ms
    return replace(cluster, **changes)


class WorkerEvent(enum.Enum):
    STARTED = "started"  # the scheduler reports it (active or closing)
    STOP = "stop"  # we cancel it, or the scheduler retires it
    EXITED = "exited"  # gone, as expected
    LOST = "lost"  # gone unexpectedly / failed to start


_WP, _WR, _WS = WorkerStatus.PENDING, WorkerStatus.RUNNING, WorkerStatus.STOPPING
_WSTOPPED, _WFAILED = WorkerStatus.STOPPED, WorkerStatus.FAILED

#: ``(status, event) -> new status``.
WORKER_TRANSITIONS: dict[tuple[WorkerStatus, WorkerEvent], WorkerStatus] = {
    (_WP, WorkerEvent.STARTED): _WR,
    (_WR, WorkerEvent.STARTED): _WR,
    (_WP, WorkerEvent.STOP): _WS,
    (_WR, WorkerEvent.STOP): _WS,
    (_WS, WorkerEvent.STOP): _WS,
    (_WP, WorkerEvent.EXITED): _WSTOPPED,
    (_WR, WorkerEvent.EXITED): _WSTOPPED,
    (_WS, WorkerEvent.EXITED): _WSTOPPED,
    (_WP, WorkerEvent.LOST): _WFAILED,
    (_WR, WorkerEvent.LOST): _WFAILED,
    # A worker we were stopping that vanishes has stopped, as we wanted.
    (_WS, WorkerEvent.LOST): _WSTOPPED,
    (_WSTOPPED, WorkerEvent.STOP): _WSTOPPED,
    (_WSTOPPED, WorkerEvent.EXITED): _WSTOPPED,
    (_WSTOPPED, WorkerEvent.LOST): _WSTOPPED,
    (_WFAILED, WorkerEvent.STOP): _WFAILED,
    (_WFAILED, WorkerEvent.EXITED): _WFAILED,
    (_WFAILED, WorkerEvent.LOST): _WFAILED,
}


def worker_transition(status: WorkerStatus, event: WorkerEvent) -> WorkerStatus:
    """The worker status after ``event``; raises :class:`InvalidTransition`."""
    try:
        return WORKER_TRANSITIONS[(status, event)]
    except KeyError:
        raise InvalidTransition(
            f"worker event {event.name} is not allowed in status {status.name}"
        ) from None


# --- heartbeats -------------------------------------------------------------------------


class HeartbeatError(GatewayError, ValueError):
    """A heartbeat body the scheduler preload would never send (HTTP 422)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=422)


#: Upper bound on names per list in one heartbeat (a scheduler with more workers than this
#: is far beyond what one gateway runs; the bound keeps a hostile body cheap to reject).
MAX_HEARTBEAT_WORKERS = 100_000


@dataclass(frozen=True)
class Heartbeat:
    """A parsed E10 body (§5.3)."""

    scheduler_address: str
    dashboard_address: str
    api_address: str
    count: int
    active_workers: frozenset[str]
    closing_workers: frozenset[str]
    closed_workers: frozenset[str]


def _names(body: dict[str, Any], key: str) -> frozenset[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HeartbeatError(f"heartbeat field {key!r} must be a list of worker names")
    if len(value) > MAX_HEARTBEAT_WORKERS:
        raise HeartbeatError(f"heartbeat field {key!r} lists too many workers")
    return frozenset(value)


def parse_heartbeat(body: Any) -> Heartbeat:
    """Validate a heartbeat body; raises :class:`HeartbeatError` with a clear message."""
    if not isinstance(body, dict):
        raise HeartbeatError(f"heartbeat body must be a JSON object, got {type(body).__name__}")
    addresses = {}
    for key in ("scheduler_address", "dashboard_address", "api_address"):
        value = body.get(key, "")
        if not isinstance(value, str):
            raise HeartbeatError(f"heartbeat field {key!r} must be a string")
        addresses[key] = value
    count = body.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise HeartbeatError("heartbeat field 'count' must be a non-negative integer")
    return Heartbeat(
        count=count,
        active_workers=_names(body, "active_workers"),
        closing_workers=_names(body, "closing_workers"),
        closed_workers=_names(body, "closed_workers"),
        **addresses,
    )


@dataclass
class HeartbeatDecision:
    """What to do with the workers after one heartbeat (apply in any order).

    * ``mark_running``: PENDING workers the scheduler now knows -> RUNNING.
    * ``mark_closing``: workers the scheduler is retiring -> ``close_expected = True``
      (they stay RUNNING until they show up in ``closed_workers``).
    * ``mark_stopped``: workers that left as expected -> STOPPED (stop their process if
      it lingers).
    * ``mark_failed``: workers that left unexpectedly -> FAILED; they are replaced
      (``launch`` counts the replacements).
    * ``cancel``: pending workers beyond the desired count, in the order to cancel them
      (records never launched first, then the newest) -> stop them, STOPPED.
    * ``launch``: how many new workers to create and start.
    * ``start_failures``: how many of ``mark_failed`` never ran (add to the cluster's
      consecutive start-failure counter); ``reset_start_failures``: a worker started, so
      reset that counter first.
    """

    mark_running: set[str] = field(default_factory=set)
    mark_closing: set[str] = field(default_factory=set)
    mark_stopped: set[str] = field(default_factory=set)
    mark_failed: set[str] = field(default_factory=set)
    cancel: list[str] = field(default_factory=list)
    launch: int = 0
    start_failures: int = 0
    reset_start_failures: bool = False


def decide_heartbeat(
    cluster_count_clamped: int, workers: Iterable[Worker], msg: Heartbeat
) -> HeartbeatDecision:
    """Reconcile our worker records with the scheduler's view (spec §5.3).

    ``cluster_count_clamped`` is the heartbeat's ``count`` after the cluster and user
    limits. For each worker not yet finished (STOPPED/FAILED records are history), the
    first matching rule wins:

    1. listed in ``closing_workers``: the scheduler is retiring it. Mark it closing (its
       exit will be expected); if it was PENDING it evidently started: mark it running.
       It no longer counts toward the desired size.
    2. listed in ``active_workers``: PENDING -> mark running (and reset the start-failure
       counter). Counts as *active*, unless we are already stopping it.
    3. listed in ``closed_workers`` (the scheduler saw it leave): expected
       (``close_expected`` or STOPPING) -> mark stopped; otherwise -> mark failed, and if
       it never ran, count a start failure.
    4. unlisted: PENDING -> *pending* (launched or not, the scheduler has not seen it
       yet). RUNNING but unlisted (e.g. a heartbeat racing its registration) counts as
       *active*. STOPPING -> ignored (already going away).

    Then ``excess = active + pending - count``: that many pending workers are cancelled
    (never-launched records first, then newest first: they are the cheapest to drop and
    the least likely to be about to join). Running workers are never cancelled here: the
    scheduler chooses which to retire and reports them as closing. Finally ``launch =
    count - active - remaining pending`` (never negative) new workers are needed; this
    also replaces failed ones.
    """
    decision = HeartbeatDecision()
    active = 0
    pending: list[Worker] = []
    for w in workers:
        if w.status.is_finished:
            continue
        if w.name in msg.closing_workers:
            if not w.close_expected:
                decision.mark_closing.add(w.name)
            if w.status is WorkerStatus.PENDING:
                decision.mark_running.add(w.name)
                decision.reset_start_failures = True
        elif w.name in msg.active_workers:
            if w.status is WorkerStatus.PENDING:
                decision.mark_running.add(w.name)
                decision.reset_start_failures = True
            if w.status is not WorkerStatus.STOPPING:
                active += 1
        elif w.name in msg.closed_workers:
            if w.close_expected or w.status is WorkerStatus.STOPPING:
                decision.mark_stopped.add(w.name)
            else:
                decision.mark_failed.add(w.name)
                if w.status is WorkerStatus.PENDING:
                    decision.start_failures += 1
        elif w.status is WorkerStatus.PENDING:
            pending.append(w)
        elif w.status is WorkerStatus.RUNNING:
            active += 1
    excess = active + len(pending) - cluster_count_clamped
    if excess > 0:
        order = sorted(pending, key=lambda w: (w.launched, -w.start_time_ms))
        decision.cancel = [w.name for w in order[:excess]]
    remaining = len(pending) - len(decision.cancel)
    decision.launch = max(0, cluster_count_clamped - active - remaining)
    return decision


# --- timeouts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """The timers of §7.2, in seconds; 0 disables a timeout (or the failure limit)."""

    start_timeout: float = 60.0
    heartbeat_timeout: float = 30.0
    worker_start_timeout: float = 60.0
    worker_start_failure_limit: int = 3


@dataclass
class TimeoutDecision:
    """What the periodic check found.

    * ``fail_cluster``: a reason (for logs) when the cluster must FAIL, else ``None``.
    * ``fail_workers``: PENDING workers that did not start in time -> stop them, FAILED;
      each is a start failure (already counted in ``start_failures``).
    """

    fail_cluster: str | None = None
    fail_workers: list[str] = field(default_factory=list)
    start_failures: int = 0

    @property
    def empty(self) -> bool:
        return self.fail_cluster is None and not self.fail_workers


def _expired(now_ms: int, since_ms: int | None, timeout_s: float) -> bool:
    if timeout_s <= 0 or since_ms is None:
        return False
    return now_ms - since_ms > timeout_s * 1000


def _secs(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def decide_timeouts(
    now_ms: int, cluster: Cluster, workers: Iterable[Worker], config: Timeouts
) -> TimeoutDecision:
    """Check one cluster's timers (§7.2). Only active clusters are checked:

    * PENDING longer than ``start_timeout`` since creation -> fail the cluster;
    * RUNNING with no heartbeat for ``heartbeat_timeout`` (since the last heartbeat, or
      creation if none was recorded) -> fail the cluster;
    * a PENDING worker older than ``worker_start_timeout`` -> fail that worker; if the
      cluster's consecutive start failures plus these reach
      ``worker_start_failure_limit`` -> fail the cluster.
    """
    decision = TimeoutDecision()
    if not cluster.status.is_active:
        return decision
    if cluster.status is ClusterStatus.PENDING:
        if _expired(now_ms, cluster.start_time_ms, config.start_timeout):
            decision.fail_cluster = f"cluster did not start within {_secs(config.start_timeout)} s"
            return decision
    else:
        since = (
            cluster.last_heartbeat if cluster.last_heartbeat is not None else cluster.start_time_ms
        )
        if _expired(now_ms, since, config.heartbeat_timeout):
            decision.fail_cluster = (
                f"no heartbeat from the scheduler for {_secs(config.heartbeat_timeout)} s"
            )
            return decision
    for w in workers:
        if w.status is WorkerStatus.PENDING and _expired(
            now_ms, w.start_time_ms, config.worker_start_timeout
        ):
            decision.fail_workers.append(w.name)
    decision.start_failures = len(decision.fail_workers)
    limit = config.worker_start_failure_limit
    total = cluster.worker_start_failures + decision.start_failures
    if decision.start_failures and limit > 0 and total >= limit:
        decision.fail_cluster = f"{total} consecutive worker start failures (limit {limit})"
    return decision


def start_failures_exceeded(failures: int, limit: int) -> bool:
    """Whether ``failures`` consecutive worker start failures reach ``limit`` (0 = never)."""
    return limit > 0 and failures >= limit
