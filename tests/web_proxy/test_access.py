"""Owner-only dashboards, web proxy side: the pure parts (route → cluster, credential
forwarding and stripping, answer interpretation, the bounded TTL cache) and the gate on
real sockets, with a scripted API access endpoint, a recording dashboard and a websocket
dashboard behind the proxy."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url, serve_websocket

from dask_gateway_common.http import Headers, Request, Response
from dask_gateway_web_proxy.access import (
    FORWARDED_AUTHORIZATION,
    FORWARDED_COOKIE,
    FORWARDED_NEXT,
    AccessCache,
    DashboardAccess,
    cache_key,
    carries_credentials,
    check_headers,
    dashboard_cluster,
    gateway_cookies,
    interpret,
    split_routes_url,
    strip_credentials,
)
from dask_gateway_web_proxy.config import load_settings
from dask_gateway_web_proxy.proxy import ProxyTimeouts
from tests.web_proxy.helpers import (
    TOKEN,
    ProxyEnv,
    Seen,
    get,
    header_map,
    loads,
    open_proxy,
    recording_handler,
    start_backend,
)

DEADLINE = 15


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()


# --- pure -------------------------------------------------------------------------------


def test_split_routes_url() -> None:
    assert split_routes_url("http://api:8001/api/v1/routes") == (
        "http://api:8001/api/v1/clusters/",
        "",
    )
    assert split_routes_url("https://api:8001/services/dg/api/v1/routes/") == (
        "https://api:8001/services/dg/api/v1/clusters/",
        "/services/dg",
    )
    for bad in ("http://api:8001/routes", "ftp://api/api/v1/routes", "/api/v1/routes"):
        with pytest.raises(ValueError):
            split_routes_url(bad)


@pytest.mark.parametrize(
    ("route", "prefix", "name"),
    [
        ("/clusters/abc", "", "abc"),
        ("/clusters/abc/", "", "abc"),
        ("/p/q/clusters/abc", "/p/q", "abc"),
        ("/", "", None),  # the API's route
        ("/p/q/", "/p/q", None),
        ("/clusters", "", None),
        ("/clusters/abc/status", "", None),
        ("/other/abc", "", None),
        ("/clusters/abc", "/p", None),  # outside the prefix
        ("/p/clusters/abc", "", None),
        ("/clusters/", "/clusters", None),  # prefix named like the dashboards' segment
    ],
)
def test_dashboard_cluster(route: str, prefix: str, name: str | None) -> None:
    assert dashboard_cluster(route, prefix) == name


def test_gateway_cookies_and_stripping() -> None:
    values = ["theme=dark; dask-gateway-1f=v1", "dask-gateway-oauth-state=n; _xsrf=abc"]
    assert gateway_cookies(values) == "dask-gateway-1f=v1; dask-gateway-oauth-state=n"
    assert gateway_cookies(["theme=dark", "garbage", ""]) is None
    headers = [
        ("Host", "gw"),
        ("authorization", "Basic YWxpY2U6"),
        ("Cookie", "theme=dark; dask-gateway-1f=v1"),
        ("Cookie", "dask-gateway-2=x"),
        ("X-Other", "1"),
    ]
    assert carries_credentials(headers)
    assert not carries_credentials([("Cookie", "theme=dark"), ("X-Auth", "1")])
    assert carries_credentials([("AUTHORIZATION", "x")])
    assert strip_credentials([("Cookie", "a=dask-gateway-1")]) == [("Cookie", "a=dask-gateway-1")]
    assert strip_credentials(headers) == [
        ("Host", "gw"),
        ("Cookie", "theme=dark"),
        ("X-Other", "1"),
    ]


def test_check_headers_and_cache_key() -> None:
    assert check_headers("T", None, None, None) == [
        ("Authorization", "token T"),
        ("Accept", "application/json"),
    ]
    full = check_headers("T", "Basic x", "dask-gateway-a=1", "/clusters/a/status?x=1")
    assert full[2:] == [
        (FORWARDED_AUTHORIZATION, "Basic x"),
        (FORWARDED_COOKIE, "dask-gateway-a=1"),
        (FORWARDED_NEXT, "/clusters/a/status?x=1"),
    ]
    key = cache_key("a", "Basic x", None)
    assert key[0] == "a" and "Basic x" not in key[1] and len(key[1]) == 64
    assert len({key, cache_key("b", "Basic x", None), cache_key("a", None, "Basic x")}) == 3
    assert cache_key("a", "x\udcff", None)  # undecodable bytes from a peer do not raise


@pytest.mark.parametrize(
    ("status", "headers", "allowed", "out_status", "out_headers"),
    [
        (204, [("Set-Cookie", "c=1"), ("X-Other", "1")], True, 204, []),
        (
            302,
            [("Location", "/api/oauth_login?next=%2Fx")],
            False,
            302,
            [("Location", "/api/oauth_login?next=%2Fx")],
        ),
        (302, [("Location", "https://evil.example/")], False, 502, []),
        (302, [("Location", "//evil.example/")], False, 502, []),
        (302, [], False, 502, []),
        (401, [("WWW-Authenticate", "Negotiate")], False, 401, [("WWW-Authenticate", "Negotiate")]),
        (401, [], False, 502, []),  # no challenge: our proxy token was refused
        (403, [("Set-Cookie", "c=1")], False, 403, []),
        (404, [], False, 404, []),
        (200, [], False, 502, []),
        (500, [], False, 502, []),
        (503, [], False, 502, []),
    ],
)
def test_interpret(
    status: int,
    headers: list[tuple[str, str]],
    allowed: bool,
    out_status: int,
    out_headers: list[tuple[str, str]],
) -> None:
    answer = interpret(status, headers)
    assert answer.allowed is allowed
    if allowed:
        assert answer.relay == (("Set-Cookie", "c=1"),)
        return
    response = answer.denial()
    assert response.status == out_status
    assert [h for h in response.headers if h[0] != "Content-Type"] == out_headers
    assert answer.denial() is not response  # never shared between requests


def test_access_cache_ttl_and_bound() -> None:
    now = [0.0]
    cache = AccessCache(ttl=30, max_entries=2, clock=lambda: now[0])
    cache.allow(("a", "1"))
    cache.allow(("b", "1"))
    assert cache.allowed(("a", "1"))  # now most recently used
    cache.allow(("c", "1"))  # evicts b
    assert not cache.allowed(("b", "1")) and cache.allowed(("a", "1")) and len(cache) == 2
    now[0] = 29.9
    assert cache.allowed(("c", "1"))
    now[0] = 30.0
    assert not cache.allowed(("c", "1")) and len(cache) == 1
    off = AccessCache(ttl=0, max_entries=5)
    off.allow(("a", "1"))
    assert not off.allowed(("a", "1"))
    with pytest.raises(ValueError):
        AccessCache(max_entries=0)


def test_settings_flags() -> None:
    env = {"DASK_GATEWAY_PROXY_TOKEN": "t"}
    base = ["--address", ":0", "--api-url", "http://api:8001/p/api/v1/routes"]
    settings = load_settings(base, env)
    assert settings.dashboard_access == "check"
    assert (settings.dashboard_access_ttl, settings.dashboard_access_cache_size) == (30.0, 10_000)
    settings = load_settings(
        [*base, "--dashboard-access", "open", "--dashboard-access-ttl", "0"], env
    )
    assert settings.dashboard_access == "open" and settings.dashboard_access_ttl == 0
    from dask_gateway_common.settings import SettingsError

    with pytest.raises(SettingsError) as info:
        load_settings(
            [
                "--address",
                ":0",
                "--api-url",
                "http://api:8001/routes",
                "--dashboard-access",
                "maybe",
                "--dashboard-access-ttl",
                "-1",
                "--dashboard-access-cache-size",
                "0",
            ],
            env,
        )
    text = "\n".join(info.value.problems)
    assert "--dashboard-access: must be one of check, open, got 'maybe'" in text
    assert "--dashboard-access-ttl: must be >= 0" in text
    assert "--dashboard-access-cache-size: must be >= 1" in text
    # "open" does not need to locate the access check.
    load_settings(
        ["--address", ":0", "--api-url", "http://api/routes", "--dashboard-access", "open"], env
    )
    with pytest.raises(SettingsError) as info:
        load_settings(["--address", ":0", "--api-url", "http://api/routes"], env)
    assert "must end in /api/v1/routes" in info.value.problems[0]


# --- the gate on real sockets -----------------------------------------------------------


@dataclass
class FakeAccessApi:
    """The API's access endpoint, scripted: alice owns ``abc``, bob does not."""

    cookie: str = "dask-gateway-0f=v1"
    seen: list[list[tuple[str, str]]] = field(default_factory=list)
    oauth: bool = False
    hold: trio.Event | None = None
    fail: bool = False

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request.headers.items())
        if self.hold is not None:
            await self.hold.wait()
        if self.fail:
            return Response.error(500, "boom")
        if request.headers.get("Authorization") != f"token {TOKEN}":
            return Response.error(401, "Authentication required", [("WWW-Authenticate", "token")])
        if request.path != "/api/v1/clusters/abc/access":
            return Response.error(404, "Cluster not found")
        auth = request.headers.get(FORWARDED_AUTHORIZATION)
        cookie = request.headers.get(FORWARDED_COOKIE)
        if cookie == self.cookie:
            return Response.empty(204)
        if auth == basic("alice"):
            return Response.empty(204, [("Set-Cookie", f"{self.cookie}; Path=/")])
        if auth == basic("bob"):
            return Response.error(403, "User bob lacks permissions")
        next_url = request.headers.get(FORWARDED_NEXT)
        if self.oauth and next_url:
            return Response(302, [("Location", f"/api/oauth_login?next={next_url}")], b"")
        return Response.error(
            401, "Authentication required", [("WWW-Authenticate", 'Basic realm="dask-gateway"')]
        )


