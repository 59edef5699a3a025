"""Dashboards through the REAL JupyterHub's OAuth flow (issue 5 §3), black box.

A hub of its own (the session hub's ``dask-gateway`` service has no OAuth client): the
gateway service gets ``oauth_redirect_uri = <gateway>/api/oauth_callback`` and
``oauth_no_confirm``, as an admin registers a trusted service. The gateway starts first (its
public port is needed for the redirect URI; it does not call the hub at start), then the hub.

A browser is :class:`Browser`: stdlib ``urllib`` with a cookie jar, following redirects by
hand so each hop is checked. It logs into the hub with the dummy authenticator (the login
form, its ``_xsrf`` field included), then opens a dashboard URL through the web proxy:
gateway → ``/api/oauth_login`` → the hub's authorize page → ``/api/oauth_callback`` → the
dashboard. The owner gets it without typing anything, another hub user 403, a browser not
logged into the hub ends on the hub's login page. One dask cluster.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookiejar import CookieJar
from pathlib import Path

import pytest
from dask_gateway import Gateway, JupyterHubAuth

from tests.auth.conftest import hub_unavailable
from tests.auth.hub import GATEWAY_SERVICE, RealHub
from tests.e2e.harness import GatewayUnderTest, base_config, running_gateway

MAX_HOPS = 10


@dataclass
class OAuthHub(RealHub):
    """The test hub, with the gateway service registered as an OAuth client."""

    redirect_uri: str = ""

    def config_text(self) -> str:
        assert self.redirect_uri, "set redirect_uri before starting the hub"
        return super().config_text() + (
            "for _service in c.JupyterHub.services:\n"
            f"    if _service['name'] == {GATEWAY_SERVICE!r}:\n"
            f"        _service['oauth_redirect_uri'] = {self.redirect_uri!r}\n"
            "        _service['oauth_no_confirm'] = True\n"
        )


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the 3xx comes back as an HTTPError: we follow it ourselves


@dataclass
class Hop:
    method: str
    url: str
    status: int
    location: str | None
    body: bytes


@dataclass
class Browser:
    """Cookies kept per host (and path), redirects followed one hop at a time."""

    jar: CookieJar = field(default_factory=CookieJar)
    hops: list[Hop] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirects()
        )

    def request(self, url: str, data: dict[str, str] | None = None) -> Hop:
        body = None if data is None else urllib.parse.urlencode(data).encode()
        try:
            with self._opener.open(urllib.request.Request(url, data=body), timeout=30) as resp:
                hop = Hop("POST" if body else "GET", url, resp.status, None, resp.read())
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location")
            target = urllib.parse.urljoin(url, location) if location else None
            hop = Hop("POST" if body else "GET", url, exc.code, target, exc.read())
        self.hops.append(hop)
        return hop

    def open(self, url: str, data: dict[str, str] | None = None) -> Hop:
        """Request ``url`` and follow redirects (GET) to the final answer."""
        hop = self.request(url, data)
        for _ in range(MAX_HOPS):
            if hop.status not in (301, 302, 303, 307) or hop.location is None:
                return hop
            hop = self.request(hop.location)
        raise AssertionError(f"more than {MAX_HOPS} redirects: {[h.url for h in self.hops]}")

    def cookie_names(self) -> set[str]:
        return {cookie.name for cookie in self.jar}

    def hub_login(self, hub: RealHub, user: str) -> None:
        login_url = f"http://127.0.0.1:{hub.port}/hub/login"
        form = self.open(login_url)
        assert form.status == 200, form
        xsrf = re.search(rb'name="_xsrf" value="([^"]+)"', form.body)
        assert xsrf, "no _xsrf field in the hub's login form"
        done = self.request(
            login_url, {"username": user, "password": "any", "_xsrf": xsrf.group(1).decode()}
        )
        # Logged in: a redirect to the hub's home (not followed: it would spawn a server).
        assert done.status == 302, done
        assert "jupyterhub-hub-login" in self.cookie_names()


@dataclass
class Setup:
    hub: OAuthHub
    gw: GatewayUnderTest
    cluster_name: str

    @property
    def dashboard(self) -> str:
        return f"{self.gw.address}/clusters/{self.cluster_name}/status"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    reason = hub_unavailable()
    if reason:
        pytest.skip(reason)
    hub = OAuthHub(Path(tmp_path_factory.mktemp("oauth-hub")))
    config = base_config(
        auth={
            "type": "jupyterhub",
            "jupyterhub_api_url": hub.api_url,
            "jupyterhub_service_name": GATEWAY_SERVICE,
            "jupyterhub_timeout": 5,
        },
        dashboards={"jupyterhub_oauth": True},
        cluster={"worker_memory": "512 M", "scheduler_memory": "512 M"},
    )
    env = {"DASK_GATEWAY_AUTH__JUPYTERHUB_API_TOKEN": hub.gateway_token}
    with running_gateway(tmp_path_factory, "hub-oauth", config, env=env) as gw:
        gw.secrets.append(hub.gateway_token)
        hub.redirect_uri = f"{gw.address}/api/oauth_callback"
        with hub:
            hub.create_user("alice")
            hub.create_user("bob")
            token = hub.create_token("alice")
            gw.secrets.append(token)
            with Gateway(
                gw.address, proxy_address=gw.proxy_address, auth=JupyterHubAuth(token)
            ) as gateway:
                cluster = gateway.new_cluster()
                try:
                    yield Setup(hub, gw, cluster.name)
                finally:
                    cluster.shutdown()


def test_hub_user_opens_own_dashboard_without_typing(setup: Setup) -> None:
    browser = Browser()
    browser.hub_login(setup.hub, "alice")
    browser.hops.clear()
    final = browser.open(setup.dashboard)
    assert final.status == 200, [(h.status, h.url) for h in browser.hops]
    assert b"<html" in final.body.lower()
    gw_origin = setup.gw.address
    hub_origin = f"http://127.0.0.1:{setup.hub.port}"
    chain = [(h.status, h.url.split("?")[0]) for h in browser.hops]
    assert chain == [
        (302, setup.dashboard),
        (302, f"{gw_origin}/api/oauth_login"),
        (302, f"{hub_origin}/hub/api/oauth2/authorize"),
        (302, f"{gw_origin}/api/oauth_callback"),
        (200, setup.dashboard),
    ], chain
    # The gateway's login cookie now opens it directly (one hop), and the websocket path
    # of the page's resources too.
    browser.hops.clear()
    assert browser.open(setup.dashboard).status == 200
    assert len(browser.hops) == 1
    cookies = {c.name: c.value for c in browser.jar if c.name.startswith("dask-gateway-")}
    setup.gw.secrets.extend(cookies.values())
    assert "dask-gateway-oauth-state" not in cookies or not cookies["dask-gateway-oauth-state"]


def test_other_hub_user_gets_403(setup: Setup) -> None:
    browser = Browser()
    browser.hub_login(setup.hub, "bob")
    final = browser.open(setup.dashboard)
    assert final.status == 403, [(h.status, h.url) for h in browser.hops]
    # He went through the whole login (so it is a refusal of *bob*, not a missing login).
    assert any("/api/oauth_callback" in h.url for h in browser.hops)


def test_browser_not_logged_into_the_hub_lands_on_its_login_page(setup: Setup) -> None:
    browser = Browser()
    final = browser.open(setup.dashboard)
    assert final.status == 200
    assert urllib.parse.urlsplit(final.url).path == "/hub/login"
    assert b'name="_xsrf"' in final.body
    # Logging in there brings the browser back through the flow to the dashboard.
    xsrf = re.search(rb'name="_xsrf" value="([^"]+)"', final.body)
    assert xsrf
    done = browser.open(
        final.url, {"username": "alice", "password": "any", "_xsrf": xsrf.group(1).decode()}
    )
    assert done.status == 200 and done.url.startswith(setup.dashboard), [
        (h.status, h.url) for h in browser.hops
    ]


def test_oauth_login_refuses_an_open_redirect(setup: Setup) -> None:
    browser = Browser()
    for evil in ("//evil.example/", "http://evil.example/", "/clusters/../api/v1/clusters"):
        hop = browser.request(
            f"{setup.gw.address}/api/oauth_login?" + urllib.parse.urlencode({"next": evil})
        )
        assert hop.status == 400, (evil, hop)
