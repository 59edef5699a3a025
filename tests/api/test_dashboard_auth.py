"""Dashboards only for their owner, API side: the decision table, ``next`` validation, the
signed OAuth state, settings, and the endpoints on a real loopback socket (access check for
the web proxy; OAuth login/callback against a scripted hub OAuth provider)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from dask_gateway_api.auth import (
    Authenticator,
    CookieCache,
    SimpleAuthenticator,
    User,
    UserAuth,
)
from dask_gateway_api.config import SettingsError, settings_from_mapping
from dask_gateway_api.dashboard_auth import (
    FORWARDED_AUTHORIZATION,
    FORWARDED_COOKIE,
    FORWARDED_NEXT,
    STATE_COOKIE,
    STATE_MAX_AGE,
    DashboardAuth,
    OAuthClientConfig,
    Verdict,
    authorize_url,
    challenge,
    forwarded_credentials,
    make_state,
    oauth_from_settings,
    open_state,
    pre_verdict,
    safe_next,
    user_verdict,
)
from dask_gateway_api.models import Cluster, ClusterStatus
from dask_gateway_api.resources import ClusterConfig
from dask_gateway_common.http import Headers, HTTPClient, Request, Response, serve_http

TOKEN = "proxy-token-for-dashboard-tests"
ENV = {"DASK_GATEWAY_PROXY_TOKEN": TOKEN}
KEY = b"k" * 32
DEADLINE = 15


# --- pure: decision table ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "mode", "expected"),
    [
        (None, "owner", Verdict.NOT_FOUND),
        (None, "none", Verdict.NOT_FOUND),  # unknown is 404 even when dashboards are open
        ("alice", "none", Verdict.ALLOW),
        ("alice", "owner", None),  # authenticate first
    ],
)
def test_pre_verdict(owner: str | None, mode: str, expected: Verdict | None) -> None:
    assert pre_verdict(owner=owner, mode=mode) is expected


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (None, Verdict.CHALLENGE),
        (User("alice"), Verdict.ALLOW),
        (User("bob"), Verdict.FORBIDDEN),
        (User("bob", admin=True), Verdict.FORBIDDEN),  # admin grants nothing (upstream)
        (User("Alice"), Verdict.FORBIDDEN),  # names compare exactly
    ],
)
def test_user_verdict(user: User | None, expected: Verdict) -> None:
    assert user_verdict("alice", user) is expected


def test_challenge_gives_basic_a_realm() -> None:
    assert challenge("Basic") == 'Basic realm="dask-gateway", charset="UTF-8"'
    assert challenge("Negotiate") == "Negotiate"
    assert challenge("jupyterhub") == "jupyterhub"


def test_forwarded_credentials_take_only_the_forwarding_headers() -> None:
    headers = Headers(
        [
            ("Authorization", "token the-proxy-token"),
            (FORWARDED_AUTHORIZATION, "Basic YWxpY2U6"),
            (FORWARDED_COOKIE, "dask-gateway-x=1"),
            ("Cookie", "ignored=1"),
        ]
    )
    assert forwarded_credentials(headers) == [
        ("Authorization", "Basic YWxpY2U6"),
        ("Cookie", "dask-gateway-x=1"),
    ]
    assert forwarded_credentials(Headers([("Authorization", "token t")])) == []


# --- pure: next validation --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "prefix", "ok"),
    [
        ("/clusters/abc/status", "", True),
        ("/clusters/abc/status?x=1&y=%2F", "", True),
        ("/p/clusters/abc/status", "/p", True),
        ("/p", "/p", True),
        ("/clusters/abc/status", "/p", False),  # outside the prefix
        ("/pp/clusters/abc", "/p", False),  # prefix is a whole segment
        ("//evil.example/x", "", False),  # scheme-relative: another origin
        ("/\\evil.example", "", False),
        ("http://evil.example/", "", False),
        ("javascript:alert(1)", "", False),
        ("clusters/abc", "", False),
        ("/p/../admin", "/p", False),
        ("/p/%2e%2e/admin", "/p", False),
        ("/p/%2E%2e/admin", "/p", False),
        ("/p/a%2fb", "/p", False),
        ("/p/a%5cb", "/p", False),
        ("/p/./x", "/p", False),
        ("/clusters/a b", "", False),
        ("/clusters/a\r\nSet-Cookie: x=1", "", False),
        ("/clusters/é", "", False),
        ("", "", False),
        (None, "", False),
        ("/" + "a" * 3000, "", False),
    ],
)
def test_safe_next(value: str | None, prefix: str, ok: bool) -> None:
    assert safe_next(value, prefix) == (value if ok else None)


# --- pure: OAuth state ------------------------------------------------------------------


def test_state_round_trip_and_binding() -> None:
    state, nonce = make_state(KEY, "/clusters/abc/status", now=1000.0)
    assert open_state(KEY, state, nonce, now=1000.0) == "/clusters/abc/status"
    assert open_state(KEY, state, nonce, now=1000.0 + STATE_MAX_AGE) == "/clusters/abc/status"
    # Expired, another browser's nonce, another process's key, no cookie at all:
    assert open_state(KEY, state, nonce, now=1001.0 + STATE_MAX_AGE) is None
    assert open_state(KEY, state, "other-nonce", now=1000.0) is None
    assert open_state(b"x" * 32, state, nonce, now=1000.0) is None
    assert open_state(KEY, state, None, now=1000.0) is None


def test_state_tampering_is_refused() -> None:
    state, nonce = make_state(KEY, "/clusters/abc/status", now=1000.0)
    payload, mac = state.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["next"] = "//evil.example/"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    assert open_state(KEY, f"{forged}.{mac}", nonce, now=1000.0) is None
    for garbage in ["", ".", "a.b", "!!!.???", "x" * 20000, f"{payload}.", f".{mac}", payload]:
        assert open_state(KEY, garbage, nonce, now=1000.0) is None
    # A correctly signed payload of the wrong shape is refused too.
    for shape in (b"[1, 2]", b'{"n": 1, "next": "/x", "exp": 9e9}', b"not json"):
        mac = hmac.new(KEY, shape, hashlib.sha256).digest()
        signed = (
            base64.urlsafe_b64encode(shape).decode() + "." + base64.urlsafe_b64encode(mac).decode()
        )
        assert open_state(KEY, signed.replace("=", ""), nonce, now=1000.0) is None


def test_authorize_url() -> None:
    config = oauth_config(authorize="http://hub.example/hub/api/oauth2/authorize")
    url = authorize_url(config, "STATE")
    parts = urllib.parse.urlsplit(url)
    assert parts.netloc == "hub.example" and parts.path == "/hub/api/oauth2/authorize"
    assert dict(urllib.parse.parse_qsl(parts.query)) == {
        "client_id": "service-dask-gateway",
        "redirect_uri": "http://gw.example/api/oauth_callback",
        "response_type": "code",
        "state": "STATE",
    }


# --- settings ---------------------------------------------------------------------------


HUB_AUTH = {
    "type": "jupyterhub",
    "jupyterhub_api_url": "http://hub:8081/hub/api",
    "jupyterhub_service_name": "dask-gateway",
    "jupyterhub_api_token": "gateway-service-token",
}


def test_dashboard_settings_defaults() -> None:
    settings = settings_from_mapping({}, ENV)
    assert settings.dashboards.auth == "owner"
    assert oauth_from_settings(settings) is None  # simple auth: no OAuth
    hub = settings_from_mapping(
        {"auth": HUB_AUTH, "public_url": "https://gw.example", "prefix": "/services/dg"}, ENV
    )
    oauth = oauth_from_settings(hub)
    assert oauth is not None
    assert oauth.client_id == "service-dask-gateway"
    assert oauth.client_secret == "gateway-service-token"
    assert oauth.redirect_uri == "https://gw.example/services/dg/api/oauth_callback"
    assert oauth.authorize_url == "http://hub:8081/hub/api/oauth2/authorize"
    assert oauth.token_url == "http://hub:8081/hub/api/oauth2/token"
    assert oauth.user_url == "http://hub:8081/hub/api/user"
    assert oauth.check_scopes and oauth.service_name == "dask-gateway"
    assert "gateway-service-token" not in repr(oauth)


def test_dashboard_settings_overrides_and_env() -> None:
    env = {
        **ENV,
        "DASK_GATEWAY_DASHBOARDS__AUTH": "none",
        "JUPYTERHUB_CLIENT_ID": "service-from-env",
        "JUPYTERHUB_OAUTH_CALLBACK_URL": "https://gw.example/cb",
    }
    settings = settings_from_mapping(
        {"auth": HUB_AUTH, "dashboards": {"oauth_authorize_url": "/hub/api/oauth2/authorize"}},
        env,
    )
    assert settings.dashboards.auth == "none"
    oauth = oauth_from_settings(settings)
    assert oauth is not None
    assert (oauth.client_id, oauth.redirect_uri) == ("service-from-env", "https://gw.example/cb")
    assert oauth.authorize_url == "/hub/api/oauth2/authorize"
    off = settings_from_mapping({"auth": HUB_AUTH, "dashboards": {"jupyterhub_oauth": False}}, ENV)
    assert oauth_from_settings(off) is None
    # Without the hub token (the client secret) the automatic mode stays off.
    no_token = {k: v for k, v in HUB_AUTH.items() if k != "jupyterhub_api_token"}
    assert oauth_from_settings(settings_from_mapping({"auth": no_token}, ENV)) is None


def test_dashboard_settings_problems() -> None:
    no_token = {k: v for k, v in HUB_AUTH.items() if k != "jupyterhub_api_token"}
    with pytest.raises(SettingsError) as info:
        settings_from_mapping(
            {
                "auth": {"type": "jupyterhub", "jupyterhub_api_url": "http://hub/hub/api"},
                "dashboards": {
                    "auth": "everyone",
                    "jupyterhub_oauth": True,
                    "oauth_redirect_uri": "ftp://x",
                    "oauth_authorize_url": "//hub/x",
                    "oauth_clientid": "x",
                },
            },
            ENV,
        )
    text = "\n".join(info.value.problems)
    assert "dashboards.auth: must be one of owner, none, got 'everyone'" in text
    assert "dashboards.jupyterhub_oauth needs the gateway's hub token" in text
    assert "dashboards.jupyterhub_oauth needs dashboards.oauth_client_id" in text
    assert "dashboards.oauth_redirect_uri: expected an http:// or https:// URL" in text
    assert "dashboards.oauth_authorize_url: expected a URL or a path" in text
    assert "unknown key 'dashboards.oauth_clientid' (did you mean 'oauth_client_id'?)" in text
    with pytest.raises(SettingsError) as info:
        settings_from_mapping({"dashboards": {"jupyterhub_oauth": True}}, ENV)
    assert "dashboards.jupyterhub_oauth needs auth.type jupyterhub" in info.value.problems
    assert oauth_from_settings(settings_from_mapping({"auth": no_token}, ENV)) is None


# --- endpoints on a real socket ---------------------------------------------------------


def oauth_config(
    *, authorize: str = "http://hub.example/hub/api/oauth2/authorize", hub: str = ""
) -> OAuthClientConfig:
    return OAuthClientConfig(
        client_id="service-dask-gateway",
        client_secret="gateway-secret",
        redirect_uri="http://gw.example/api/oauth_callback",
        authorize_url=authorize,
        token_url=f"{hub}/hub/api/oauth2/token",
        user_url=f"{hub}/hub/api/user",
        service_name="dask-gateway",
        check_scopes=True,
        timeout=5,
    )


def cluster(name: str, owner: str, status: ClusterStatus = ClusterStatus.RUNNING) -> Cluster:
    return Cluster(
        name=name,
        username=owner,
        token="t",
        status=status,
        options={},
        config=ClusterConfig(),
        cert_pem="",
        key_pem="",
        start_time_ms=0,
    )


@dataclass
class FakeManager:
    clusters: dict[str, Cluster] = field(default_factory=dict)
    running: bool = True

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()


@dataclass
class Served:
    url: str
    http: HTTPClient
    dashboards: DashboardAuth
    manager: FakeManager

    async def get(
        self, path: str, headers: list[tuple[str, str]] | None = None
    ) -> tuple[int, Headers, bytes]:
        r = await self.http.fetch("GET", self.url + path, headers=headers or [], timeout=10)
        return r.status, r.headers, r.body

    async def access(
        self,
        name: str,
        *,
        user: str | None = None,
        cookie: str | None = None,
        next_url: str | None = None,
        token: str | None = TOKEN,
    ) -> tuple[int, Headers, bytes]:
        headers = []
        if token is not None:
            headers.append(("Authorization", f"token {token}"))
        if user is not None:
            headers.append((FORWARDED_AUTHORIZATION, basic(user)))
        if cookie is not None:
            headers.append((FORWARDED_COOKIE, cookie))
        if next_url is not None:
            headers.append((FORWARDED_NEXT, next_url))
        prefix = self.dashboards.prefix
        return await self.get(f"{prefix}/api/v1/clusters/{name}/access", headers)


class FakeNegotiate(Authenticator):
    """Kerberos-shaped: scheme Negotiate, a mutual-auth token on the successful answer."""

    scheme = "Negotiate"

    async def authenticate(self, request: Request) -> User | None:
        value = request.headers.get("Authorization") or ""
        return User(value.removeprefix("Negotiate ")) if value.startswith("Negotiate ") else None

    def pre_response(self, request: Request, user: User, response: Response) -> None:
        response.headers.append(("WWW-Authenticate", f"Negotiate mutual-for-{user.name}"))


@asynccontextmanager
async def serve_dashboards(
    *,
    mode: str = "owner",
    oauth: OAuthClientConfig | None = None,
    prefix: str = "",
    authenticator: Authenticator | None = None,
) -> AsyncIterator[Served]:
    manager = FakeManager(
        {
            "abc": cluster("abc", "alice"),
            "pending": cluster("pending", "alice", ClusterStatus.PENDING),
            "old": cluster("old", "alice", ClusterStatus.STOPPED),
        }
    )
    auth = UserAuth(authenticator or SimpleAuthenticator(), CookieCache())
    dashboards = DashboardAuth(
        manager=manager, auth=auth, proxy_token=TOKEN, prefix=prefix, mode=mode, oauth=oauth
    )

    async def handler(request: Request) -> Response:
        answer = await dashboards.maybe_handle(request)
        return answer if answer is not None else Response.error(404, "not a dashboard path")

    async with HTTPClient() as http, trio.open_nursery() as nursery:
        _, port = await nursery.start(partial(serve_http, handler, "127.0.0.1", 0))
        try:
            yield Served(f"http://127.0.0.1:{port}", http, dashboards, manager)
        finally:
            nursery.cancel_scope.cancel()
            await dashboards.aclose()


def set_cookies(headers: Headers) -> dict[str, str]:
    out = {}
    for value in headers.get_all("Set-Cookie"):
        name, _, rest = value.partition("=")
        out[name] = rest
    return out


async def test_access_check_answers() -> None:
    with trio.fail_after(DEADLINE):
        async with serve_dashboards() as api:
            # The proxy token is required (none, wrong, or a user's Basic in its place).
            for token in (None, "wrong"):
                status, headers, _ = await api.access("abc", user="alice", token=token)
                assert (status, headers.get("WWW-Authenticate")) == (401, "token")
            # Unknown or inactive clusters: 404 whatever the credentials.
            for name in ("zzz", "old"):
                for user in (None, "alice", "bob"):
                    status, headers, _ = await api.access(name, user=user)
                    assert status == 404, (name, user)
                    assert headers.get("Set-Cookie") is None
            # No credentials: the Basic challenge with a realm (browsers prompt).
            status, headers, body = await api.access("abc")
            assert status == 401
            assert headers.get("WWW-Authenticate") == challenge("Basic")
            assert json.loads(body) == {"error": "Authentication required"}
            # Another user: 403 after authenticating, and no cookie for him.
            status, headers, body = await api.access("abc", user="bob")
            assert status == 403 and headers.get("Set-Cookie") is None
            assert "bob lacks permissions" in json.loads(body)["error"]
            # The owner: 204 and the login cookie, which then suffices alone.
            status, headers, _ = await api.access("abc", user="alice")
            assert status == 204
            cookies = set_cookies(headers)
            assert list(cookies) == [api.dashboards.auth.cache.cookie_name]
            cookie = f"{api.dashboards.auth.cache.cookie_name}={next(iter(cookies.values())).split(';')[0]}"
            status, headers, _ = await api.access("pending", cookie=cookie)
            assert status == 204 and headers.get("Set-Cookie") is None
            # Without the OAuth client a navigation is not redirected.
            status, _, _ = await api.access("abc", next_url="/clusters/abc/status")
            assert status == 401
            # Only GET.
            r = await api.http.fetch(
                "POST",
                f"{api.url}/api/v1/clusters/abc/access",
                headers=[("Authorization", f"token {TOKEN}")],
            )
            assert (r.status, r.headers.get("Allow")) == (405, "GET")
            # The gateway stopping: 503.
            api.manager.running = False
            status, _, _ = await api.access("abc", user="alice")
            assert status == 503
            # Other paths are not ours.
            assert await api.dashboards.maybe_handle(_request("/api/v1/clusters/abc")) is None
            assert await api.dashboards.maybe_handle(_request("/api/v1/clusters//access")) is None


def _request(path: str) -> Request:
    async def no_body() -> bytes | None:
        return None

    return Request(
        method="GET",
        target=path,
        headers=Headers([]),
        client=None,
        http_version="1.1",
        scheme="http",
        receive_body=no_body,
        max_body_bytes=0,
    )


async def test_access_with_negotiate() -> None:
    """Kerberos: the bare ``Negotiate`` challenge, and the owner's 204 carries the
    mutual-authentication token (the proxy relays it to the browser)."""
    with trio.fail_after(DEADLINE):
        async with serve_dashboards(authenticator=FakeNegotiate()) as api:
            status, headers, _ = await api.access("abc", next_url="/clusters/abc/status")
            assert (status, headers.get("WWW-Authenticate")) == (401, "Negotiate")
            forwarded = [
                ("Authorization", f"token {TOKEN}"),
                (FORWARDED_AUTHORIZATION, "Negotiate alice"),
            ]
            status, headers, _ = await api.get("/api/v1/clusters/abc/access", forwarded)
            assert status == 204
            assert headers.get("WWW-Authenticate") == "Negotiate mutual-for-alice"
            assert headers.get("Set-Cookie")
            forwarded[1] = (FORWARDED_AUTHORIZATION, "Negotiate bob")
            status, headers, _ = await api.get("/api/v1/clusters/abc/access", forwarded)
            assert status == 403 and headers.get("WWW-Authenticate") is None


async def test_access_when_dashboards_are_open() -> None:
    with trio.fail_after(DEADLINE):
        async with serve_dashboards(mode="none", prefix="/p") as api:
            for user in (None, "bob", "alice"):
                status, headers, _ = await api.access("abc", user=user)
                assert status == 204 and headers.get("Set-Cookie") is None
            assert (await api.access("zzz"))[0] == 404
            assert (await api.access("abc", token="wrong"))[0] == 401


# --- OAuth: a scripted hub OAuth provider ----------------------------------------------


@dataclass
class FakeOAuthHub:
    """``/hub/api/oauth2/token`` and ``/hub/api/user`` of a hub, scripted."""

    codes: dict[str, str] = field(default_factory=dict)  # code -> access token
    users: dict[str, dict[str, object]] = field(default_factory=dict)  # token -> model
    token_requests: list[dict[str, str]] = field(default_factory=list)
    fail_token_with: int | None = None

    async def __call__(self, request: Request) -> Response:
        if request.path == "/hub/api/oauth2/token" and request.method == "POST":
            form = dict(urllib.parse.parse_qsl((await request.read_body()).decode()))
            self.token_requests.append(form)
            if self.fail_token_with is not None:
                return Response.error(self.fail_token_with, "scripted failure")
            token = self.codes.pop(form.get("code", ""), None)
            ok = (form.get("client_id"), form.get("client_secret")) == (
                "service-dask-gateway",
                "gateway-secret",
            )
            if token is None or not ok:
                return Response.json({"error": "invalid_grant"}, status=400)
            return Response.json({"access_token": token, "token_type": "Bearer"})
        if request.path == "/hub/api/user":
            auth = request.headers.get("Authorization") or ""
            model = self.users.get(auth.removeprefix("token "))
            if model is None:
                return Response.error(403, "bad token")
            return Response.json(model)
        return Response.error(404, "no such hub path")


@asynccontextmanager
async def oauth_setup(prefix: str = "") -> AsyncIterator[tuple[Served, FakeOAuthHub]]:
    hub = FakeOAuthHub()
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(partial(serve_http, hub, "127.0.0.1", 0))
        config = oauth_config(hub=f"http://127.0.0.1:{port}")
        async with serve_dashboards(oauth=config, prefix=prefix) as api:
            yield api, hub
        nursery.cancel_scope.cancel()


def alice_model(token_scopes: list[str]) -> dict[str, object]:
    return {"kind": "user", "name": "alice", "groups": [], "admin": False, "scopes": token_scopes}


ACCESS = ["access:services!service=dask-gateway", "read:users:name!user=alice"]


async def login(api: Served, next_url: str) -> tuple[str, str]:
    """Follow the access check's redirect to oauth_login: ``(state, nonce cookie)``."""
    status, headers, _ = await api.access("abc", next_url=next_url)
    assert status == 302
    login_url = headers.get("Location")
    assert login_url == (
        f"{api.dashboards.prefix}/api/oauth_login?" + urllib.parse.urlencode({"next": next_url})
    )
    status, headers, _ = await api.get(login_url)
    assert status == 302
    target = urllib.parse.urlsplit(headers.get("Location") or "")
    assert target.netloc == "hub.example"
    query = dict(urllib.parse.parse_qsl(target.query))
    assert query["client_id"] == "service-dask-gateway" and query["response_type"] == "code"
    state_cookie = headers.get("Set-Cookie") or ""
    assert state_cookie.startswith(f"{STATE_COOKIE}=")
    assert f"Path={api.dashboards.prefix}/api/oauth_callback" in state_cookie
    assert "HttpOnly" in state_cookie and "SameSite=Lax" in state_cookie
    return query["state"], state_cookie.split(";")[0].split("=", 1)[1]