@dataclass
class Stack:
    env: ProxyEnv
    api: FakeAccessApi
    access: DashboardAccess
    seen: Seen

    async def get(
        self, path: str, headers: list[tuple[str, str]] | None = None, method: str = "GET"
    ) -> tuple[int, dict[str, str], bytes]:
        return await get(self.env.port, path, headers, method=method)


@asynccontextmanager
async def stack(
    *, ttl: float = 30, timeout: float = 5, api_url: str | None = None
) -> AsyncIterator[Stack]:
    api = FakeAccessApi()
    async with trio.open_nursery() as nursery:
        api_port = await start_backend(nursery, api)
        base = api_url or f"http://127.0.0.1:{api_port}/api/v1/clusters/"
        access = DashboardAccess(base, "", TOKEN, ttl=ttl, timeout=timeout)
        try:
            async with open_proxy(ProxyTimeouts(connect=5, response=5), access=access) as env:
                seen = Seen()
                dashboard = await start_backend(env.nursery, recording_handler(seen))
                await env.route("/clusters/abc", f"http://127.0.0.1:{dashboard}")
                await env.route("/clusters/zzz", f"http://127.0.0.1:{dashboard}")
                await env.route("/", f"http://127.0.0.1:{dashboard}")  # "the API"
                yield Stack(env, api, access, seen)
        finally:
            await access.aclose()
            nursery.cancel_scope.cancel()


