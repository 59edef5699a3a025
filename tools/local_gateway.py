"""Start the whole gateway on this machine as three processes, and stop it again.

Used by ``make run`` (through ``tools/run_local.py``) and by the end-to-end tests, so both
exercise exactly what a user starts: the ``dask-gateway-api``, ``dask-gateway-web-proxy``
and ``dask-gateway-scheduler-proxy`` console scripts, talking over loopback.

Topology (all addresses configurable, defaults are the README's):

    web proxy   public HTTP entry   127.0.0.1:8000  --/api/...-------->  API 127.0.0.1:8001
                                                    --/clusters/<n>/-->  dashboards
    sched proxy public TLS entry    127.0.0.1:8786  --SNI------------->  schedulers
    both proxies follow the API's route feed at http://<api>/api/v1/routes.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port that was free a moment ago (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Ports:
    web: int = 8000
    api: int = 8001
    scheduler: int = 8786
    web_admin: int = 8002
    scheduler_admin: int = 8003

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in range(5)))


@dataclass
class LocalGateway:
    """Three gateway processes plus the config file they were started with."""

    workdir: Path
    config: dict[str, Any] = field(default_factory=dict)
    ports: Ports = field(default_factory=Ports)
    host: str = "127.0.0.1"
    proxy_token: str = field(default_factory=lambda: secrets.token_hex(32))
    log_level: str = "INFO"
    env: Mapping[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return str(self.config.get("prefix", "")).rstrip("/")

    @property
    def address(self) -> str:
        """What users pass as ``Gateway(address)``: the web proxy, plus the prefix."""
        return f"http://{self.host}:{self.ports.web}{self.prefix}"

    @property
    def proxy_address(self) -> str:
        return f"tls://{self.host}:{self.ports.scheduler}"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.ports.api}"

    @property
    def routes_url(self) -> str:
        return f"{self.api_url}{self.prefix}/api/v1/routes"

    def full_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "address": f"{self.host}:{self.ports.api}",
            "public_url": f"http://{self.host}:{self.ports.web}",
            "db_path": str(self.workdir / "gateway.sqlite"),
            "backend": {"type": "local", "workdir": str(self.workdir / "clusters")},
            "log_level": self.log_level,
        }
        _deep_merge(config, self.config)
        return config

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env["DASK_GATEWAY_PROXY_TOKEN"] = self.proxy_token
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self, *, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        config_path = self.workdir / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(self.full_config(), sort_keys=False))
        env = self._environment()
        level = ["--log-level", self.log_level]
        commands = {
            "api": [str(BIN / "dask-gateway-api"), "--config", str(config_path)],
            "scheduler-proxy": [
                str(BIN / "dask-gateway-scheduler-proxy"),
                "--address", f"{self.host}:{self.ports.scheduler}",
                "--admin-address", f"{self.host}:{self.ports.scheduler_admin}",
                "--api-url", self.routes_url,
                *level,
            ],
            "web-proxy": [
                str(BIN / "dask-gateway-web-proxy"),
                "--address", f"{self.host}:{self.ports.web}",
                "--admin-address", f"{self.host}:{self.ports.web_admin}",
                "--api-url", self.routes_url,
                *level,
            ],
        }  # fmt: skip
        try:
            for name, command in commands.items():
                log_file = open(logs / f"{name}.log", "ab")  # noqa: SIM115 (owned by Popen)
                self.processes[name] = subprocess.Popen(
                    command, env=env, stdout=log_file, stderr=subprocess.STDOUT
                )
                log_file.close()
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, *, timeout: float) -> None:
        """Wait until the public entry answers and both proxies have synced their routes."""
        deadline = time.monotonic() + timeout
        checks = [
            f"{self.address}/api/health",
            f"http://{self.host}:{self.ports.web_admin}/readyz",
            f"http://{self.host}:{self.ports.scheduler_admin}/readyz",
        ]
        for url in checks:
            while not _answers_200(url):
                for name, process in self.processes.items():
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"{name} exited with status {process.returncode}; "
                            f"see {self.workdir / 'logs' / (name + '.log')}\n" + self.log_tail(name)
                        )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway not ready after {timeout} s: {url}")
                time.sleep(0.05)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        # Proxies first, so nothing new reaches the API while it shuts down.
        for name in ("web-proxy", "scheduler-proxy", "api"):
            self.stop_process(name)

    def restart_api(self, *, kill: bool = True, timeout: float = 60.0) -> None:
        """Kill (SIGKILL) or stop the API and start it again with the same config."""
        self.stop_process("api", signal.SIGKILL if kill else signal.SIGTERM)
        process = self.processes["api"]
        log_file = open(self.workdir / "logs" / "api.log", "ab")  # noqa: SIM115
        self.processes["api"] = subprocess.Popen(
            process.args, env=self._environment(), stdout=log_file, stderr=subprocess.STDOUT
        )
        log_file.close()
        self.wait_ready(timeout=timeout)

    def __enter__(self) -> LocalGateway:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, json.JSONDecodeError):
        return False


def _deep_merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
