"""Test harness for the API: a fake backend, a fake scheduler preload, and the API served
in-process on a real loopback socket (port 0).

The fake backend records what the manager asks and lets a test "kill" a process; the fake
preload answers ``POST /api/comm`` like the official one (token check, 200 empty) and
records each message, or fails on demand.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from dask_gateway_api.app import ApiApp
from dask_gateway_api.auth import CookieCache, SimpleAuthenticator, UserAuth
from dask_gateway_api.backends.base import Backend, BackendError, ClusterLaunch, State
from dask_gateway_api.manager import ClusterManager, ManagerConfig
from dask_gateway_api.store import Store, open_store
from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.http import HTTPClient, HTTPLimits, Request, Response, serve_http

PROXY_TOKEN = "proxy-token-for-tests"
DEADLINE = 20


class FakeBackend(Backend):
    """Processes are numbers; a test can kill them. Every call is recorded."""

    def __init__(self) -> None:
        self.next_pid = 100
        self.alive: set[int] = set()
        self.exited: dict[int, trio.Event] = {}
        self.launches: list[ClusterLaunch] = []
        self.workers_started: list[tuple[str, str]] = []
        self.workers_stopped: list[str] = []
        self.clusters_stopped: list[str] = []
        self.forgotten: list[str] = []
        self.fail_scheduler = False
        self.fail_workers = False

    def _new(self) -> State:
        self.next_pid += 1
        self.alive.add(self.next_pid)
        self.exited[self.next_pid] = trio.Event()
        return {"pid": self.next_pid}

    def kill(self, state: State) -> None:
        pid = state["pid"]
        self.alive.discard(pid)
        self.exited.setdefault(pid, trio.Event()).set()

    async def start_scheduler(self, launch: ClusterLaunch) -> State:
        self.launches.append(launch)
        if self.fail_scheduler:
            raise BackendError("cannot start '/bad/scheduler': No such file or directory")
        return self._new()

    async def start_worker(self, launch: ClusterLaunch, worker_name: str) -> State:
        self.workers_started.append((launch.name, worker_name))
        if self.fail_workers:
            raise BackendError("cannot start '/bad/worker'")
        return self._new()

    async def stop_worker(self, cluster_name: str, worker_name: str, state: State) -> None:
        self.workers_stopped.append(worker_name)
        if state:
            self.kill(state)

    async def stop_cluster(
        self, cluster_name: str, scheduler_state: State, worker_states: Mapping[str, State]
    ) -> None:
        self.clusters_stopped.append(cluster_name)
        for state in [scheduler_state, *worker_states.values()]:
            if state:
                self.kill(state)

    def is_alive(self, state: State) -> bool:
        return state.get("pid") in self.alive

    def adopt(self, state: State) -> bool:
        return self.is_alive(state)

    async def wait_exit(self, state: State) -> None:
        pid = state.get("pid")
        if pid not in self.alive:
            return
        await self.exited.setdefault(pid, trio.Event()).wait()

    async def forget_cluster(self, cluster_name: str) -> None:
        self.forgotten.append(cluster_name)


@dataclass
class FakePreload:
    """The scheduler side of ``/api/comm``: token-checked, records messages."""

    tokens: set[str] = field(default_factory=set)
    messages: list[dict[str, Any]] = field(default_factory=list)
    fail_with: int | None = None
    address: str = ""

    async def __call__(self, request: Request) -> Response:
        if request.path != "/api/comm" or request.method != "POST":
            return Response.empty(404)
        auth = request.headers.get("Authorization") or ""
        if not any(auth == f"token {t}" for t in self.tokens):
            return Response.empty(403)
        if self.fail_with is not None:
            return Response.empty(self.fail_with)
        assert request.headers.get("Content-Type") == "application/json"
        self.messages.append(json.loads(await request.read_body()))
        return Response.empty(200)


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def headers_named(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def basic(user: str, password: str = "pw") -> tuple[str, str]:
    raw = f"{user}:{password}".encode("latin-1")
    return ("Authorization", "Basic " + base64.b64encode(raw).decode())


@dataclass
class Api:
    base: str
    manager: ClusterManager
    feed: RouteFeed
    backend: FakeBackend
    preload: FakePreload
    store: Store
    http: HTTPClient
    prefix: str = ""

    async def request(
        self,
        method: str,
        path: str,
        *,
        user: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | Any = b"",
        timeout: float = DEADLINE,
    ) -> Reply:
        hdrs = list(headers or [])
        if user is not None:
            hdrs.append(basic(user))
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
            hdrs.append(("Content-Type", "application/json"))
        r = await self.http.fetch(
            method, self.base + path, headers=hdrs, body=body, timeout=timeout
        )
        return Reply(r.status, r.headers.items(), r.body)

    async def create(self, user: str = "alice", options: Any = None) -> str:
        body = {} if options is None else {"cluster_options": options}
        reply = await self.request("POST", f"{self.prefix}/api/v1/clusters/", user=user, body=body)
        assert reply.status == 201, reply.body
        return reply.json["name"]

    async def heartbeat(self, name: str, **fields: Any) -> Reply:
        cluster = self.manager.get(name)
        assert cluster is not None
        msg = {
            "scheduler_address": "tls://127.0.0.1:40001",
            "dashboard_address": "http://127.0.0.1:40002",
            "api_address": self.preload.address,
            "count": 0,
            "active_workers": [],
            "closing_workers": [],
            "closed_workers": [],
        }
        msg.update(fields)
        return await self.request(
            "POST",
            f"{self.prefix}/api/v1/clusters/{name}/heartbeat",
            headers=[("Authorization", f"token {cluster.token}")],
            body=msg,
        )

    async def running_cluster(self, user: str = "alice", **heartbeat: Any) -> str:
        name = await self.create(user)
        await self.until(lambda: bool(self.manager.get(name).state))  # type: ignore[union-attr]
        reply = await self.heartbeat(name, **heartbeat)
        assert reply.status == 200, reply.body
        self.preload.tokens.add(self.manager.get(name).token)  # type: ignore[union-attr]
        return name

    async def until(self, predicate: Any, timeout: float = 10) -> None:
        """Wait (bounded) for a condition that background tasks will make true."""
        with trio.fail_after(timeout):
            while not predicate():  # noqa: ASYNC110 - state is spread over many objects
                await trio.sleep(0.005)


class FakeClock:
    """Wall-clock milliseconds that only move when a test says so."""

    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1000)


@asynccontextmanager
async def open_api(
    config: ManagerConfig | None = None,
    *,
    prefix: str = "",
    password: str | None = None,
    store_path: str = ":memory:",
    backend: FakeBackend | None = None,
    max_body: int = 1024 * 1024,
    clock: Callable[[], int] | None = None,
) -> AsyncIterator[Api]:
    config = config or ManagerConfig(prefix=prefix, check_period=0.05)
    store = open_store(store_path)
    backend = backend or FakeBackend()
    feed = RouteFeed()
    preload = FakePreload()
    try:
        async with HTTPClient() as http, trio.open_nursery() as nursery:
            if clock is None:
                manager = ClusterManager(config, store, backend, feed, http)
            else:
                manager = ClusterManager(config, store, backend, feed, http, clock=clock)
            auth = UserAuth(SimpleAuthenticator(password), CookieCache())
            app = ApiApp(
                manager, auth, prefix=prefix, routes_handler=make_feed_handler(feed, PROXY_TOKEN)
            )
            await nursery.start(manager.run)
            host, port = await nursery.start(
                lambda task_status: serve_http(
                    app,
                    "127.0.0.1",
                    0,
                    limits=HTTPLimits(max_body_bytes=max_body),
                    task_status=task_status,
                )
            )
            p_host, p_port = await nursery.start(
                lambda task_status: serve_http(preload, "127.0.0.1", 0, task_status=task_status)
            )
            preload.address = f"http://{p_host}:{p_port}"
            base = f"http://{host}:{port}"
            manager.set_api_address(f"{base}{prefix}/api", route_target=f"{base}{prefix}")
            yield Api(base, manager, feed, backend, preload, store, http, prefix)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