async def test_owner_passes_without_credentials_reaching_the_dashboard() -> None:
    with trio.fail_after(DEADLINE):
        async with stack() as s:
            headers = [("Authorization", basic("alice")), ("Cookie", "theme=dark")]
            status, h, body = await s.get("/clusters/abc/status?x=1", headers)
            assert status == 200, body
            assert h["set-cookie"] == "dask-gateway-0f=v1; Path=/"  # relayed login cookie
            upstream = header_map(loads(body))
            assert loads(body)["target"] == "/status?x=1"
            assert "authorization" not in upstream
            assert upstream["cookie"] == ["theme=dark"]
            # What the API was asked: the proxy token, the credentials, the path.
            asked = Headers(s.api.seen[-1])
            assert asked.get("Authorization") == f"token {TOKEN}"
            assert asked.get(FORWARDED_AUTHORIZATION) == basic("alice")
            assert asked.get(FORWARDED_NEXT) == "/clusters/abc/status?x=1"
            assert FORWARDED_COOKIE not in asked  # theme=dark is not the gateway's
            # Same credentials again: answered from the cache.
            for _ in range(3):
                status, h, _ = await s.get("/clusters/abc/status", headers)
                assert status == 200 and "set-cookie" not in h
            assert s.access.api_requests == 1
            # The login cookie alone opens it too, and is not passed on.
            status, _, body = await s.get(
                "/clusters/abc/status", [("Cookie", "dask-gateway-0f=v1; a=b")]
            )
            assert status == 200
            assert header_map(loads(body))["cookie"] == ["a=b"]
            assert Headers(s.api.seen[-1]).get(FORWARDED_COOKIE) == "dask-gateway-0f=v1"