async def test_oauth_login_flow() -> None:
    with trio.fail_after(DEADLINE):
        async with oauth_setup(prefix="/p") as (api, hub):
            state, nonce = await login(api, "/p/clusters/abc/status?theme=dark")
            hub.codes["code-1"] = "access-token-1"
            hub.users["access-token-1"] = alice_model(ACCESS)
            callback = "/p/api/oauth_callback?" + urllib.parse.urlencode(
                {"code": "code-1", "state": state}
            )
            status, headers, _ = await api.get(callback, [("Cookie", f"{STATE_COOKIE}={nonce}")])
            assert status == 302, headers
            assert headers.get("Location") == "/p/clusters/abc/status?theme=dark"
            cookies = set_cookies(headers)
            name = api.dashboards.auth.cache.cookie_name
            assert cookies[STATE_COOKIE].startswith(";") and "Max-Age=0" in cookies[STATE_COOKIE]
            value = cookies[name].split(";")[0]
            assert hub.token_requests[-1] == {
                "grant_type": "authorization_code",
                "code": "code-1",
                "redirect_uri": "http://gw.example/api/oauth_callback",
                "client_id": "service-dask-gateway",
                "client_secret": "gateway-secret",
            }
            # The login cookie opens the dashboard.
            status, _, _ = await api.access("abc", cookie=f"{name}={value}")
            assert status == 204
            # Replaying the callback: the code is spent (the hub refuses it) → 403.
            status, _, _ = await api.get(callback, [("Cookie", f"{STATE_COOKIE}={nonce}")])
            assert status == 403


