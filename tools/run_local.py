"""`make run`: the whole gateway on this machine, until Ctrl-C.

Starts the API (local backend, SQLite, simple auth), the scheduler proxy and the web proxy
as three processes, waits until they are ready and prints how to connect.
Options: --config FILE merges your own YAML over the defaults; ports via flags.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_gateway import LocalGateway, Ports  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=".run", help="state, logs and cluster files")
    parser.add_argument("--config", help="YAML merged over the local defaults")
    parser.add_argument("--web-port", type=int, default=8000, help="public HTTP entry")
    parser.add_argument("--scheduler-port", type=int, default=8786, help="public TLS entry")
    parser.add_argument("--api-port", type=int, default=8001)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()

    config = {}
    if args.config:
        config = yaml.safe_load(Path(args.config).read_text()) or {}
    ports = Ports(
        web=args.web_port,
        api=args.api_port,
        scheduler=args.scheduler_port,
        web_admin=args.web_port + 2,
        scheduler_admin=args.web_port + 3,
    )
    token = os.environ.get("DASK_GATEWAY_PROXY_TOKEN") or None
    gateway = LocalGateway(
        workdir=Path(args.workdir).resolve(),
        config=config,
        ports=ports,
        log_level=args.log_level,
        **({"proxy_token": token} if token else {}),
    )
    print(f"Starting the gateway (logs in {gateway.workdir / 'logs'}) ...", flush=True)
    try:
        gateway.start(timeout=120)
    except (RuntimeError, TimeoutError) as exc:
        print(f"Could not start the gateway: {exc}", file=sys.stderr)
        return 1
    print(
        "\nThe gateway is running. Connect with the official client:\n\n"
        "    from dask_gateway import Gateway\n"
        f'    gateway = Gateway("{gateway.address}", '
        f'proxy_address="{gateway.proxy_address}", auth="basic")\n'
        "    cluster = gateway.new_cluster()\n\n"
        f"or run:  .venv/bin/python examples/quickstart.py {gateway.address} "
        f"{gateway.proxy_address}\n\nPress Ctrl-C to stop.",
        flush=True,
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop:
            for name, process in gateway.processes.items():
                if process.poll() is not None:
                    print(f"{name} exited unexpectedly:\n{gateway.log_tail(name)}")
                    stop = True
            time.sleep(0.5)
    finally:
        print("\nStopping ...", flush=True)
        gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
