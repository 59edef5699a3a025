"""The API workloads, run with the official client (or raw HTTP) against one target.

Every wait is bounded: the official client has no deadline of its own (``new_cluster``
polls forever), so blocking steps run under :func:`deadline`, a SIGALRM in the main
thread that interrupts even a blocked ``future.result()``.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import operator
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from dask_gateway import Gateway
from harness.measure import cpu_seconds, percentile

from .logs import dask_events, server_events
from .targets import USER, Target


class DeadlineExceeded(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`DeadlineExceeded` in the main thread if the block takes too long."""

    def expire(signum: int, frame: object) -> None:
        raise DeadlineExceeded(f"{what}: no result within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def release(gateway: Gateway) -> None:
    """Close a sync ``Gateway`` exactly once.

    The official client's ``__del__`` closes it again (also after ``GatewayCluster.close``
    closed it) and, its loop being stopped by then, prints a RuntimeError traceback;
    dropping the stopped loop runner afterwards keeps that noise out of the report.
    """
    try:
        gateway.close()
    except RuntimeError:
        pass  # already closed
    gateway.__dict__.pop("_loop_runner", None)


# ---------------------------------------------------------------- raw HTTP


class RawAPI:
    """Keep-alive HTTP/1.1 to a target's public entry, simple (Basic) auth on each call."""

    def __init__(self, target: Target, timeout: float = 60.0, *, direct: bool = False) -> None:
        host, port = target.api_direct if direct else target.public
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        token = base64.b64encode(f"{USER}:x".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, path, body=data, headers=self.headers)
        response = self.conn.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        self.conn.close()


def active_names(api: RawAPI) -> list[str]:
    status, body = api.call("GET", "/api/v1/clusters/")
    if status != 200:
        raise RuntimeError(f"list clusters: HTTP {status} {body[:200]!r}")
    return list(json.loads(body))


def stop_all(target: Target, timeout: float = 180.0) -> None:
    """Stop every active cluster of the bench user and wait until none is left."""
    api = RawAPI(target)
    try:
        with deadline(timeout, f"{target.label}: stopping all clusters"):
            for name in active_names(api):
                api.call("DELETE", f"/api/v1/clusters/{name}")
            while active_names(api):
                time.sleep(0.1)
    finally:
        api.close()


def create_latency(target: Target, count: int) -> list[float]:
    """Seconds per raw ``POST /api/v1/clusters/`` (``count`` in a row), then stop them."""
    api = RawAPI(target)
    latencies = []
    try:
        with deadline(60 + count * 5, f"{target.label}: {count} creates"):
            for _ in range(count):
                t0 = time.perf_counter()
                status, body = api.call("POST", "/api/v1/clusters/", {"cluster_options": {}})
                latencies.append(time.perf_counter() - t0)
                if status != 201:
                    raise RuntimeError(f"create: HTTP {status} {body[:200]!r}")
    finally:
        api.close()
        stop_all(target)
    return latencies


# ---------------------------------------------------------------- cold start


@dataclass
class ColdStart:
    """One cold start: client-side phases plus the server/dask timeline (seconds from t0)."""

    total: float = 0.0  # new_cluster() .. first result
    to_running: float = 0.0  # new_cluster() returned (RUNNING, as the client sees it)
    scale_to_result: float = 0.0  # scale(1) .. first result
    scale_2: float = 0.0  # scale(2) .. two workers in the scheduler
    timeline: dict[str, float] = field(default_factory=dict)


def _read_lines(path: object) -> list[str]:
    try:
        with open(path, errors="replace") as f:  # type: ignore[arg-type]
            return f.readlines()
    except OSError:
        return []


def _timeline(target: Target, name: str, t0: float) -> dict[str, float]:
    events = server_events(target.kind, _read_lines(target.api_log), name)
    scheduler_log, worker_logs = target.cluster_logs(name)
    scheduler_lines = _read_lines(scheduler_log)
    # The first worker is the one whose nanny came up first.
    candidates = [dask_events(scheduler_lines, _read_lines(w)) for w in worker_logs]
    candidates = [c for c in candidates if "nanny_up" in c] or [dask_events(scheduler_lines, [])]
    events.update(min(candidates, key=lambda c: c.get("nanny_up", float("inf"))))
    return {k: v - t0 for k, v in events.items()}


def cold_start(target: Target, timeout: float = 180.0) -> ColdStart:
    """new_cluster → scale(1) → get_client → first result, then scale(2) → two workers."""
    result = ColdStart()
    gateway = target.gateway()
    cluster = client = None
    try:
        with deadline(timeout, f"{target.label}: cold start"):
            t0 = time.time()
            cluster = gateway.new_cluster()
            t_running = time.time()
            cluster.scale(1)
            t_scale = time.time()
            client = cluster.get_client(set_as_default=False)
            if client.submit(operator.add, 1, 1).result() != 2:
                raise RuntimeError("wrong result")
            t_result = time.time()
            t_scale2 = time.time()
            cluster.scale(2)
            client.wait_for_workers(2)
            t_two = time.time()
        result.total = t_result - t0
        result.to_running = t_running - t0
        result.scale_to_result = t_result - t_scale
        result.scale_2 = t_two - t_scale2
        # Read the logs now: upstream deletes a cluster's directory when it stops.
        result.timeline = _timeline(target, cluster.name, t0)
        result.timeline.update(
            client_running=t_running - t0, client_result=t_result - t0, client_scale=t_scale - t0
        )
    finally:
        with deadline(120, f"{target.label}: closing the cold-start cluster"):
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.shutdown()
                release(cluster.gateway)
            release(gateway)
        stop_all(target)
    return result


# ---------------------------------------------------------------- many clusters


def create_clusters(target: Target, count: int, timeout: float = 600.0) -> list[str]:
    """Create ``count`` clusters and wait until all are RUNNING (no workers)."""
    gateway = target.gateway()
    try:
        with deadline(timeout, f"{target.label}: {count} clusters RUNNING"):
            names = [gateway.submit() for _ in range(count)]
            while True:
                running = {c.name for c in gateway.list_clusters(status="RUNNING")}
                if running >= set(names):
                    return names
                failed = {c.name for c in gateway.list_clusters(status=["FAILED", "STOPPED"])}
                if failed & set(names):
                    raise RuntimeError(f"{target.label}: clusters failed to start")
                time.sleep(0.5)
    finally:
        release(gateway)


@dataclass
class Throughput:
    calls_per_s: float
    server_cpu_pct: float  # API process CPU, % of one core
    client_cpu_pct: float  # this (load-generating) process, % of one core
    proxy_cpu_pct: float = 0.0  # the public proxies' processes, % of one core


class CpuMeter:
    """CPU % of one core used by the API, the proxies and this process over a window."""

    def __init__(self, target: Target) -> None:
        self.api = [target.api_pid]
        self.proxies = list(target.proxy_pids().values())

    def __enter__(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.start = (cpu_seconds(self.api), cpu_seconds(self.proxies), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        end = (cpu_seconds(self.api), cpu_seconds(self.proxies), time.process_time())
        self.api_pct, self.proxy_pct, self.own_pct = (
            100 * (b - a) / self.wall for a, b in zip(self.start, end, strict=True)
        )

    def result(self, calls: int) -> Throughput:
        return Throughput(calls / self.wall, self.api_pct, self.own_pct, self.proxy_pct)


def list_throughput(target: Target, threads: int, duration: float, expect: int) -> Throughput:
    """``Gateway.list_clusters()`` calls/s from ``threads`` threads, each its own Gateway."""
    gateways = [target.gateway() for _ in range(threads)]
    counts = [0] * threads
    errors: list[BaseException] = []
    ready = threading.Barrier(threads + 1)
    go = threading.Event()
    end_at = 0.0

    def run(i: int) -> None:
        gw = gateways[i]
        try:
            if len(gw.list_clusters()) != expect:  # warm: auth cookie, connections
                raise RuntimeError(f"expected {expect} clusters")
            ready.wait(60)
            go.wait(60)
            n = 0
            while time.perf_counter() < end_at:
                gw.list_clusters()
                n += 1
            counts[i] = n
        except BaseException as exc:  # reported below; the barrier is released
            errors.append(exc)
            ready.abort()

    workers = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    try:
        with deadline(duration + 120, f"{target.label}: list_clusters x{threads}"):
            for w in workers:
                w.start()
            try:
                ready.wait(60)
            except threading.BrokenBarrierError:
                pass
            with CpuMeter(target) as meter:
                end_at = time.perf_counter() + duration
                go.set()
                for w in workers:
                    w.join()
    finally:
        go.set()
        for gw in gateways:
            release(gw)
    if errors:
        raise RuntimeError(f"{target.label}: list_clusters failed: {errors[0]!r}")
    return meter.result(sum(counts))


def raw_get_throughput(
    target: Target, duration: float, expect: int, direct: bool = False
) -> Throughput:
    """Raw keep-alive ``GET /api/v1/clusters/`` requests/s over one connection, through
    the public proxy or (``direct``) to the API process itself."""
    api = RawAPI(target, direct=direct)
    try:
        with deadline(duration + 60, f"{target.label}: raw GET"):
            if len(active_names(api)) != expect:
                raise RuntimeError(f"expected {expect} clusters")
            n = 0
            with CpuMeter(target) as meter:
                end = time.perf_counter() + duration
                while time.perf_counter() < end:
                    status, _ = api.call("GET", "/api/v1/clusters/")
                    if status != 200:
                        raise RuntimeError(f"raw GET: HTTP {status}")
                    n += 1
    finally:
        api.close()
    return meter.result(n)


def p50_p99(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return percentile(ordered, 50), percentile(ordered, 99)
