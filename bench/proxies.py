"""Proxy benchmark: direct loopback vs our proxies vs upstream's Go proxy, in one run.

    .venv/bin/python bench/proxies.py [--quick]

Starts TLS backends (stand-ins for schedulers, with a per-cluster cert), an HTTP backend
(stand-in for a dashboard), a route feed (``RouteFeed`` on ``serve_http``, as the API
serves it), our scheduler and web proxies and the Go proxy from the
``dask-gateway-server`` wheel, all following that feed. Then it runs each workload against
every target and prints a side-by-side table. See bench/README.md for what is measured.
Exits non-zero with a message if any component fails to start.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import shutil
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass

from harness import backends, launch, workloads
from harness.creds import backend_context, client_context, make_creds
from harness.feed import serve_feed
from harness.report import Row, render
from harness.workloads import GiB, Target

from dask_gateway_common.tokens import new_token

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
HOST = "127.0.0.1"
# Two stand-in schedulers sharing one cluster certificate: asyncio for many concurrent
# connections; a thread per connection for bulk transfers and sequential handshakes (faster
# there, and free of asyncio's SSL-server stall: ~40 ms per new connection when the client
# sets TCP_NODELAY, as distributed does).
RTT_CLUSTER = "bench-echo"
BULK_CLUSTER = "bench"
WEB_PREFIX = "/clusters/bench"


@dataclass(frozen=True)
class Plan:
    bulk_bytes: int
    bulk_reps: int
    handshakes: int
    handshake_reps: int
    concurrency: tuple[int, ...]
    duration: float
    load_procs: int
    web_conns: int
    download_bytes: int
    download_reps: int


FULL = Plan(GiB, 3, 500, 3, (200, 1000), 10.0, 2, 64, GiB, 3)
QUICK = Plan(128 << 20, 1, 200, 1, (200, 1000), 3.0, 2, 64, 128 << 20, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, ~2 minutes")
    parser.add_argument(
        "--proxies",
        default="ours,go",
        help="comma list of proxies to compare with direct: ours, go (default %(default)s)",
    )
    parser.add_argument("--skip-scheduler", action="store_true", help="skip TLS workloads")
    parser.add_argument("--skip-web", action="store_true", help="skip HTTP workloads")
    parser.add_argument(
        "--our-workers", type=int, default=1, help="--workers for our scheduler proxy"
    )
    parser.add_argument(
        "--backend-procs", type=int, default=2, help="processes serving the echo backend"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    args = parser.parse_args(argv)
    args.proxies = [p for p in args.proxies.split(",") if p]
    unknown = set(args.proxies) - {"ours", "go"}
    if unknown:
        parser.error(f"unknown proxies: {', '.join(sorted(unknown))}")
    return args


def listen_socket() -> socket.socket:
    return socket.create_server((HOST, 0), backlog=4096)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 8192:
        print(f"warning: open-file limit {hard} may be too low for 1000 connections")


class Bench:
    def __init__(self, args: argparse.Namespace, stack: ExitStack) -> None:
        self.args = args
        self.plan = QUICK if args.quick else FULL
        self.stack = stack
        os.makedirs(CACHE, exist_ok=True)
        self.run_dir = tempfile.mkdtemp(prefix="run-", dir=CACHE)
        if not args.keep:
            stack.callback(shutil.rmtree, self.run_dir, True)
        self.token = new_token()
        self.proxies: list[launch.ProxyProcess] = []
        self.failures: list[str] = []
        self.mp = multiprocessing.get_context("fork")
        creds = make_creds(self.run_dir, BULK_CLUSTER)
        self.sni = {
            RTT_CLUSTER: "daskgateway-" + RTT_CLUSTER,
            BULK_CLUSTER: "daskgateway-" + BULK_CLUSTER,
        }
        self.client_ctx = client_context(creds)
        self.backend_ctx = backend_context(creds)

    # -- components ------------------------------------------------------------------------
    def _spawn(self, target, args, n: int = 1) -> list[int]:
        pids = []
        for _ in range(n):
            p = self.mp.Process(target=target, args=args, daemon=True)
            p.start()
            self.stack.callback(_stop_process, p)
            pids.append(p.pid)
        return pids

    def start_backends(self) -> None:
        rtt, bulk, web = listen_socket(), listen_socket(), listen_socket()
        self.rtt_addr, self.bulk_addr, self.web_addr = (
            s.getsockname()[:2] for s in (rtt, bulk, web)
        )
        self.rtt_pids = self._spawn(
            backends.serve_tls_backend, (rtt, self.backend_ctx), self.args.backend_procs
        )
        self.bulk_pids = self._spawn(backends.serve_threaded_tls_backend, (bulk, self.backend_ctx))
        self.web_pids = self._spawn(backends.serve_http_backend, (web,))
        for s in (rtt, bulk, web):
            s.close()  # the children hold them; load generators must not inherit them

    def start_feed(self) -> None:
        routes = [
            ("SNI", RTT_CLUSTER, f"tls://{HOST}:{self.rtt_addr[1]}"),
            ("SNI", BULK_CLUSTER, f"tls://{HOST}:{self.bulk_addr[1]}"),
            ("PATH", WEB_PREFIX, f"http://{HOST}:{self.web_addr[1]}"),
        ]
        receiver, sender = self.mp.Pipe(duplex=False)
        self._spawn(serve_feed, (routes, self.token, sender))
        sender.close()
        if not receiver.poll(20):
            raise launch.ProxyStartError("route feed did not start within 20 s")
        self.api_url = f"http://{HOST}:{receiver.recv()}/api/v1/routes"

    def _probe_tls(self, port: int) -> bool:
        raw = socket.create_connection((HOST, port), timeout=2)
        with self.client_ctx.wrap_socket(raw, server_hostname=self.sni[BULK_CLUSTER]) as s:
            s.sendall(b"P")
            return s.recv(1) == b"P"

    def _probe_http(self, port: int) -> bool:
        url = f"http://{HOST}:{port}{WEB_PREFIX}/small"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200 and resp.read() == backends.SMALL_BODY
        except urllib.error.HTTPError:
            return False

    def _start(self, label, argv, probe) -> launch.ProxyProcess:
        proxy = launch.start_proxy(label, argv, self.token, self.run_dir, probe)
        self.stack.callback(proxy.stop)
        self.proxies.append(proxy)
        return proxy

    def start_proxies(self) -> None:
        self.echo_targets = [
            Target("direct", self.rtt_addr, backend_pids=self.rtt_pids),
        ]
        self.tls_targets = [Target("direct", self.bulk_addr, backend_pids=self.bulk_pids)]
        self.web_targets = [Target("direct", self.web_addr, backend_pids=self.web_pids)]
        bin_dir = launch.scripts_dir()
        a = self.args
        if "ours" in a.proxies and not a.skip_scheduler:
            port, admin = launch.free_port(), launch.free_port()
            argv = [
                os.path.join(bin_dir, "dask-gateway-scheduler-proxy"),
                f"--address={HOST}:{port}",
                f"--api-url={self.api_url}",
                f"--admin-address={HOST}:{admin}",
                "--log-level=WARNING",
            ]
            if a.our_workers != 1:
                argv.append(f"--workers={a.our_workers}")
            p = self._start("ours scheduler proxy", argv, lambda: self._probe_tls(port))
            self._add_sched_target("ours", port, p.pid)
        if "ours" in a.proxies and not a.skip_web:
            port, admin = launch.free_port(), launch.free_port()
            argv = [
                os.path.join(bin_dir, "dask-gateway-web-proxy"),
                f"--address={HOST}:{port}",
                f"--api-url={self.api_url}",
                f"--admin-address={HOST}:{admin}",
                "--log-level=WARNING",
                "--dashboard-access=open",  # raw proxying, like the Go proxy: no API behind
            ]
            p = self._start("ours web proxy", argv, lambda: self._probe_http(port))
            self.web_targets.append(
                Target("ours", (HOST, port), [p.pid], backend_pids=self.web_pids)
            )
        if "go" in a.proxies:
            binary = launch.fetch_go_proxy(CACHE)
            http_port, tcp_port = launch.free_port(), launch.free_port()
            argv = [
                binary,
                "-address",
                f"{HOST}:{http_port}",
                "-tcp-address",
                f"{HOST}:{tcp_port}",
                "-api-url",
                self.api_url,
                "-log-level",
                "warn",
            ]
            p = self._start(
                "go proxy",
                argv,
                lambda: self._probe_tls(tcp_port) and self._probe_http(http_port),
            )
            # One process serves both sides; its CPU is only charged while one side is busy.
            self._add_sched_target("go", tcp_port, p.pid)
            self.web_targets.append(
                Target("go", (HOST, http_port), [p.pid], backend_pids=self.web_pids)
            )

    def _add_sched_target(self, label: str, port: int, pid: int) -> None:
        self.echo_targets.append(Target(label, (HOST, port), [pid], backend_pids=self.rtt_pids))
        self.tls_targets.append(Target(label, (HOST, port), [pid], backend_pids=self.bulk_pids))

    # -- workloads -------------------------------------------------------------------------
    def _row(self, name: str, reps: int, targets: list[Target], run) -> Row:
        """Run ``run(target)`` ``reps`` times per target, interleaved; median per metric.
        A failing target is recorded in ``self.failures`` and left out of the row."""
        self._log(name)
        runs: dict[str, list[workloads.Measurement]] = {t.label: [] for t in targets}
        failed: set[str] = set()
        for _ in range(reps):
            for t in targets:
                if t.label in failed:
                    continue
                try:
                    runs[t.label].append(run(t))
                except Exception as exc:
                    failed.add(t.label)
                    detail = str(exc).strip().splitlines()
                    self.failures.append(
                        f"{name} / {t.label}: {type(exc).__name__}: {detail[0] if detail else ''}"
                        + self._proxy_note(t)
                    )
        return Row(
            name,
            {label: workloads.median_of(ms) for label, ms in runs.items() if label not in failed},
        )

    def _proxy_note(self, target: Target) -> str:
        for proxy in self.proxies:
            if proxy.pid in target.proxy_pids and proxy.proc.poll() is not None:
                return (
                    f"\n  {proxy.label} exited with status {proxy.proc.returncode}; log tail:\n"
                    + proxy.log_tail()
                )
        return ""

    def _log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def run_scheduler(self) -> list[Row]:
        p, ctx = self.plan, self.client_ctx
        bulk_sni, echo_sni = self.sni[BULK_CLUSTER], self.sni[RTT_CLUSTER]
        rows = []
        for upload in (True, False):
            name = f"TLS bulk {'upload' if upload else 'download'} {_size(p.bulk_bytes)}"
            rows.append(
                self._row(
                    name,
                    p.bulk_reps,
                    self.tls_targets,
                    lambda t, up=upload: workloads.bulk(t, ctx, bulk_sni, p.bulk_bytes, up),
                )
            )
        rows.append(
            self._row(
                f"new mTLS connections x{p.handshakes}",
                p.handshake_reps,
                self.tls_targets,
                lambda t: workloads.handshakes(t, ctx, bulk_sni, p.handshakes),
            )
        )
        for conns in p.concurrency:
            rows.append(
                self._row(
                    f"{conns} conns x 64 B round trips, {p.duration:g} s",
                    1,
                    self.echo_targets,
                    lambda t, c=conns: workloads.concurrent(
                        t, ctx, echo_sni, c, p.duration, p.load_procs
                    ),
                )
            )
        return rows

    def run_web(self) -> list[Row]:
        p = self.plan

        def path(t: Target, rest: str) -> str:
            return rest if t.label == "direct" else WEB_PREFIX + rest

        return [
            self._row(
                f"HTTP small GETs, {p.web_conns} keep-alive conns, {p.duration:g} s",
                1,
                self.web_targets,
                lambda t: workloads.http_gets(
                    t, path(t, "/small"), p.web_conns, p.duration, p.load_procs
                ),
            ),
            self._row(
                f"HTTP streamed download {_size(p.download_bytes)}",
                p.download_reps,
                self.web_targets,
                lambda t: workloads.http_download(
                    t, path(t, f"/big?n={p.download_bytes}"), p.download_bytes
                ),
            ),
        ]


def _size(nbytes: int) -> str:
    return f"{nbytes / GiB:g} GiB" if nbytes >= GiB else f"{nbytes >> 20} MiB"


def _stop_process(p: multiprocessing.process.BaseProcess) -> None:
    if p.is_alive():
        p.terminate()
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    started = time.monotonic()
    with ExitStack() as stack:
        bench = Bench(args, stack)
        try:
            bench.start_backends()
            bench.start_feed()
            bench.start_proxies()
        except launch.ProxyStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        sched_rows = [] if args.skip_scheduler else bench.run_scheduler()
        web_rows = [] if args.skip_web else bench.run_web()
    labels = ["direct", *args.proxies]
    print()
    print(
        f"Proxy benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, "
        f"{time.monotonic() - started:.0f} s"
    )
    if sched_rows:
        print("\nScheduler proxy (TLS passthrough by SNI; go = dask-gateway-proxy -tcp-address)\n")
        print(render(sched_rows, labels))
    if web_rows:
        print("\nWeb proxy (HTTP by path prefix; go = dask-gateway-proxy -address)\n")
        print(render(web_rows, labels))
    print(
        "\nCPU% rows: percent of one core used during the measured window by the load "
        "generator / backend / proxy / rest of the machine (other processes, softirqs); "
        f"{os.cpu_count()} cores = {100 * (os.cpu_count() or 1)}%."
    )
    rest = [m.busy["rest"] for row in sched_rows + web_rows for m in row.by_target.values()]
    if rest and max(rest) > 30:
        print(
            f"\nwarning: the rest of the machine used up to {max(rest):.0f}% of a core during "
            "some windows (other processes); throughput and latency ratios are unreliable, "
            "CPU-per-request figures less so. Rerun on a quiet machine to conclude."
        )
    if bench.failures:
        print("\nFAILED:", file=sys.stderr)
        for failure in bench.failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
