"""Dashboards only for their owner (issue 5 §3), black box: the three real services, the
official client and a real dask cluster, simple (HTTP Basic) auth.

The owner opens the dashboard with Basic credentials or the login cookie (page and bokeh
websocket), another user gets 403, a request without credentials the Basic challenge a
browser prompts for, and an unknown or stopped cluster is 404 whoever asks. A second
gateway with ``dashboards.auth: none`` keeps upstream's open dashboards. One dask cluster
per gateway.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from dask_gateway import Gateway
from dask_gateway.client import GatewayCluster

from tests.e2e.harness import (
    GatewayUnderTest,
    RawResponse,
    basic,
    default_config,
    http_request,
    running_gateway,
    wait_until,
    websocket_probe,
)

CHALLENGE = 'Basic realm="dask-gateway", charset="UTF-8"'


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    with running_gateway(tmp_path_factory, "dash-owner", default_config()) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def alice(gw: GatewayUnderTest) -> Iterator[Gateway]:
    with gw.client("alice") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def cluster(alice: Gateway) -> Iterator[GatewayCluster]:
    cluster = alice.new_cluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def page(gw: GatewayUnderTest, name: str, headers: dict[str, str] | None = None) -> RawResponse:
    return http_request(f"{gw.address}/clusters/{name}/status", headers=headers)


def bokeh_token(html: bytes) -> str:
    token = re.search(r'"token"\s*:\s*"([^"]+)"', html.decode("utf-8", "replace"))
    assert token, "no bokeh session token in the dashboard page"
    return token.group(1)


def login_cookie(resp: RawResponse) -> str:
    """``name=value`` of the gateway's login cookie set on ``resp``."""
    for value in resp.header_all("Set-Cookie"):
        pair = value.split(";")[0].strip()
        if pair.startswith("dask-gateway-"):
            assert "Path=/" in value, value
            return pair
    raise AssertionError(f"no login cookie in {resp!r}")


def test_owner_opens_the_dashboard(gw: GatewayUnderTest, cluster: GatewayCluster) -> None:
    assert cluster.dashboard_link == f"{gw.address}/clusters/{cluster.name}/status"
    host, port = gw.web_host_port
    owner = {"Authorization": basic("alice")}
    resp = page(gw, cluster.name, owner)
    assert resp.status == 200, resp
    assert (resp.header("Content-Type") or "").startswith("text/html"), resp
    cookie = login_cookie(resp)
    gw.secrets.append(cookie.split("=", 1)[1])  # must never reach a log

    # The cookie alone opens it too (a browser after the Basic prompt, or the OAuth login).
    again = page(gw, cluster.name, {"Cookie": f"theme=dark; {cookie}"})
    assert again.status == 200, again
    ws_path = f"/clusters/{cluster.name}/status/ws"
    for creds in (owner, {"Cookie": cookie}):
        probe = websocket_probe(
            host, port, ws_path, protocols=["bokeh", bokeh_token(again.body)], headers=creds
        )
        assert probe.status == 101, probe
        assert probe.accept_is_valid(), probe
        assert b'"msgtype": "ACK"' in probe.received, probe


def test_other_user_gets_403(gw: GatewayUnderTest, cluster: GatewayCluster) -> None:
    host, port = gw.web_host_port
    bob = {"Authorization": basic("bob")}
    resp = page(gw, cluster.name, bob)
    assert resp.status == 403, resp
    assert not resp.header_all("Set-Cookie"), resp
    probe = websocket_probe(host, port, f"/clusters/{cluster.name}/status/ws", headers=bob)
    assert probe.status == 403, probe
    # Bob's own cookie does not help either.
    with gw.client("bob") as gateway:
        assert gateway.list_clusters() == []
    bob_login = http_request(f"{gw.address}/api/v1/clusters/", headers=bob)
    resp = page(gw, cluster.name, {"Cookie": login_cookie(bob_login)})
    assert resp.status == 403, resp


def test_no_credentials_get_the_basic_challenge(
    gw: GatewayUnderTest, cluster: GatewayCluster
) -> None:
    host, port = gw.web_host_port
    for path in ("/status", "/individual-progress", "/statics/css/base.css"):
        resp = http_request(f"{gw.address}/clusters/{cluster.name}{path}")
        assert resp.status == 401, resp
        assert resp.header("WWW-Authenticate") == CHALLENGE, resp
    probe = websocket_probe(host, port, f"/clusters/{cluster.name}/status/ws")
    assert probe.status == 401, probe
    # A forged or stale cookie is no credential.
    resp = page(gw, cluster.name, {"Cookie": "dask-gateway-0123=not-a-session"})
    assert resp.status == 401, resp


def test_unknown_cluster_is_404_for_everyone(gw: GatewayUnderTest, cluster: GatewayCluster) -> None:
    for headers in ({"Authorization": basic("alice")}, {"Authorization": basic("bob")}, {}):
        for name in ("zzz", cluster.name + "0"):
            resp = page(gw, name, headers)
            assert resp.status == 404, (name, headers, resp)
            assert not resp.header_all("WWW-Authenticate"), resp


def test_access_endpoint_needs_the_proxy_token(
    gw: GatewayUnderTest, cluster: GatewayCluster
) -> None:
    """The internal check is reachable through the public port, but useless without the
    proxy token: the forwarding headers are not trusted from anyone else."""
    resp = http_request(
        f"{gw.address}/api/v1/clusters/{cluster.name}/access",
        headers={
            "Authorization": basic("alice"),
            "X-Dask-Gateway-Authorization": basic("alice"),
        },
    )
    assert (resp.status, resp.header("WWW-Authenticate")) == (401, "token"), resp


def test_stopped_cluster_is_404(gw: GatewayUnderTest, alice: Gateway) -> None:
    # Runs last in this module: it stops the module's cluster.
    name = alice.list_clusters()[0].name
    owner = {"Authorization": basic("alice")}
    assert page(gw, name, owner).status == 200
    alice.stop_cluster(name)
    wait_until(lambda: page(gw, name, owner).status == 404, 30, "the stopped dashboard to go")
    for headers in (owner, {"Authorization": basic("bob")}, {}):
        assert page(gw, name, headers).status == 404


# --- dashboards.auth: none --------------------------------------------------------------


def test_open_dashboards_setting(tmp_path_factory: pytest.TempPathFactory) -> None:
    config = default_config(dashboards={"auth": "none"})
    with running_gateway(tmp_path_factory, "dash-open", config) as gw:
        host, port = gw.web_host_port
        with gw.client("alice") as gateway:
            cluster = gateway.new_cluster()
            try:
                for headers in ({}, {"Authorization": basic("bob")}):
                    resp = page(gw, cluster.name, headers)
                    assert resp.status == 200, resp
                    assert not resp.header_all("Set-Cookie"), resp
                probe = websocket_probe(
                    host,
                    port,
                    f"/clusters/{cluster.name}/status/ws",
                    protocols=["bokeh", bokeh_token(resp.body)],
                )
                assert probe.status == 101, probe
                assert page(gw, "zzz").status == 404
            finally:
                cluster.shutdown()