async def test_others_get_the_api_answer_and_nothing_is_cached() -> None:
    with trio.fail_after(DEADLINE):
        async with stack() as s:
            for _ in range(2):
                status, h, body = await s.get(
                    "/clusters/abc/status", [("Authorization", basic("bob"))]
                )
                assert (status, body) == (403, b"Forbidden")
                status, h, body = await s.get("/clusters/abc/status")
                assert status == 401 and h["www-authenticate"] == 'Basic realm="dask-gateway"'
                # An unknown cluster (route present, API says 404): 404 for everyone.
                for headers in ([], [("Authorization", basic("alice"))]):
                    status, _, body = await s.get("/clusters/zzz/status", headers)
                    assert (status, body) == (404, b"Not Found")
            assert s.access.api_requests == 8
            assert not s.seen.requests  # the dashboard never saw any of it
            # A navigation in OAuth mode: the redirect goes to the browser, a POST gets 401.
            s.api.oauth = True
            status, h, _ = await s.get("/clusters/abc/status")
            assert (status, h["location"]) == (302, "/api/oauth_login?next=/clusters/abc/status")
            status, _, _ = await s.get("/clusters/abc/status", method="POST")
            assert status == 401
            assert FORWARDED_NEXT not in Headers(s.api.seen[-1])
            # Other routes (the API's) are not checked.
            before = s.access.api_requests
            status, _, body = await s.get("/api/v1/clusters/", [("Authorization", basic("bob"))])
            assert status == 200 and header_map(loads(body))["authorization"] == [basic("bob")]
            assert s.access.api_requests == before
            metrics = s.env.metrics.http_requests_total
            assert metrics.labels(code="403")._value.get() == 2


async def test_api_failures_are_502_and_not_cached() -> None:
    with trio.fail_after(DEADLINE):
        async with stack(timeout=0.5) as s:
            s.api.fail = True
            alice = [("Authorization", basic("alice"))]
            status, _, body = await s.get("/clusters/abc/status", alice)
            assert (status, body) == (502, b"Bad Gateway")
            s.api.fail = False
            assert (await s.get("/clusters/abc/status", alice))[0] == 200
            # Slow: past the check's timeout.
            s.api.hold = trio.Event()
            assert (await s.get("/clusters/abc/status", [("Authorization", basic("x"))]))[0] == 502
            s.api.hold.set()
        async with stack(api_url="http://127.0.0.1:9/api/v1/clusters/") as s:  # nothing there
            assert (await s.get("/clusters/abc/status"))[0] == 502
            assert len(s.access.cache) == 0


async def test_concurrent_checks_share_one_api_request() -> None:
    with trio.fail_after(DEADLINE):
        async with stack() as s:
            s.api.hold = trio.Event()
            results: list[int] = []

            async def one() -> None:
                results.append(
                    (await s.get("/clusters/abc/x", [("Authorization", basic("alice"))]))[0]
                )

            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(one)
                with trio.fail_after(5):
                    while not s.api.seen:  # noqa: ASYNC110 - the first check is in flight
                        await trio.sleep(0.01)
                await trio.sleep(0.1)  # let the other nine queue behind it
                s.api.hold.set()
            assert results == [200] * 10
            assert s.access.api_requests == 1


async def test_ttl_zero_asks_every_time() -> None:
    with trio.fail_after(DEADLINE):
        async with stack(ttl=0) as s:
            for _ in range(3):
                assert (await s.get("/clusters/abc/x", [("Authorization", basic("alice"))]))[
                    0
                ] == 200
            assert s.access.api_requests == 3


async def test_websocket_upgrades_are_checked() -> None:
    async def echo(request) -> None:  # noqa: ANN001
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        ws = await request.accept()
        try:
            await ws.send_message(f"auth={headers.get('authorization')}")
            while True:
                await ws.send_message(await ws.get_message())
        except Exception:  # closed by the client
            return

    with trio.fail_after(DEADLINE):
        async with stack() as s:
            server = await s.env.nursery.start(partial(serve_websocket, echo, "127.0.0.1", 0, None))
            await s.env.route("/clusters/abc", f"http://127.0.0.1:{server.port}")
            url = f"ws://127.0.0.1:{s.env.port}/clusters/abc/status/ws"
            s.api.oauth = True  # an upgrade is never redirected
            for headers in ([], [(b"Authorization", basic("bob").encode())]):
                with pytest.raises(ConnectionRejected) as info:
                    async with open_websocket_url(url, extra_headers=headers):
                        pass
                assert info.value.status_code in (401, 403)
            assert FORWARDED_NEXT not in Headers(s.api.seen[-1])
            alice = [(b"Authorization", basic("alice").encode())]
            async with open_websocket_url(url, extra_headers=alice) as ws:
                assert await ws.get_message() == "auth=None"  # stripped before the dashboard
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
