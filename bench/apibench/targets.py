"""The two gateways under test, started and stopped the way their users do it.

- ours: the three console scripts through ``tools/local_gateway.py`` (``LocalGateway``),
  simple auth, local backend; counted as started once the public entry answers, both
  proxies have synced their routes and the API's fork server reported ready.
- upstream: ``dask-gateway-server -f dask_gateway_config.py`` of the pinned
  ``dask-gateway-server[local]`` with ``UnsafeLocalBackend``; its Go proxy (a child
  process) serves HTTP and the scheduler TLS on one port. Counted as started once
  ``/api/health`` answers through that proxy.

Both run their clusters in directories under the run directory, and dask processes
``chdir`` there, so :func:`kill_leftovers` can find every process a target left behind
(by its working directory) and kill it by pid.
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dask_gateway import BasicAuth, Gateway

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from local_gateway import LocalGateway, Ports, free_port  # noqa: E402

BIN = Path(sys.executable).parent
UPSTREAM_VERSION = "2026.3.0"
USER = "bench"


class TargetError(Exception):
    """A gateway failed to start; the message carries the log tail."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [p.decode(errors="replace") for p in f.read().split(b"\0") if p]
    except OSError:
        return []


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    raw = f.read().decode("ascii", "replace")
            except OSError:
                continue
            if int(raw[raw.rfind(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


def processes_under(directory: Path) -> list[int]:
    """Pids of the processes (other than this one) working in ``directory`` or below."""
    directory = directory.resolve()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = Path(os.readlink(f"/proc/{entry}/cwd"))
        except OSError:
            continue
        if cwd == directory or directory in cwd.parents:
            found.append(int(entry))
    return found


def kill_leftovers(run_dir: Path) -> list[int]:
    """SIGKILL every process whose working directory lies under ``run_dir``; their pids."""
    killed = []
    for pid in processes_under(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except OSError:
            pass
    return killed


def pss_bytes(pids: list[int]) -> int:
    """Summed proportional set size: shared pages split between their users, so the sum
    over a group of processes is the memory the group really occupies."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            pass
    return total


class OurTarget:
    label = "ours"
    kind = "ours"

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "ours"
        self.gw = LocalGateway(
            workdir=self.dir,
            config={"stop_clusters_on_shutdown": True},
            ports=Ports.free(),
            log_level="INFO",
        )
        self.fork_server_ready = False

    @property
    def api_log(self) -> Path:
        return self.dir / "logs" / "api.log"

    def start(self, timeout: float = 120.0) -> None:
        try:
            self.gw.start(timeout=timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise TargetError(f"ours: {exc}\n{_tail(self.api_log)}") from None
        # The API warms its fork server in the background: measure the warm state.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.api_log.read_text(errors="replace")
            if "fork server ready" in text:
                self.fork_server_ready = True
                return
            if "started with exec" in text:
                return  # no fork server here: processes are exec'd
            time.sleep(0.05)

    def stop(self) -> None:
        self.gw.stop()

    def gateway(self) -> Gateway:
        return Gateway(
            self.gw.address, proxy_address=self.gw.proxy_address, auth=BasicAuth(USER, "x")
        )

    @property
    def public(self) -> tuple[str, int]:
        return self.gw.host, self.gw.ports.web

    @property
    def api_direct(self) -> tuple[str, int]:
        return self.gw.host, self.gw.ports.api

    @property
    def api_pid(self) -> int:
        return self.gw.processes["api"].pid

    def proxy_pids(self) -> dict[str, int]:
        return {name: self.gw.processes[name].pid for name in ("web-proxy", "scheduler-proxy")}

    def helper_pids(self) -> dict[str, int]:
        """Our API's own helper processes (the fork server)."""
        for pid in children(self.api_pid):
            if "dask_gateway_api.backends.forkserver" in _cmdline(pid):
                return {"fork server": pid}
        return {}

    def cluster_pids(self) -> list[int]:
        """Every dask process of this target (the fork server works in the same tree)."""
        helpers = set(self.helper_pids().values())
        return [p for p in processes_under(self.dir / "clusters") if p not in helpers]

    def cluster_logs(self, name: str) -> tuple[Path, list[Path]]:
        logs = self.dir / "clusters" / name / "logs"
        return logs / "scheduler.log", sorted(logs.glob("worker-*.log"))


class UpstreamTarget:
    label = "upstream"
    kind = "upstream"

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "upstream"
        self.api_port = free_port()
        self.proxy_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_log(self) -> Path:
        return self.dir / "server.log"

    @staticmethod
    def available() -> str | None:
        """None if the pinned upstream server is installed, else why not."""
        try:
            version = importlib.metadata.version("dask-gateway-server")
        except importlib.metadata.PackageNotFoundError:
            return (
                "dask-gateway-server is not installed (make bench installs requirements/bench.txt)"
            )
        if version != UPSTREAM_VERSION:
            return f"dask-gateway-server {version} installed, {UPSTREAM_VERSION} expected"
        if not (BIN / "dask-gateway-server").exists():
            return f"no {BIN / 'dask-gateway-server'}"
        return None

    def config_text(self) -> str:
        dask = str(BIN / "dask")
        return "\n".join(
            [
                f'c.DaskGateway.address = "127.0.0.1:{self.api_port}"',
                f'c.Proxy.address = "127.0.0.1:{self.proxy_port}"',
                'c.DaskGateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"',
                f"c.LocalBackend.clusters_directory = {str(self.dir / 'clusters')!r}",
                f'c.ClusterConfig.scheduler_cmd = [{dask!r}, "scheduler"]',
                f'c.ClusterConfig.worker_cmd = [{dask!r}, "worker"]',
                'c.DaskGateway.log_level = "INFO"',
                "",
            ]
        )

    def start(self, timeout: float = 120.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "dask_gateway_config.py"
        config.write_text(self.config_text())
        with open(self.api_log, "ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "dask-gateway-server"), "-f", str(config)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.proxy_port}/api/health"
        while not _answers_200(url):
            if self.process.poll() is not None:
                raise TargetError(
                    f"upstream exited with status {self.process.returncode}\n{_tail(self.api_log)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TargetError(f"upstream not ready after {timeout} s\n{_tail(self.api_log)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # it stops its clusters and its proxy
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def gateway(self) -> Gateway:
        return Gateway(f"http://127.0.0.1:{self.proxy_port}", auth=BasicAuth(USER, "x"))

    @property
    def public(self) -> tuple[str, int]:
        return "127.0.0.1", self.proxy_port

    @property
    def api_direct(self) -> tuple[str, int]:
        return "127.0.0.1", self.api_port

    @property
    def api_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def proxy_pids(self) -> dict[str, int]:
        for pid in children(self.api_pid):
            if any(part.endswith("dask-gateway-proxy") for part in _cmdline(pid)[:1]):
                return {"go proxy": pid}
        return {}

    def helper_pids(self) -> dict[str, int]:
        return {}

    def cluster_logs(self, name: str) -> tuple[Path, list[Path]]:
        logs = self.dir / "clusters" / name / "logs"
        return logs / "scheduler.log", sorted(logs.glob("worker-*.log"))

    def cluster_pids(self) -> list[int]:
        """Every dask process of this target (they work in their cluster's directory)."""
        return processes_under(self.dir / "clusters")


Target = OurTarget | UpstreamTarget
