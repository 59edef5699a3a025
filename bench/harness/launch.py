"""Starting the proxies under test as separate processes, and fetching upstream's Go proxy.

Each proxy is started with its real CLI, the feed token in ``DASK_GATEWAY_PROXY_TOKEN``,
and its output in a log file. It counts as started once a caller-supplied probe (a real
request through it to a backend) succeeds before a deadline; if the process exits or the
deadline passes, :class:`ProxyStartError` carries the command and the log's tail.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

GO_VERSION = "2026.3.0"
GO_MEMBER = "dask_gateway_server/proxy/dask-gateway-proxy"


class ProxyStartError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ProxyProcess:
    label: str
    argv: list[str]
    log_path: str
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_proxy(
    label: str,
    argv: list[str],
    token: str,
    log_dir: str,
    probe: Callable[[], bool],
    timeout: float = 20.0,
) -> ProxyProcess:
    """Start ``argv`` and wait until ``probe()`` is true; ProxyStartError otherwise."""
    exe = argv[0]
    if os.sep not in exe and shutil.which(exe) is None:
        raise ProxyStartError(f"{label}: command {exe!r} not found on PATH")
    log_path = os.path.join(log_dir, f"{label.replace(' ', '-')}.log")
    env = dict(os.environ, DASK_GATEWAY_PROXY_TOKEN=token)
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        except OSError as exc:
            raise ProxyStartError(f"{label}: cannot run {exe}: {exc}") from None
    proxy = ProxyProcess(label, argv, log_path, proc)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ProxyStartError(
                f"{label} exited with status {proc.returncode} during start-up\n"
                f"  command: {' '.join(argv)}\n  log tail:\n{proxy.log_tail()}"
            )
        try:
            if probe():
                return proxy
        except OSError:
            pass
        if time.monotonic() > deadline:
            proxy.stop()
            raise ProxyStartError(
                f"{label} did not route a probe request within {timeout:g} s\n"
                f"  command: {' '.join(argv)}\n  log tail:\n{proxy.log_tail()}"
            )
        time.sleep(0.1)


def scripts_dir() -> str:
    """Directory of the running interpreter's console scripts (the venv's bin)."""
    return os.path.dirname(sys.executable)


def _installed_go_proxy() -> str | None:
    """The binary of an installed ``dask-gateway-server`` of the pinned version, if any
    (``make bench`` installs requirements/bench.txt)."""
    try:
        if importlib.metadata.version("dask-gateway-server") != GO_VERSION:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    spec = importlib.util.find_spec("dask_gateway_server")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = os.path.join(list(spec.submodule_search_locations)[0], "proxy", "dask-gateway-proxy")
    return binary if os.access(binary, os.X_OK) else None


def fetch_go_proxy(cache_dir: str) -> str:
    """Path of upstream's Go proxy binary: from an installed ``dask-gateway-server`` of the
    pinned version, else extracted from its wheel (fetched with ``pip download`` into
    ``cache_dir`` when missing)."""
    installed = _installed_go_proxy()
    if installed is not None:
        return installed
    os.makedirs(cache_dir, exist_ok=True)
    binary = os.path.join(cache_dir, f"dask-gateway-proxy-{GO_VERSION}")
    if os.access(binary, os.X_OK):
        return binary
    wheels = [
        f
        for f in os.listdir(cache_dir)
        if f.startswith(f"dask_gateway_server-{GO_VERSION}-") and f.endswith(".whl")
    ]
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            f"dask-gateway-server=={GO_VERSION}",
            "-d",
            cache_dir,
        ]
        print(f"fetching upstream Go proxy: {' '.join(cmd[2:])}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise ProxyStartError(
                f"pip download of dask-gateway-server=={GO_VERSION} failed:\n{done.stderr[-2000:]}"
            )
        wheels = [
            f
            for f in os.listdir(cache_dir)
            if f.startswith(f"dask_gateway_server-{GO_VERSION}-") and f.endswith(".whl")
        ]
        if not wheels:
            raise ProxyStartError(f"pip download left no dask_gateway_server wheel in {cache_dir}")
    wheel = os.path.join(cache_dir, sorted(wheels)[0])
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(GO_MEMBER)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ProxyStartError(f"{wheel} holds no Go proxy binary ({exc})") from None
    tmp = binary + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, binary)
    return binary
