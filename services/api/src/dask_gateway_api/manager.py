"""The cluster manager: the one place where cluster state changes.

Theory of operation
-------------------
The manager keeps every cluster and its workers in memory (``Cluster`` / ``Worker`` records
from :mod:`.models`), writes each change through to the :class:`~.store.Store`, drives the
:class:`~.backends.Backend`, and publishes routes to the :class:`RouteFeed`. Decisions are
made by the pure functions of :mod:`.lifecycle`, :mod:`.limits` and :mod:`.options`; this
module only executes them.

All methods run on the trio thread and mutate state only between awaits, so no locks are
needed: a method reads a record, awaits I/O, then re-reads the record before acting on it.

Life of a cluster:

* ``create`` validates options, resolves the config, checks the user's limits, makes the
  name, token and TLS credentials, persists a PENDING record, starts the scheduler in the
  background and returns the name at once.
* The scheduler's first heartbeat registers it: addresses are stored, the SNI route
  (``name → tls://host:port``) and the dashboard PATH route are published *before* the
  status becomes RUNNING, then waiters (``GET ?wait``) are woken.
* Every heartbeat reconciles workers (``decide_heartbeat``): workers are launched,
  cancelled, marked running/closing/stopped/failed.
* ``stop`` (or a failure) moves the cluster to STOPPING, deletes its routes and tears the
  processes down in the background; then it is STOPPED or FAILED.
* One timer task (``run``) checks the lifecycle timeouts and expires old records; one
  small watcher task per scheduler (and per worker not yet running) notices a process
  exit at once (``Backend.wait_exit``).

Restart: ``run`` first reloads every record, re-adopts the processes that still live
(re-publishing routes of RUNNING clusters), fails clusters whose scheduler died, and resumes
interrupted teardowns. With ``stop_clusters_on_shutdown`` off (the default) leaving
``run`` leaves clusters running for the next start to adopt.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import h11
import trio

from dask_gateway_common.errors import GatewayError
from dask_gateway_common.feed import RouteFeed
from dask_gateway_common.http import HTTPClient
from dask_gateway_common.routes import Route, RouteError
from dask_gateway_common.tls import generate_cluster_credentials

from .backends.base import Backend, BackendError, ClusterLaunch, State
from .lifecycle import (
    ClusterEvent,
    Heartbeat,
    HeartbeatError,
    Timeouts,
    WorkerEvent,
    apply_event,
    decide_heartbeat,
    decide_timeouts,
    parse_heartbeat,
    start_failures_exceeded,
    worker_transition,
)
from .limits import (
    Usage,
    UserLimits,
    check_new_cluster,
    cluster_usage,
    limit_adapt,
    limit_scale,
)
from .models import Cluster, ClusterStatus, Worker, WorkerStatus
from .options import OptionsConfig
from .resources import ClusterConfig, resolve_cluster_config
from .store import (
    ClusterStore,
    cluster_from_row,
    cluster_to_row,
    worker_from_row,
    worker_to_row,
)

__all__ = ["ClusterManager", "ManagerConfig", "not_running"]

log = logging.getLogger("dask_gateway.api.manager")

_FORWARD_ERRORS = (
    OSError,
    ValueError,
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.ProtocolError,
    GatewayError,
)


@dataclass(frozen=True)
class ManagerConfig:
    """Everything the manager needs from the settings (built by ``main``)."""

    cluster_defaults: ClusterConfig = field(default_factory=ClusterConfig)
    options: OptionsConfig = field(default_factory=OptionsConfig)
    user_limits: UserLimits = field(default_factory=UserLimits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    #: ``--dg-heartbeat-period`` given to schedulers (seconds).
    heartbeat_period: float = 15.0
    #: Public path prefix ("" or "/svc"): dashboard routes are ``<prefix>/clusters/<name>``.
    prefix: str = ""
    #: How often the timer task runs (seconds).
    check_period: float = 1.0
    #: Finished cluster records are deleted this many seconds after they stopped (0: never).
    record_max_age: float = 24 * 3600.0
    #: How often expired records are looked for (seconds).
    expiry_period: float = 60.0
    #: Stop (FAIL) every active cluster when the API shuts down.
    stop_clusters_on_shutdown: bool = False
    #: Key type of per-cluster credentials: "ec" (fast) or "rsa" (as upstream).
    key_type: str = "ec"
    #: Attempts and per-attempt timeout when forwarding scale/adapt to a scheduler.
    scheduler_api_retries: int = 3
    scheduler_api_timeout: float = 10.0
    #: Hard upper bound on workers per cluster, whatever the cluster config says.
    max_workers_per_cluster: int = 10_000
    #: How long ``GET ?wait`` blocks at most (seconds).
    wait_timeout: float = 20.0
    #: Upper bound of a graceful stop of all clusters at shutdown (seconds).
    shutdown_timeout: float = 30.0


def not_running(name: str) -> GatewayError:
    """The 409 of scale/adapt on a cluster that is not (or no longer) running."""
    return GatewayError(f"cluster {name} is not running", status=409)


def _now_ms() -> int:
    return int(time.time() * 1000)


class ClusterManager:
    """Creates, tracks, scales and stops clusters. Run :meth:`run` in a nursery first."""

    def __init__(
        self,
        config: ManagerConfig,
        store: ClusterStore,
        backend: Backend,
        feed: RouteFeed,
        http: HTTPClient,
        *,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.config = config
        self.store = store
        self.backend = backend
        self.feed = feed
        self.http = http
        self._clock = clock
        self._clusters: dict[str, Cluster] = {}
        self._workers: dict[str, dict[str, Worker]] = {}
        self._changed: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self._api_url = ""
        self._api_ready = trio.Event()
        self._last_expiry = -math.inf

    # ------------------------------------------------------------------ queries

    @property
    def running(self) -> bool:
        """Whether :meth:`run` has started (the API may serve requests)."""
        return self._nursery is not None

    def get(self, name: str) -> Cluster | None:
        return self._clusters.get(name)

    @property
    def cluster_count(self) -> int:
        """Records held (active and finished, until they expire)."""
        return len(self._clusters)

    def workers(self, name: str) -> list[Worker]:
        return list(self._workers.get(name, {}).values())

    def list(self, username: str, statuses: Iterable[ClusterStatus]) -> list[Cluster]:
        wanted = set(statuses)
        return [c for c in self._clusters.values() if c.username == username and c.status in wanted]

    def options_for(self, user: Any) -> list[dict[str, Any]]:
        return self.config.options.spec_for(user).to_wire()

    def _usage(self, username: str, exclude: str | None = None) -> Usage:
        total = Usage()
        for c in self._clusters.values():
            if c.username == username and c.is_active and c.name != exclude:
                total = total + cluster_usage(c.config, c.count)
        return total

    # ------------------------------------------------------------------ bookkeeping

    def _notify(self, name: str) -> None:
        event = self._changed.pop(name, None)
        if event is not None:
            event.set()

    def _save_cluster(self, cluster: Cluster) -> None:
        self._clusters[cluster.name] = cluster
        row = cluster_to_row(cluster)
        self.store.update_cluster_state(row.name, row.status, row.stop_time, row.data)

    def _save_workers(self, workers: Iterable[Worker]) -> None:
        self.store.put_workers(worker_to_row(w) for w in workers)

    def _forget_worker(self, worker: Worker) -> None:
        """Drop a finished worker record (the scheduler's lists only grow; we need not)."""
        self._workers.get(worker.cluster_name, {}).pop(worker.name, None)
        self.store.delete_worker(worker.cluster_name, worker.name)

    def _event(self, name: str, event: ClusterEvent, reason: str | None = None) -> Cluster:
        cluster = apply_event(self._clusters[name], event, now_ms=self._clock(), reason=reason)
        self._save_cluster(cluster)
        self._notify(name)
        return cluster

    def _launch(self, cluster: Cluster) -> ClusterLaunch:
        config = cluster.config
        return ClusterLaunch(
            name=cluster.name,
            username=cluster.username,
            api_url=self._api_url,
            token=cluster.token,
            tls_cert=cluster.cert_pem.encode(),
            tls_key=cluster.key_pem.encode(),
            scheduler_cmd=config.scheduler_argv,
            worker_cmd=config.worker_argv,
            environment=config.environment,
            worker_threads=config.threads,
            worker_memory=config.worker_memory,
            heartbeat_period=self.config.heartbeat_period,
            adaptive_period=config.adaptive_period,
            idle_timeout=config.idle_timeout,
            scheduler_address=cluster.scheduler_address,
        )

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a background task. A bug in one cluster's task is logged with its traceback
        and must not take the whole control plane down with it."""
        assert self._nursery is not None, "ClusterManager.run() is not running"

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception:
                log.exception("Unexpected error in %s%r", fn.__name__, args)

        self._nursery.start_soon(guarded, name=fn.__name__)

    # ------------------------------------------------------------------ routes

    def _dashboard_path(self, name: str) -> str:
        return f"{self.config.prefix}/clusters/{name}"

    def _publish_routes(self, cluster: Cluster) -> None:
        self.feed.put(Route("SNI", cluster.name, cluster.scheduler_address))
        if cluster.dashboard_address:
            self.feed.put(
                Route("PATH", self._dashboard_path(cluster.name), cluster.dashboard_address)
            )

    def _delete_routes(self, name: str) -> None:
        self.feed.delete("SNI", name)
        self.feed.delete("PATH", self._dashboard_path(name))

    def set_api_address(self, api_url: str, route_target: str | None = None) -> None:
        """Tell the manager where schedulers reach the API (``.../api``) and publish the
        ``<prefix>/`` route to ``route_target`` so the web proxy fronts the API."""
        self._api_url = api_url.rstrip("/")
        if route_target:
            self.feed.put(Route("PATH", f"{self.config.prefix}/", route_target))
        self._api_ready.set()

    # ------------------------------------------------------------------ create

    async def create(self, user: Any, cluster_options: object) -> str:
        """Validate and record a new cluster, start it in the background; return its name.

        Raises ``GatewayError`` 422 (options, config, user limits) with the user's message.
        """
        spec = self.config.options.spec_for(user)
        options = spec.validate(cluster_options)
        overrides = spec.overrides_for(options, user)
        config = resolve_cluster_config(self.config.cluster_defaults, overrides)
        check_new_cluster(self.config.user_limits, self._usage(user.name), config)

        name = uuid.uuid4().hex
        token = uuid.uuid4().hex
        if self.config.key_type == "ec":  # well under a millisecond: fine on the loop
            cert, key = generate_cluster_credentials(name, key_type="ec")
        else:
            cert, key = await trio.to_thread.run_sync(
                lambda: generate_cluster_credentials(name, key_type=self.config.key_type)
            )
            # Other requests ran meanwhile: check the user's limits again, atomically
            # with recording the cluster (no await between the check and the insert).
            check_new_cluster(self.config.user_limits, self._usage(user.name), config)
        cluster = Cluster(
            name=name,
            username=user.name,
            token=token,
            status=ClusterStatus.PENDING,
            options=options,
            config=config,
            cert_pem=cert.decode(),
            key_pem=key.decode(),
            start_time_ms=self._clock(),
        )
        self.store.put_cluster(cluster_to_row(cluster))
        self._clusters[name] = cluster
        self._workers[name] = {}
        log.info("cluster %s: created for user %s", name, user.name)
        self._spawn(self._start_cluster, name)
        return name

    async def _start_cluster(self, name: str) -> None:
        await self._api_ready.wait()
        cluster = self._clusters.get(name)
        if cluster is None or cluster.status is not ClusterStatus.PENDING:
            return
        try:
            state = await self.backend.start_scheduler(self._launch(cluster))
        except BackendError as exc:
            log.warning("cluster %s: scheduler failed to start: %s", name, exc)
            await self.fail(name, f"scheduler failed to start: {exc}")
            return
        cluster = self._clusters.get(name)
        if cluster is None or cluster.status is not ClusterStatus.PENDING:
            # Stopped while launching: the teardown did not know this process yet.
            await self.backend.stop_cluster(name, state, {})
            return
        cluster.state = state
        self._save_cluster(cluster)
        self._spawn(self._watch_scheduler, name, state)

    async def _watch_scheduler(self, name: str, state: State) -> None:
        """Fail the cluster as soon as its scheduler process exits on its own."""
        await self.backend.wait_exit(state)
        cluster = self._clusters.get(name)
        if cluster is not None and cluster.is_active and cluster.state == state:
            await self.fail(name, "the scheduler process exited")

    # ------------------------------------------------------------------ wait / stop

    async def wait_ready(self, name: str, timeout: float | None = None) -> Cluster | None:
        """Block until the cluster leaves PENDING or ``timeout`` passes; return it."""
        timeout = self.config.wait_timeout if timeout is None else timeout
        with trio.move_on_after(timeout):
            while (cluster := self._clusters.get(name)) is not None and (
                cluster.status is ClusterStatus.PENDING
            ):
                await self._changed.setdefault(name, trio.Event()).wait()
        return self._clusters.get(name)

    async def stop(self, name: str) -> None:
        """Stop a cluster (idempotent; returns once it is STOPPING)."""
        self._begin_stop(name, ClusterEvent.STOP, None)

    async def fail(self, name: str, reason: str) -> None:
        """Fail a cluster (idempotent; returns once it is STOPPING or finished)."""
        self._begin_stop(name, ClusterEvent.FAIL, reason)

    def _begin_stop(self, name: str, event: ClusterEvent, reason: str | None) -> None:
        cluster = self._clusters.get(name)
        if cluster is None or not cluster.is_active:
            return
        if reason:
            log.warning("cluster %s: failing: %s", name, reason)
        else:
            log.info("cluster %s: stopping", name)
        self._delete_routes(name)
        self._event(name, event, reason)
        self._spawn(self._teardown, name)

    async def _teardown(self, name: str) -> None:
        cluster = self._clusters.get(name)
        if cluster is None or cluster.status is not ClusterStatus.STOPPING:
            return
        workers = self._workers.get(name, {})
        states = {w.name: w.state for w in workers.values() if w.launched}
        try:
            await self.backend.stop_cluster(name, cluster.state, states)
        except (BackendError, OSError) as exc:
            log.error("cluster %s: error while stopping processes: %s", name, exc)
        now = self._clock()
        finished = []
        for w in list(workers.values()):
            w.status = worker_transition(w.status, WorkerEvent.EXITED)
            w.stop_time_ms = w.stop_time_ms or now
            finished.append(w)
        for w in finished:
            self._forget_worker(w)
        cluster = self._event(name, ClusterEvent.TORN_DOWN)
        log.info("cluster %s: %s", name, cluster.status.name)

    # ------------------------------------------------------------------ scale / adapt

    async def scale(self, name: str, user: Any, count: int) -> tuple[bool, str | None]:
        """Forward a (validated) scale request, clamped to the limits; ``(ok, msg)``."""
        cluster = self._require_running(name)
        count, msg = limit_scale(
            count,
            self._limited(cluster.config),
            self.config.user_limits,
            self._usage(user.name, name),
        )
        await self._forward(name, {"op": "scale", "count": count})
        return msg is None, msg

    async def adapt(
        self, name: str, user: Any, minimum: int | None, maximum: int | None, active: bool
    ) -> tuple[bool, str | None]:
        """Forward a (validated) adapt request, clamped to the limits; ``(ok, msg)``."""
        cluster = self._require_running(name)
        msg = None
        if active:
            minimum, maximum, msg = limit_adapt(
                minimum,
                maximum,
                self._limited(cluster.config),
                self.config.user_limits,
                self._usage(user.name, name),
            )
        cluster.adaptive = active
        cluster.adapt_minimum, cluster.adapt_maximum = minimum, maximum
        self._save_cluster(cluster)
        await self._forward(
            name, {"op": "adapt", "minimum": minimum, "maximum": maximum, "active": active}
        )
        return msg is None, msg

    def _limited(self, config: ClusterConfig) -> ClusterConfig:
        """``config`` with the server's hard worker cap folded into ``cluster_max_workers``
        (a scale request of 10**9 must not make us create 10**9 worker records)."""
        cap = self.config.max_workers_per_cluster
        current = config.cluster_max_workers
        if current is not None and current <= cap:
            return config
        return replace(config, cluster_max_workers=cap)

    def _require_running(self, name: str) -> Cluster:
        cluster = self._clusters.get(name)
        if cluster is None or cluster.status is not ClusterStatus.RUNNING:
            raise not_running(name)
        return cluster

    async def _forward(self, name: str, message: dict[str, Any]) -> None:
        """POST ``message`` to the scheduler preload's ``/api/comm`` (spec §5.4).

        Up to ``scheduler_api_retries`` attempts, 0.1 s backoff doubling; if all fail the
        scheduler is unreachable: the cluster FAILS and the caller gets 409.
        """
        body = json.dumps(message).encode()
        delay = 0.1
        error = ""
        attempts = max(1, self.config.scheduler_api_retries)
        for attempt in range(attempts):
            cluster = self._clusters.get(name)
            if cluster is None or cluster.status is not ClusterStatus.RUNNING:
                raise not_running(name)
            url = cluster.api_address.rstrip("/") + "/api/comm"
            headers = [
                ("Authorization", f"token {cluster.token}"),
                ("Content-Type", "application/json"),
            ]
            try:
                response = await self.http.fetch(
                    "POST",
                    url,
                    headers=headers,
                    body=body,
                    timeout=self.config.scheduler_api_timeout,
                    max_body_bytes=64 * 1024,
                )
            except _FORWARD_ERRORS as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= response.status < 300:
                    return
                error = f"HTTP {response.status}"
            if attempt + 1 < attempts:
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.warning("cluster %s: scheduler unreachable (%s)", name, error)
        await self.fail(name, f"scheduler API unreachable: {error}")
        raise not_running(name)

    # ------------------------------------------------------------------ heartbeats

    async def heartbeat(self, name: str, body: Any) -> None:
        """Handle one heartbeat (E10) from the cluster's scheduler (spec §5.3)."""
        msg = parse_heartbeat(body)
        cluster = self._clusters.get(name)
        if cluster is None or not cluster.is_active:
            return  # stopping or stopped: ignored, still 200
        cluster.last_heartbeat = self._clock()
        if cluster.status is ClusterStatus.PENDING:
            self._register(cluster, msg)
            cluster = self._clusters[name]
        self._reconcile(cluster, msg)

    def _register(self, cluster: Cluster, msg: Heartbeat) -> None:
        if not msg.scheduler_address.startswith("tls://"):
            raise HeartbeatError("heartbeat field 'scheduler_address' must be a tls:// address")
        if not msg.api_address.startswith(("http://", "https://")):
            raise HeartbeatError("heartbeat field 'api_address' must be an http(s) URL")
        cluster.scheduler_address = msg.scheduler_address
        cluster.dashboard_address = msg.dashboard_address
        cluster.api_address = msg.api_address
        try:
            # Routes first: a client told RUNNING must find them.
            self._publish_routes(cluster)
        except RouteError as exc:
            self._delete_routes(cluster.name)
            raise HeartbeatError(f"invalid address in heartbeat: {exc}") from None
        self._event(cluster.name, ClusterEvent.REGISTERED)
        log.info("cluster %s: RUNNING at %s", cluster.name, cluster.scheduler_address)

    def _reconcile(self, cluster: Cluster, msg: Heartbeat) -> None:
        name = cluster.name
        count, _ = limit_scale(
            msg.count,
            self._limited(cluster.config),
            self.config.user_limits,
            self._usage(cluster.username, name),
        )
        cluster.count = count
        workers = self._workers.setdefault(name, {})
        decision = decide_heartbeat(count, workers.values(), msg)
        changed: dict[str, Worker] = {}
        now = self._clock()

        def move(worker_name: str, event: WorkerEvent) -> Worker | None:
            worker = workers.get(worker_name)
            if worker is not None:
                worker.status = worker_transition(worker.status, event)
                if worker.status.is_finished:
                    worker.stop_time_ms = worker.stop_time_ms or now
                changed[worker_name] = worker
            return worker

        for worker_name in decision.mark_running:
            move(worker_name, WorkerEvent.STARTED)
        for worker_name in decision.mark_closing:
            worker = workers.get(worker_name)
            if worker is not None:
                worker.close_expected = True
                changed[worker_name] = worker
        for worker_name in decision.mark_stopped | decision.mark_failed:
            event = WorkerEvent.EXITED if worker_name in decision.mark_stopped else WorkerEvent.LOST
            worker = move(worker_name, event)
            if worker is not None:
                if event is WorkerEvent.LOST:
                    log.warning("cluster %s: worker %s lost", name, worker_name)
                self._spawn(self._reap_worker, name, worker_name)
        for worker_name in decision.cancel:
            worker = move(worker_name, WorkerEvent.STOP)
            if worker is not None:
                worker.close_expected = True
                self._spawn(self._stop_worker, name, worker_name)
        if decision.reset_start_failures:
            cluster.worker_start_failures = 0
        cluster.worker_start_failures += decision.start_failures
        new = []
        for _ in range(decision.launch):
            worker = Worker(name=uuid.uuid4().hex, cluster_name=name, start_time_ms=now)
            workers[worker.name] = worker
            changed[worker.name] = worker
            new.append(worker)
        self._save_workers(changed.values())
        self._save_cluster(cluster)
        for worker in new:
            self._spawn(self._start_worker, name, worker.name)
        if start_failures_exceeded(
            cluster.worker_start_failures, self.config.timeouts.worker_start_failure_limit
        ):
            self._begin_stop(
                name,
                ClusterEvent.FAIL,
                f"{cluster.worker_start_failures} consecutive worker start failures",
            )

    # ------------------------------------------------------------------ workers

    async def _start_worker(self, name: str, worker_name: str) -> None:
        cluster = self._clusters.get(name)
        worker = self._workers.get(name, {}).get(worker_name)
        if cluster is None or worker is None or worker.status is not WorkerStatus.PENDING:
            return
        try:
            state = await self.backend.start_worker(self._launch(cluster), worker_name)
        except BackendError as exc:
            log.warning("cluster %s: worker %s failed to start: %s", name, worker_name, exc)
            self._worker_start_failed(name, worker_name)
            return
        worker = self._workers.get(name, {}).get(worker_name)
        cluster = self._clusters.get(name)
        if worker is None or cluster is None or not cluster.is_active:
            # Cancelled or torn down while launching: nobody else knows this process.
            await self.backend.stop_worker(name, worker_name, state)
            return
        worker.launched = True
        worker.state = state
        self._save_workers([worker])
        if worker.status is WorkerStatus.STOPPING:
            await self._stop_worker(name, worker_name)
        else:
            await self._watch_worker(name, worker_name, state)

    async def _watch_worker(self, name: str, worker_name: str, state: State) -> None:
        """A worker process that exits before the scheduler saw it is a start failure.

        (Once running, its loss is reported by the scheduler's heartbeat instead.)
        """
        await self.backend.wait_exit(state)
        worker = self._workers.get(name, {}).get(worker_name)
        cluster = self._clusters.get(name)
        if cluster is None or not cluster.is_active:
            return  # the cluster is being torn down: its workers are meant to exit
        if worker is not None and worker.state == state and worker.status is WorkerStatus.PENDING:
            log.warning("cluster %s: worker %s exited before joining", name, worker_name)
            self._worker_start_failed(name, worker_name)

    def _worker_start_failed(self, name: str, worker_name: str) -> None:
        worker = self._workers.get(name, {}).get(worker_name)
        cluster = self._clusters.get(name)
        if worker is None or cluster is None:
            return
        worker.status = worker_transition(worker.status, WorkerEvent.LOST)
        worker.stop_time_ms = self._clock()
        self._forget_worker(worker)
        if not cluster.is_active:
            return
        cluster.worker_start_failures += 1
        self._save_cluster(cluster)
        limit = self.config.timeouts.worker_start_failure_limit
        if start_failures_exceeded(cluster.worker_start_failures, limit):
            self._begin_stop(
                name,
                ClusterEvent.FAIL,
                f"{cluster.worker_start_failures} consecutive worker start failures",
            )

    async def _stop_worker(self, name: str, worker_name: str) -> None:
        worker = self._workers.get(name, {}).get(worker_name)
        if worker is None:
            return
        if worker.launched:
            await self.backend.stop_worker(name, worker_name, worker.state)
        elif worker.status is WorkerStatus.STOPPING:
            return  # its launch is in flight; _start_worker stops it when it lands
        worker = self._workers.get(name, {}).get(worker_name)
        if worker is None:
            return
        worker.status = worker_transition(worker.status, WorkerEvent.EXITED)
        worker.stop_time_ms = worker.stop_time_ms or self._clock()
        self._forget_worker(worker)

    async def _reap_worker(self, name: str, worker_name: str) -> None:
        """A worker the scheduler saw leave: make sure its process is gone, then forget it."""
        worker = self._workers.get(name, {}).get(worker_name)
        if worker is None:
            return
        if worker.launched and self.backend.is_alive(worker.state):
            await self.backend.stop_worker(name, worker_name, worker.state)
        worker = self._workers.get(name, {}).get(worker_name)
        if worker is not None and worker.status.is_finished:
            self._forget_worker(worker)

    # ------------------------------------------------------------------ timers

    def _check_cluster(self, cluster: Cluster) -> None:
        name = cluster.name
        workers = self._workers.get(name, {})
        decision = decide_timeouts(self._clock(), cluster, workers.values(), self.config.timeouts)
        for worker_name in decision.fail_workers:
            worker = workers.get(worker_name)
            if worker is None:
                continue
            log.warning("cluster %s: worker %s did not start in time", name, worker_name)
            worker.status = worker_transition(worker.status, WorkerEvent.LOST)
            worker.stop_time_ms = self._clock()
            self._save_workers([worker])
            self._spawn(self._reap_worker, name, worker_name)
        if decision.start_failures:
            cluster.worker_start_failures += decision.start_failures
            self._save_cluster(cluster)
        if decision.fail_cluster:
            self._begin_stop(name, ClusterEvent.FAIL, decision.fail_cluster)

    async def _expire_records(self) -> None:
        max_age = self.config.record_max_age
        if max_age <= 0:
            return
        names = self.store.delete_stopped_older_than(max_age, now_ms=self._clock())
        for name in names:
            self._clusters.pop(name, None)
            self._workers.pop(name, None)
            self._changed.pop(name, None)
            await self.backend.forget_cluster(name)
        if names:
            log.info("expired %d finished cluster records", len(names))

    async def check_once(self) -> None:
        """One pass of the timers (the timer task calls this every ``check_period``)."""
        for cluster in list(self._clusters.values()):
            if cluster.is_active and self._clusters.get(cluster.name) is cluster:
                self._check_cluster(cluster)
        now = time.monotonic()
        if now - self._last_expiry >= self.config.expiry_period:
            self._last_expiry = now
            await self._expire_records()

    # ------------------------------------------------------------------ run / recovery

    def _recover(self) -> None:
        """Reload state after a restart and re-adopt processes (see module docstring)."""
        for row in self.store.load_clusters():
            cluster = cluster_from_row(row)
            self._clusters[cluster.name] = cluster
            self._workers[cluster.name] = {
                w.name: w
                for w in (worker_from_row(r) for r in self.store.load_workers(cluster.name))
            }
        for cluster in list(self._clusters.values()):
            name = cluster.name
            if cluster.status.is_finished:
                continue
            if cluster.status is ClusterStatus.STOPPING:
                log.info("cluster %s: resuming an interrupted stop", name)
                self._spawn(self._teardown, name)
                continue
            alive = bool(cluster.state) and self.backend.adopt(cluster.state)
            if cluster.status is ClusterStatus.PENDING and not cluster.state:
                # Never launched (the API stopped right after creating it): launch now.
                self._spawn(self._start_cluster, name)
                continue
            if not alive:
                self._begin_stop(name, ClusterEvent.FAIL, "scheduler gone after API restart")
                continue
            self._spawn(self._watch_scheduler, name, cluster.state)
            for worker in list(self._workers[name].values()):
                if not worker.launched or worker.status.is_finished:
                    continue
                if self.backend.adopt(worker.state):
                    if worker.status is WorkerStatus.PENDING:
                        self._spawn(self._watch_worker, name, worker.name, worker.state)
                elif worker.status is WorkerStatus.PENDING:
                    self._worker_start_failed(name, worker.name)
            if cluster.status is ClusterStatus.RUNNING:
                # Give the scheduler a full heartbeat timeout to reach the new API.
                cluster.last_heartbeat = self._clock()
                self._save_cluster(cluster)
                self._publish_routes(cluster)
            log.info("cluster %s: re-adopted (%s)", name, cluster.status.name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Recover state, then run the timers until cancelled.

        Reports started once recovered (the API may then serve). On exit, clusters are
        left running unless ``stop_clusters_on_shutdown`` is set.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._recover()
                task_status.started()
                while True:
                    await trio.sleep(self.config.check_period)
                    await self.check_once()
        finally:
            self._nursery = None
            if self.config.stop_clusters_on_shutdown:
                with trio.CancelScope(shield=True):
                    await self._stop_all_on_shutdown()

    async def _stop_all_on_shutdown(self) -> None:
        active = [c for c in self._clusters.values() if c.is_active]
        stopping = [c for c in self._clusters.values() if c.status is ClusterStatus.STOPPING]
        if not active and not stopping:
            return
        log.info("stopping %d clusters on shutdown", len(active) + len(stopping))
        with trio.move_on_after(self.config.shutdown_timeout):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for cluster in active:
                    self._begin_stop(cluster.name, ClusterEvent.FAIL, "gateway shutdown")
                for cluster in stopping:
                    nursery.start_soon(self._teardown, cluster.name)
        self._nursery = None
