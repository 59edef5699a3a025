"""API benchmark: our gateway vs upstream dask-gateway-server, side by side in one run.

    .venv/bin/python bench/api.py [--quick] [--targets ours,upstream] [--keep]

Starts OUR gateway (API + scheduler proxy + web proxy, the console scripts, local backend,
simple auth) and UPSTREAM's ``dask-gateway-server`` 2026.3.0 with ``UnsafeLocalBackend``
(its Go proxy serves HTTP and TLS on one port), then runs the same workloads against
both with the official ``dask_gateway`` client: cold start to first result, scale 1 -> 2
workers, create-request latency, ``list_clusters`` calls/s with 20 clusters (1 and 8
client threads, each its own ``Gateway``), raw GET req/s, and the API process's RSS idle
and with 20 clusters. Repeated measurements are interleaved between the two targets.
Prints one table (ours, upstream, ratio, the issue's goal) and the median cold-start
timeline from the servers' and dask's logs. See bench/README.md.

Everything is torn down at the end, also on error or Ctrl-C: both servers are stopped
(they stop their clusters) and any process still running in the run directory is killed.
Exit status 1 if a target failed to start or a workload failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apibench import workloads
from apibench.logs import EVENTS
from apibench.table import Row, render, render_timeline
from apibench.targets import OurTarget, TargetError, UpstreamTarget, kill_leftovers, pss_bytes
from harness.measure import rss_bytes

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
MiB = 1 << 20


@dataclass(frozen=True)
class Plan:
    cold_reps: int
    create_batches: int
    creates_per_batch: int
    clusters: int
    list_runs: int
    list_seconds: float


FULL = Plan(
    cold_reps=5, create_batches=3, creates_per_batch=10, clusters=20, list_runs=5, list_seconds=3.0
)
QUICK = Plan(
    cold_reps=3, create_batches=3, creates_per_batch=5, clusters=20, list_runs=3, list_seconds=2.0
)

TIMELINE = [
    ("created", EVENTS["created"]),
    ("scheduler_launched", EVENTS["scheduler_launched"]),
    ("scheduler_listening", EVENTS["scheduler_listening"]),
    ("running", EVENTS["running"]),
    ("client_running", "client: new_cluster() returned"),
    ("client_scale", "client: scale(1) returned"),
    ("worker_launched", EVENTS["worker_launched"]),
    ("nanny_up", EVENTS["nanny_up"]),
    ("worker_up", EVENTS["worker_up"]),
    ("worker_registered", EVENTS["worker_registered"]),
    ("client_result", "client: first result"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, ~3 minutes")
    parser.add_argument(
        "--targets", default="ours,upstream", help="comma list: ours, upstream (%(default)s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - {"ours", "upstream"}
    if unknown or not args.targets:
        parser.error(f"unknown targets: {', '.join(sorted(unknown)) or '(none)'}")
    return args


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.plan = QUICK if args.quick else FULL
        CACHE.mkdir(exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="api-", dir=CACHE))
        self.keep = args.keep
        self.targets: list[Any] = []
        for label in args.targets:
            self.targets.append(
                OurTarget(self.run_dir) if label == "ours" else UpstreamTarget(self.run_dir)
            )
        self.values: dict[str, dict[str, float]] = {t.label: {} for t in self.targets}
        self.samples: dict[str, dict[str, list[float]]] = {t.label: {} for t in self.targets}
        self.timelines: dict[str, list[dict[str, float]]] = {t.label: [] for t in self.targets}
        self.failures: list[str] = []

    # -- bookkeeping
    def add(self, label: str, metric: str, value: float) -> None:
        self.samples[label].setdefault(metric, []).append(value)

    def attempt(self, what: str, target: Any, fn: Any, *args: Any) -> Any:
        try:
            return fn(target, *args)
        except Exception as exc:
            self.failures.append(f"{target.label}: {what}: {exc}")
            print(f"  FAILED {target.label} {what}: {exc}", file=sys.stderr)
            traceback.print_exc(limit=3, file=sys.stderr)
            return None

    def quiesce(self, timeout: float = 60.0) -> None:
        """Wait until no cluster process of any target is left (a stopped cluster's
        processes may still be exiting), so one target's teardown does not load the
        other's measurement."""
        deadline = time.monotonic() + timeout
        while any(t.cluster_pids() for t in self.targets) and time.monotonic() < deadline:
            time.sleep(0.1)

    def order(self, rep: int) -> list[Any]:
        """Alternate who goes first, so drift in machine load hits both alike."""
        return self.targets if rep % 2 == 0 else self.targets[::-1]

    def rss(self, suffix: str) -> None:
        for t in self.targets:
            self.values[t.label][f"api_rss_{suffix}"] = rss_bytes([t.api_pid]) / MiB
            self.values[t.label][f"proxy_rss_{suffix}"] = rss_bytes(t.proxy_pids().values()) / MiB
            helpers = t.helper_pids()
            if helpers:
                self.values[t.label][f"helper_rss_{suffix}"] = rss_bytes(helpers.values()) / MiB
            group = sorted(set(t.cluster_pids()) | set(helpers.values()))
            self.values[t.label][f"cluster_pss_{suffix}"] = pss_bytes(group) / MiB

    # -- phases
    def start(self) -> None:
        for t in self.targets:
            t0 = time.monotonic()
            t.start()
            extra = ""
            if isinstance(t, OurTarget):
                extra = ", fork server ready" if t.fork_server_ready else ", NO fork server"
            print(f"{t.label}: started in {time.monotonic() - t0:.1f} s{extra}")

    def cold_starts(self) -> None:
        for rep in range(self.plan.cold_reps):
            for t in self.order(rep):
                self.quiesce()
                r = self.attempt("cold start", t, workloads.cold_start)
                if r is None:
                    continue
                print(
                    f"  cold start {rep + 1}/{self.plan.cold_reps} {t.label}: {r.total:.2f} s"
                    f" (RUNNING {r.to_running:.2f}, scale->result {r.scale_to_result:.2f},"
                    f" 1->2 workers {r.scale_2:.2f})"
                )
                for metric in ("total", "to_running", "scale_to_result", "scale_2"):
                    self.add(t.label, metric, getattr(r, metric))
                self.timelines[t.label].append(r.timeline)

    def creates(self) -> None:
        for batch in range(self.plan.create_batches):
            for t in self.order(batch):
                self.quiesce()
                lat = self.attempt(
                    "create requests", t, workloads.create_latency, self.plan.creates_per_batch
                )
                if lat:
                    self.samples[t.label].setdefault("create", []).extend(lat)
                    print(
                        f"  creates batch {batch + 1} {t.label}: median {statistics.median(lat) * 1e3:.1f} ms"
                    )

    def many_clusters(self) -> None:
        n = self.plan.clusters
        ready = []
        self.quiesce()
        for t in self.targets:
            t0 = time.monotonic()
            if self.attempt(f"create {n} clusters", t, workloads.create_clusters, n) is not None:
                ready.append(t)
                print(f"  {t.label}: {n} clusters RUNNING after {time.monotonic() - t0:.1f} s")
        if not ready:
            return
        time.sleep(2)  # let the last schedulers' start-up CPU settle
        self.rss("20")
        for run in range(self.plan.list_runs):
            for t in (x for x in self.order(run) if x in ready):
                for threads in (1, 8):
                    r = self.attempt(
                        f"list_clusters x{threads}",
                        t,
                        workloads.list_throughput,
                        threads,
                        self.plan.list_seconds,
                        n,
                    )
                    if r:
                        self.add(t.label, f"list{threads}", r.calls_per_s)
                        self.add(t.label, f"list{threads}_cpu", r.server_cpu_pct)
                        self.add(t.label, f"list{threads}_proxy_cpu", r.proxy_cpu_pct)
                        self.add(t.label, f"list{threads}_client_cpu", r.client_cpu_pct)
                for key, direct in (("raw_get", False), ("raw_direct", True)):
                    r = self.attempt(
                        key, t, workloads.raw_get_throughput, self.plan.list_seconds, n, direct
                    )
                    if r:
                        self.add(t.label, key, r.calls_per_s)
                        self.add(t.label, f"{key}_cpu", r.server_cpu_pct)
                        self.add(t.label, f"{key}_proxy_cpu", r.proxy_cpu_pct)
        for t in ready:
            peak = rss_bytes([t.api_pid]) / MiB
            self.values[t.label]["api_rss_20"] = max(self.values[t.label]["api_rss_20"], peak)
            self.attempt("stop all clusters", t, workloads.stop_all)

    # -- results
    def finish_values(self) -> None:
        for label, metrics in self.samples.items():
            for metric, values in metrics.items():
                if metric == "create":
                    p50, p99 = workloads.p50_p99(values)
                    self.values[label]["create_p50"] = p50 * 1e3
                    self.values[label]["create_p99"] = p99 * 1e3
                else:
                    self.values[label][metric] = statistics.median(values)

    def table(self) -> str:
        o, u = self.values.get("ours", {}), self.values.get("upstream", {})
        le = lambda a, b: a <= b  # noqa: E731
        ge15 = lambda a, b: a >= 1.5 * b  # noqa: E731

        def row(metric: str, key: str, **kw: Any) -> Row:
            return Row(metric, o.get(key), u.get(key), **kw)

        return render(
            [
                row("cold start to first result, s", "total", goal="<= upstream", check=le),
                row("  new_cluster() until RUNNING, s", "to_running"),
                row("  scale(1) until first result, s", "scale_to_result"),
                row("scale 1 -> 2 workers, s", "scale_2"),
                row(
                    "create request p50, ms",
                    "create_p50",
                    goal="<= 20 ms",
                    check=lambda a, b: a <= 20,
                ),
                row("create request p99, ms", "create_p99"),
                row(
                    "list_clusters calls/s, 1 thread", "list1", goal=">= 1.5x upstream", check=ge15
                ),
                row("  API CPU %", "list1_cpu"),
                row("  proxy CPU %", "list1_proxy_cpu"),
                row("  client CPU %", "list1_client_cpu"),
                row(
                    "list_clusters calls/s, 8 threads", "list8", goal=">= 1.5x upstream", check=ge15
                ),
                row("  API CPU %", "list8_cpu"),
                row("  proxy CPU %", "list8_proxy_cpu"),
                row("  client CPU %", "list8_client_cpu"),
                row("raw GET /api/v1/clusters/ req/s, 1 conn", "raw_get"),
                row("  API CPU %", "raw_get_cpu"),
                row("  proxy CPU %", "raw_get_proxy_cpu"),
                row("  same, straight to the API process", "raw_direct", note="no proxy hop"),
                row("  API CPU %", "raw_direct_cpu"),
                row("API process RSS idle, MiB", "api_rss_idle", goal="<= upstream", check=le),
                row(
                    f"API process RSS {self.plan.clusters} clusters, MiB",
                    "api_rss_20",
                    goal="<= upstream",
                    check=le,
                ),
                row(
                    "proxies RSS idle, MiB",
                    "proxy_rss_idle",
                    note="ours: web+scheduler proxy; upstream: Go proxy",
                ),
                row(f"proxies RSS {self.plan.clusters} clusters, MiB", "proxy_rss_20"),
                row(
                    "fork server RSS idle, MiB",
                    "helper_rss_idle",
                    note="ours only, shared with forked dask processes",
                ),
                row(
                    f"{self.plan.clusters} idle clusters' processes, PSS MiB",
                    "cluster_pss_20",
                    note="schedulers (+ ours: fork server), shared pages counted once",
                ),
            ]
        )

    def timeline_table(self) -> str:
        def medians(label: str) -> dict[str, float]:
            runs = self.timelines.get(label, [])
            keys = {k for r in runs for k in r}
            return {k: statistics.median([r[k] for r in runs if k in r]) for k in keys}

        return render_timeline(TIMELINE, medians("ours"), medians("upstream"))

    def teardown(self) -> None:
        for t in self.targets:
            try:
                t.stop()
            except Exception as exc:
                print(f"warning: stopping {t.label}: {exc}", file=sys.stderr)
        leftovers = kill_leftovers(self.run_dir)
        if leftovers:
            print(
                f"warning: killed {len(leftovers)} leftover processes: {leftovers}", file=sys.stderr
            )
        if self.keep:
            print(f"run directory kept: {self.run_dir}")
        else:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def describe_machine() -> str:
    import importlib.util

    import distributed

    # With bokeh installed, every scheduler and worker also builds its dashboard.
    bokeh = "bokeh installed" if importlib.util.find_spec("bokeh") else "no bokeh"
    load = os.getloadavg()
    return (
        f"{platform.node()}: {os.cpu_count()} cores, load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
        f"Python {platform.python_version()}, distributed {distributed.__version__}, {bokeh}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "upstream" in args.targets:
        why = UpstreamTarget.available()
        if why:
            print(f"error: {why}; or run with --targets ours", file=sys.stderr)
            return 1

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    run = Run(args)
    plan = run.plan
    print(describe_machine())
    print(
        f"plan: {plan.cold_reps} cold starts, {plan.create_batches}x{plan.creates_per_batch} creates,"
        f" {plan.clusters} clusters x {plan.list_runs} list runs of {plan.list_seconds:g} s"
    )
    try:
        try:
            run.start()
        except TargetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        time.sleep(1)
        run.rss("idle")
        print("cold start to first result ...")
        run.cold_starts()
        print("create requests ...")
        run.creates()
        print(f"{plan.clusters} clusters: list_clusters, raw GET, RSS ...")
        run.many_clusters()
    finally:
        run.teardown()
    run.finish_values()
    print()
    print(run.table())
    print()
    print(run.timeline_table())
    if run.failures:
        print("\nFAILURES:\n  " + "\n  ".join(run.failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
