"""A real JupyterHub for the tests: a subprocess on loopback, driven through its REST API.

Theory of operation
-------------------
:class:`RealHub` writes a ``jupyterhub_config.py`` into a private directory and runs the
``jupyterhub`` console script of this virtualenv there (temp SQLite database, temp cookie
secret, random port). The hub serves its REST API itself at ``http://127.0.0.1:<port>/hub/api``;
only browser traffic to single-user servers needs the HTTP proxy, so instead of
``configurable-http-proxy`` the config installs :data:`MEMORY_PROXY`, a ``Proxy`` subclass
that keeps the hub's route table in memory (``should_start = False``).

The config registers three services with fixed random tokens:

* ``dask-gateway`` -- the gateway itself (the name users are granted
  ``access:services!service=dask-gateway`` for);
* ``hub-admin`` -- the tests' admin identity: creates users and tokens over the REST API;
* ``friend`` -- a service granted access to ``dask-gateway`` (the gateway must call it
  ``service:friend``); ``stranger`` -- a service without that grant.

The ``user`` role is redefined as ``self`` + ``access:services!service=dask-gateway`` so
every hub user may use the gateway with a token that inherits the owner's permissions,
while a token created with narrower ``scopes`` (e.g. only ``read:users:name!user``) may not.

Readiness is ``GET /hub/health`` answering 200, polled with a deadline while watching the
process; a failed start raises with the tail of the hub's log.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
GATEWAY_SERVICE = "dask-gateway"

#: Source of the in-memory proxy class, pasted into the generated hub config.
MEMORY_PROXY = '''
from jupyterhub.proxy import Proxy


class MemoryProxy(Proxy):
    """Routes kept in memory: the tests only use the hub's REST API, never the proxy."""

    should_start = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._routes = {}

    async def add_route(self, routespec, target, data):
        self._routes[routespec] = {"routespec": routespec, "target": target, "data": data}

    async def delete_route(self, routespec):
        self._routes.pop(routespec, None)

    async def get_all_routes(self):
        return dict(self._routes)
'''


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class HubAPIError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"hub API answered {status}: {body[:300]}")
        self.status = status


@dataclass
class RealHub:
    """One JupyterHub process; :meth:`start` / :meth:`stop` or use as a context manager."""

    workdir: Path
    port: int = field(default_factory=free_port)
    public_port: int = field(default_factory=free_port)
    gateway_token: str = field(default_factory=lambda: secrets.token_hex(32))
    admin_token: str = field(default_factory=lambda: secrets.token_hex(32))
    friend_token: str = field(default_factory=lambda: secrets.token_hex(32))
    stranger_token: str = field(default_factory=lambda: secrets.token_hex(32))
    #: Users the hub makes admins at start (``Authenticator.admin_users``).
    admin_users: tuple[str, ...] = ("root",)
    process: subprocess.Popen[bytes] | None = None
    start_seconds: float = 0.0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hub/api"

    @property
    def log_path(self) -> Path:
        return self.workdir / "jupyterhub.log"

    def config_text(self) -> str:
        services = [
            {"name": GATEWAY_SERVICE, "api_token": self.gateway_token},
            {"name": "hub-admin", "api_token": self.admin_token},
            {"name": "friend", "api_token": self.friend_token},
            {"name": "stranger", "api_token": self.stranger_token},
        ]
        roles = [
            {
                "name": "user",
                "scopes": ["self", f"access:services!service={GATEWAY_SERVICE}"],
            },
            {
                "name": "hub-admin",
                "scopes": ["admin:users", "tokens", "admin:groups", "list:users"],
                "services": ["hub-admin"],
            },
            {
                "name": "gateway-friend",
                "scopes": [f"access:services!service={GATEWAY_SERVICE}"],
                "services": ["friend"],
            },
        ]
        db = self.workdir / "jupyterhub.sqlite"
        lines = [
            MEMORY_PROXY,
            "c = get_config()  # noqa",
            "c.JupyterHub.proxy_class = MemoryProxy",
            'c.JupyterHub.authenticator_class = "dummy"',
            'c.JupyterHub.hub_ip = "127.0.0.1"',
            f"c.JupyterHub.hub_port = {self.port}",
            'c.JupyterHub.ip = "127.0.0.1"',
            f"c.JupyterHub.port = {self.public_port}",
            f'c.JupyterHub.db_url = "sqlite:///{db}"',
            f'c.JupyterHub.cookie_secret_file = "{self.workdir / "cookie_secret"}"',
            f'c.JupyterHub.pid_file = "{self.workdir / "jupyterhub.pid"}"',
            "c.JupyterHub.cleanup_servers = False",
            "c.Authenticator.allow_all = True",
            f"c.Authenticator.admin_users = {sorted(self.admin_users)!r}",
            f"c.JupyterHub.services = {json.dumps(services)}",
            f"c.JupyterHub.load_roles = {json.dumps(roles)}",
        ]
        return "\n".join(lines) + "\n"

    def start(self, *, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "jupyterhub_config.py"
        config.write_text(self.config_text())
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "jupyterhub"), "-f", str(config)],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def wait_ready(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/hub/health"
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"jupyterhub exited with status {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyterhub not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> RealHub:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- REST API (as the hub-admin service) ---------------------------------------------

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api_url + path,
            data=data,
            method=method,
            headers={
                "Authorization": f"token {token or self.admin_token}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as exc:
            raise HubAPIError(exc.code, exc.read().decode(errors="replace")) from None
        return json.loads(text) if text else None

    def create_user(self, name: str, *, groups: tuple[str, ...] = ()) -> None:
        """Create ``name`` (if new) and add it to ``groups`` (created as needed)."""
        try:
            self.api("POST", f"/users/{name}")
        except HubAPIError as exc:
            if exc.status != 409:  # admin users exist from the start
                raise
        for group in groups:
            try:
                self.api("POST", f"/groups/{group}")
            except HubAPIError as exc:
                if exc.status != 409:  # already exists
                    raise
            self.api("POST", f"/groups/{group}/users", {"users": [name]})

    def create_token(self, user: str, *, scopes: list[str] | None = None) -> str:
        body: dict[str, Any] = {"note": "tests/auth"}
        if scopes is not None:
            body["scopes"] = scopes
        return self.api("POST", f"/users/{user}/tokens", body)["token"]