async def test_oauth_callback_refusals() -> None:
    with trio.fail_after(DEADLINE):
        async with oauth_setup() as (api, hub):
            state, nonce = await login(api, "/clusters/abc/status")
            good = [("Cookie", f"{STATE_COOKIE}={nonce}")]

            async def callback(params: dict[str, str], headers=good) -> tuple[int, str]:
                status, _, body = await api.get(
                    "/api/oauth_callback?" + urllib.parse.urlencode(params), headers
                )
                return status, json.loads(body)["error"] if body else ""

            # No code/state; the state without its cookie (login planted in another
            # browser); a forged state; the user declining at the hub.
            assert (await callback({}))[0] == 400
            assert (await callback({"code": "c", "state": state}, headers=[]))[0] == 400
            assert (await callback({"code": "c", "state": state + "x"}))[0] == 400
            status, message = await callback({"error": "access_denied<script>"})
            assert status == 403 and message == "JupyterHub refused the login (access_deniedscript)"
            # A token without the gateway's access scope.
            hub.codes["c2"] = "t2"
            hub.users["t2"] = alice_model(["read:users:name!user=alice"])
            status, message = await callback({"code": "c2", "state": state})
            assert status == 403 and "does not grant access" in message
            # The hub failing → 502; a garbled user model → 502.
            hub.fail_token_with = 500
            assert (await callback({"code": "c3", "state": state}))[0] == 502
            hub.fail_token_with = None
            hub.codes["c4"] = "t4"
            hub.users["t4"] = {"name": 42}
            assert (await callback({"code": "c4", "state": state}))[0] == 502
            # oauth_login refuses an open redirect.
            for bad in ("//evil.example/", "http://evil.example/", "", "/x/../../y"):
                status, _, _ = await api.get(
                    "/api/oauth_login?" + urllib.parse.urlencode({"next": bad})
                )
                assert status == 400, bad


async def test_oauth_hub_unreachable_is_502() -> None:
    config = oauth_config(hub="http://127.0.0.1:9")  # discard port: nothing listens
    with trio.fail_after(DEADLINE):
        async with serve_dashboards(oauth=config) as api:
            state, nonce = await login(api, "/clusters/abc/status")
            status, _, body = await api.get(
                "/api/oauth_callback?" + urllib.parse.urlencode({"code": "c", "state": state}),
                [("Cookie", f"{STATE_COOKIE}={nonce}")],
            )
            assert status == 502
            assert json.loads(body)["error"] == "Upstream failure during the JupyterHub OAuth login"


async def test_oauth_endpoints_absent_without_oauth() -> None:
    with trio.fail_after(DEADLINE):
        async with serve_dashboards() as api:
            for path in ("/api/oauth_login?next=/clusters/abc", "/api/oauth_callback?code=1"):
                status, _, _ = await api.get(path)
                assert status == 404
