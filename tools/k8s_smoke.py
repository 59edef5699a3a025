"""Smoke test of a gateway on a real Kubernetes cluster, with the official client.

The same scenario as ``tests/kube/test_kube_e2e.py`` runs on the emulator: new_cluster ->
scale(N) -> compute -> adapt -> shutdown, timing each step. Run it after ``helm install``
(see docs/kubernetes-backend.md), usually through ``make k8s-smoke``::

    python tools/k8s_smoke.py --address http://127.0.0.1:8000 --proxy-address tls://127.0.0.1:8786
    python tools/k8s_smoke.py --release dask-gateway --namespace dask-gateway   # addresses via kubectl

With ``--release`` the addresses are read from the ``web-public-<release>`` and
``scheduler-public-<release>`` LoadBalancer Services; with ``kubectl`` on the PATH the pods
of the cluster are listed along the way. Exit status 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any


class SmokeFailure(Exception):
    pass


def kubectl(namespace: str | None, *args: str) -> str:
    command = ["kubectl", *(["--namespace", namespace] if namespace else []), *args]
    try:
        return subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise SmokeFailure(f"`{' '.join(command)}` failed: {exc}") from None


def service_address(namespace: str | None, service: str) -> str:
    path = "{.status.loadBalancer.ingress[0]}"
    raw = kubectl(namespace, "get", "service", service, "-o", f"jsonpath={path}")
    for key in ('"ip":"', '"hostname":"'):
        if key in raw:
            return raw.split(key, 1)[1].split('"', 1)[0]
    raise SmokeFailure(
        f"service {service} has no load-balancer address yet (on kind or minikube use "
        "`kubectl port-forward` and --address/--proxy-address, or `minikube tunnel`)"
    )


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SmokeFailure(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"- {name} ...", end="", flush=True)
    try:
        yield
    except BaseException:
        print(" FAILED")
        raise
    print(f" ok ({time.monotonic() - started:.1f} s)")


def show_pods(namespace: str | None, cluster: str) -> None:
    if shutil.which("kubectl") is None:
        return
    with contextlib.suppress(SmokeFailure):
        print(
            kubectl(
                namespace, "get", "pods", "-l", f"gateway.dask.org/cluster={cluster}", "-o", "wide"
            )
        )


def run(args: argparse.Namespace) -> None:
    from dask_gateway import BasicAuth, Gateway, JupyterHubAuth

    address, proxy_address = args.address, args.proxy_address
    if args.release:
        address = (
            address or f"http://{service_address(args.namespace, f'web-public-{args.release}')}"
        )
        proxy_address = proxy_address or (
            f"tls://{service_address(args.namespace, f'scheduler-public-{args.release}')}:8786"
        )
    if not address:
        raise SmokeFailure("give --address (and --proxy-address), or --release")
    auth: Any = (
        JupyterHubAuth(api_token=args.password)
        if args.auth == "jupyterhub"
        else BasicAuth(args.user, args.password or "")
    )
    print(f"gateway {address}, scheduler proxy {proxy_address or '(same as address)'}")
    with Gateway(address, proxy_address=proxy_address, auth=auth) as gateway:
        with step("versions (GET /api/version)"):
            gateway.get_versions()
        with step("new_cluster (a Secret and a scheduler pod, until RUNNING)"):
            cluster = gateway.new_cluster(**dict(args.option or []))
        client = None
        try:
            print(f"  cluster {cluster.name}, dashboard {cluster.dashboard_link}")
            show_pods(args.namespace, cluster.name)
            with step(f"scale({args.workers}) until {args.workers} workers joined"):
                cluster.scale(args.workers)
                wait_until(
                    lambda: len(cluster.scheduler_info.get("workers", {})) == args.workers,
                    args.timeout,
                    f"{args.workers} workers",
                )
            show_pods(args.namespace, cluster.name)
            with step("compute through the scheduler proxy"):
                client = cluster.get_client(set_as_default=False)
                result = client.submit(sum, range(10)).result(timeout=args.timeout)
                if result != 45:
                    raise SmokeFailure(f"sum(range(10)) gave {result!r}")
            with step("adapt(minimum=1, maximum=2) until idle workers are retired to 1"):
                cluster.adapt(minimum=1, maximum=2)
                wait_until(
                    lambda: len(cluster.scheduler_info.get("workers", {})) == 1,
                    args.timeout,
                    "adaptive scale-down to 1 worker",
                )
        finally:
            if client is not None:
                client.close()
            with step("shutdown until STOPPED"):
                cluster.shutdown()
                wait_until(
                    lambda: gateway.get_cluster(cluster.name).status.name == "STOPPED",
                    args.timeout,
                    "the cluster to be STOPPED",
                )
    print("smoke test passed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="the gateway's public HTTP address (web-public)")
    parser.add_argument("--proxy-address", help="tls://host:8786 of scheduler-public")
    parser.add_argument("--release", help="find the addresses from this Helm release's Services")
    parser.add_argument("--namespace", help="the release's namespace (for kubectl)")
    parser.add_argument("--auth", choices=["basic", "jupyterhub"], default="basic")
    parser.add_argument("--user", default="smoke", help="basic auth user name")
    parser.add_argument("--password", help="basic auth password, or the JupyterHub API token")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per step")
    parser.add_argument(
        "--option",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        help="a cluster option (string value), e.g. --option image registry/cluster:1",
    )
    args = parser.parse_args(argv)
    try:
        run(args)
    except SmokeFailure as exc:
        print(f"smoke test failed: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the client's errors: say which step, exit 1
        print(f"smoke test failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
