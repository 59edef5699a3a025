"""Spec §11 scenarios on the default server (simple auth, the §11.5 options), official client.

One gateway for the whole module; each scenario uses its own user name where it asserts on
a user's whole cluster list, so scenarios do not see each other's clusters.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import dask
import pytest
from dask_gateway import (
    BasicAuth,
    Gateway,
    GatewayCluster,
    GatewayClusterError,
)
from dask_gateway.client import ClusterStatus

from tests.e2e.harness import (
    START_TIMEOUT,
    WORKER_TIMEOUT,
    CountingBasicAuth,
    GatewayUnderTest,
    assert_stays,
    basic,
    default_config,
    http_request,
    names,
    running_gateway,
    scheduler_token,
    time_limit,
    wait_status,
    wait_until,
    wait_workers,
    websocket_probe,
    worker_count,
)

ALLOWED_KEYS = {
    "name",
    "status",
    "dashboard_route",
    "start_time",
    "stop_time",
    "options",
    "tls_cert",
    "tls_key",
}
DEFAULT_OPTIONS = {"worker_cores": 1, "size": "small"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    # DEBUG: the logs are searched for secrets at the end (tokens, cookies).
    with running_gateway(
        tmp_path_factory, "default", default_config(), log_level="DEBUG"
    ) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def alice(gw: GatewayUnderTest) -> Iterator[Gateway]:
    with gw.client("alice") as gateway:
        yield gateway


@pytest.fixture(scope="module")
def running(gw: GatewayUnderTest) -> Iterator[GatewayCluster]:
    """A RUNNING cluster of alice's, without workers, shared by read-only scenarios."""
    with gw.client("alice") as gateway, time_limit(START_TIMEOUT, "shared cluster start"):
        cluster = gateway.new_cluster()
    try:
        yield cluster
    finally:
        with time_limit(30, "shared cluster shutdown"):
            cluster.shutdown()


@pytest.fixture(scope="module")
def stopped(gw: GatewayUnderTest) -> str:
    """The name of a cluster of alice's that ran and was then stopped."""
    with gw.client("alice") as gateway, time_limit(START_TIMEOUT + 30, "stopped fixture"):
        name = gateway.submit()
        wait_status(gateway, name, "RUNNING", timeout=START_TIMEOUT)
        gateway.stop_cluster(name)
    return name


def proxy_gateway_address(gw: GatewayUnderTest) -> str:
    """What the client computes from ``proxy_address`` (spec §3.1)."""
    return "gateway://" + gw.proxy_address.split("://", 1)[1]


def _compute(cluster: GatewayCluster) -> None:
    client = cluster.get_client(set_as_default=False)
    try:
        assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
    finally:
        client.close()


# --- 1. versions ------------------------------------------------------------------------


def test_s01_versions(gw: GatewayUnderTest, alice: Gateway) -> None:
    versions = alice.get_versions()
    assert set(versions) == {"server", "client"}
    assert versions["client"] == {"version": "2026.3.0"}
    assert isinstance(versions["server"]["version"], str) and versions["server"]["version"]

    for path in ("/api/version", "/api/health"):
        resp = gw.raw("GET", path)
        assert resp.status == 200, resp
        assert resp.is_json, resp
    assert gw.raw("GET", "/api/health").json() == {"status": "pass"}
    assert gw.raw("GET", "/api/version").json()["version"] == versions["server"]["version"]


# --- 2. auth handshake and cookie --------------------------------------------------------


def test_s02_auth_handshake_and_cookie_raw(gw: GatewayUnderTest) -> None:
    resp = gw.raw("GET", "/api/v1/clusters/")
    assert resp.status == 401, resp
    assert resp.error()
    challenge = resp.header("WWW-Authenticate")
    assert challenge is not None and challenge.split()[0] == "Basic", resp

    resp = gw.raw("GET", "/api/v1/clusters/", user="dave")
    assert resp.status == 200, resp
    assert resp.is_json and resp.json() == {}, resp
    set_cookies = resp.header_all("Set-Cookie")
    assert len(set_cookies) == 1, resp
    cookie = SimpleCookie()
    cookie.load(set_cookies[0])
    [(cookie_name, morsel)] = cookie.items()
    assert morsel["path"] == "/", set_cookies
    assert morsel["max-age"] == "600", set_cookies

    gw.secrets.append(morsel.value)
    cookie_header = f"{cookie_name}={morsel.value}"
    resp = gw.raw("GET", "/api/v1/clusters/", headers={"Cookie": cookie_header})
    assert resp.status == 200, resp
    assert resp.json() == {}

    # A cookie the server never issued is no credential.
    resp = gw.raw("GET", "/api/v1/clusters/", headers={"Cookie": f"{cookie_name}=forged"})
    assert resp.status == 401, resp


def test_s02_client_sees_one_401(gw: GatewayUnderTest) -> None:
    auth = CountingBasicAuth("dave2")
    with gw.client(auth=auth) as gateway:
        assert gateway.list_clusters() == []
        assert gateway.list_clusters() == []
        gateway.get_versions()
        gateway.cluster_options()
    assert auth.challenges == 1


# --- 4. empty state ---------------------------------------------------------------------


def test_s04_empty_state(gw: GatewayUnderTest) -> None:
    with gw.client("erin") as gateway:
        assert gateway.list_clusters() == []
        assert gateway.list_clusters(status="stopped") == []


# --- 5. options spec --------------------------------------------------------------------


def test_s05_options_spec(gw: GatewayUnderTest, alice: Gateway) -> None:
    raw = gw.raw("GET", "/api/v1/options", user="alice")
    assert raw.status == 200 and raw.is_json, raw
    assert raw.json() == {
        "cluster_options": [
            {
                "field": "worker_cores",
                "label": "Worker cores",
                "default": 1,
                "spec": {"type": "int", "min": 1, "max": 4},
            },
            {
                "field": "size",
                "label": "Worker size",
                "default": "small",
                "spec": {"type": "select", "options": ["small", "large"]},
            },
        ]
    }

    opts = alice.cluster_options()
    assert list(opts) == ["worker_cores", "size"]
    assert opts.worker_cores == 1
    assert opts.size == "small"
    with pytest.raises(ValueError):
        opts.worker_cores = 5
    with pytest.raises(ValueError):
        opts.size = "x"

    with dask.config.set({"gateway.cluster.options": {"worker_cores": 2}}):
        assert alice.cluster_options().worker_cores == 2
        assert alice.cluster_options(use_local_defaults=False).worker_cores == 1


# --- 6. full happy path (sync and asynchronous) -----------------------------------------


def test_s06_full_happy_path(gw: GatewayUnderTest) -> None:
    with gw.client("frank") as gateway:
        cluster = gateway.new_cluster()
        try:
            name = cluster.name
            assert name
            assert cluster.scheduler_address == f"{proxy_gateway_address(gw)}/{name}"
            assert cluster.dashboard_link == f"{gw.address}/clusters/{name}/status"
            listed = {r.name: r for r in gateway.list_clusters()}
            assert set(listed) == {name}
            assert listed[name].status is ClusterStatus.RUNNING

            cluster.scale(2)
            wait_workers(cluster, 2)
            client = cluster.get_client(set_as_default=False)
            try:
                assert client.dashboard_link == cluster.dashboard_link
                assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2

                cluster.scale(1)
                wait_workers(cluster, 1)
                assert_stays(lambda: worker_count(cluster) == 1, 1.0, "exactly one worker")
                assert client.submit(lambda x: x * 10, 4).result(timeout=30) == 40
            finally:
                client.close()
        finally:
            cluster.shutdown()
        assert gateway.list_clusters() == []


def test_s06_full_happy_path_asynchronous(gw: GatewayUnderTest) -> None:
    async def wait_for_workers(cluster: GatewayCluster, count: int) -> None:
        # The client exposes no event for worker changes: poll (bounded by wait_for).
        while worker_count(cluster) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    async def scenario() -> None:
        async with Gateway(
            gw.address,
            proxy_address=gw.proxy_address,
            auth=BasicAuth("frank-async", ""),
            asynchronous=True,
        ) as gateway:
            cluster = await asyncio.wait_for(gateway.new_cluster(), START_TIMEOUT)
            try:
                name = cluster.name
                assert cluster.scheduler_address == f"{proxy_gateway_address(gw)}/{name}"
                assert cluster.dashboard_link == f"{gw.address}/clusters/{name}/status"
                reports = await gateway.list_clusters()
                assert [(r.name, r.status) for r in reports] == [(name, ClusterStatus.RUNNING)]

                await cluster.scale(2)
                await asyncio.wait_for(wait_for_workers(cluster, 2), WORKER_TIMEOUT)
                client = await cluster.get_client(set_as_default=False)
                try:
                    assert await client.submit(lambda x: x + 1, 1) == 2
                    await cluster.scale(1)
                    await asyncio.wait_for(wait_for_workers(cluster, 1), WORKER_TIMEOUT)
                    assert await client.submit(lambda x: x + 2, 1) == 3
                finally:
                    await client.close()
            finally:
                await cluster.shutdown()
            assert await gateway.list_clusters() == []

    asyncio.run(asyncio.wait_for(scenario(), 140))


def test_s01_s05_s12_s13_asynchronous_client(gw: GatewayUnderTest, running: GatewayCluster) -> None:
    """The request/response scenarios once more with ``asynchronous=True``."""

    async def scenario() -> None:
        async with (
            Gateway(
                gw.address,
                proxy_address=gw.proxy_address,
                auth=BasicAuth("alice", ""),
                asynchronous=True,
            ) as alice,
            Gateway(
                gw.address,
                proxy_address=gw.proxy_address,
                auth=BasicAuth("bob", ""),
                asynchronous=True,
            ) as bob,
        ):
            versions = await alice.get_versions()
            assert versions["client"] == {"version": "2026.3.0"}
            opts = await alice.cluster_options()
            assert dict(opts) == DEFAULT_OPTIONS
            assert running.name in {r.name for r in await alice.list_clusters()}
            report = await alice.get_cluster(running.name)
            assert report.status is ClusterStatus.RUNNING
            with pytest.raises(ValueError):
                await alice.get_cluster("nope")
            with pytest.raises(ValueError):
                await alice.scale_cluster("nope", 1)
            assert await alice.stop_cluster("nope") is None
            with pytest.raises(aiohttp.ClientResponseError) as info:
                await bob.get_cluster(running.name)
            assert info.value.status == 403
            assert await bob.list_clusters() == []

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_client_configured_from_dask_config(gw: GatewayUnderTest, running: GatewayCluster) -> None:
    """Spec §11 harness note: the client may take everything from dask config."""
    settings = {
        "gateway.address": gw.address,
        "gateway.proxy-address": gw.proxy_address,
        "gateway.auth.type": "basic",
        "gateway.auth.kwargs": {"username": "alice", "password": ""},
    }
    with dask.config.set(settings), Gateway() as gateway:
        assert running.name in names(gateway.list_clusters())
        cluster = gateway.connect(running.name)
        try:
            assert cluster.scheduler_address == f"{proxy_gateway_address(gw)}/{running.name}"
        finally:
            cluster.close()


# --- 7. report fields -------------------------------------------------------------------


def test_s07_report_fields(gw: GatewayUnderTest, alice: Gateway, running: GatewayCluster) -> None:
    report = alice.get_cluster(running.name)
    assert report.status is ClusterStatus.RUNNING
    assert report.options == DEFAULT_OPTIONS
    assert isinstance(report.start_time, datetime)
    assert report.stop_time is None
    assert report.tls_cert.startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY-----" in report.tls_key
    assert report.security is not None
    assert report.scheduler_address == f"{proxy_gateway_address(gw)}/{running.name}"
    assert report.dashboard_link == f"{gw.address}/clusters/{running.name}/status"

    wire = gw.wire_cluster(running.name)
    assert set(wire) <= ALLOWED_KEYS, wire.keys()
    assert {"name", "status", "dashboard_route", "start_time", "stop_time", "options"} <= set(wire)
    assert wire["status"] == "RUNNING"
    assert wire["dashboard_route"] == f"/clusters/{running.name}/status"
    assert isinstance(wire["start_time"], int) and wire["start_time"] > 1_600_000_000_000
    assert wire["options"] == DEFAULT_OPTIONS

    listing = gw.raw("GET", "/api/v1/clusters/", user="alice")
    assert listing.status == 200 and listing.is_json, listing
    entries = listing.json()
    assert isinstance(entries, dict) and running.name in entries
    for entry in entries.values():
        assert set(entry) <= ALLOWED_KEYS, entry.keys()
        assert isinstance(entry["status"], str)


# --- 8. after stop ----------------------------------------------------------------------


def test_s08_after_stop(alice: Gateway, stopped: str) -> None:
    status = wait_status(alice, stopped, "STOPPED", timeout=30)
    assert status == "STOPPED"
    report = alice.get_cluster(stopped)
    assert isinstance(report.stop_time, datetime)
    assert report.stop_time >= report.start_time
    assert report.dashboard_link is None
    assert report.scheduler_address is None
    assert report.tls_key is None
    assert stopped in names(alice.list_clusters(status="stopped"))
    assert stopped not in names(alice.list_clusters(status=["running", "pending"]))
    assert stopped not in names(alice.list_clusters())


# --- 9. submit / connect ----------------------------------------------------------------


def test_s09_submit_and_connect(gw: GatewayUnderTest) -> None:
    with gw.client("heidi") as gateway:
        name = gateway.submit()
        try:
            assert isinstance(name, str) and name
            cluster = gateway.connect(name)
            assert cluster.shutdown_on_close is False
            assert cluster.name == name
            client = cluster.get_client(set_as_default=False)
            try:
                info = client.scheduler_info()
                assert info["type"] == "Scheduler"
            finally:
                client.close()
            cluster.close()
            assert gateway.get_cluster(name).status is ClusterStatus.RUNNING
        finally:
            gateway.stop_cluster(name)
        assert wait_status(gateway, name, "STOPPED", timeout=30) == "STOPPED"
        assert gateway.list_clusters() == []


# --- 10. constructor and context manager ------------------------------------------------


def test_s10_constructor_and_context_manager(gw: GatewayUnderTest) -> None:
    with GatewayCluster(
        address=gw.address, proxy_address=gw.proxy_address, auth=BasicAuth("ivan", "")
    ) as cluster:
        cluster.scale(1)
        wait_workers(cluster, 1)
        _compute(cluster)
    with gw.client("ivan") as gateway:
        assert gateway.list_clusters() == []


# --- 11. options on create --------------------------------------------------------------


def test_s11_options_on_create(gw: GatewayUnderTest) -> None:
    with gw.client("judy") as gateway:
        cluster = gateway.new_cluster(size="large")
        try:
            assert gateway.get_cluster(cluster.name).options == {
                "worker_cores": 1,
                "size": "large",
            }
        finally:
            cluster.shutdown()

        opts = gateway.cluster_options()
        opts.worker_cores = 2
        name = gateway.submit(cluster_options=opts, size="large")
        try:
            assert gateway.get_cluster(name).options == {"worker_cores": 2, "size": "large"}
        finally:
            gateway.stop_cluster(name)

        with pytest.raises(ValueError, match="Unknown fields"):
            gateway.new_cluster(bogus=1)
        with pytest.raises(ValueError, match="worker_cores"):
            gateway.new_cluster(worker_cores=9)
        with pytest.raises(ValueError, match="size"):
            gateway.new_cluster(size="medium")
        assert gateway.list_clusters() == []

    auth = CountingBasicAuth("judy")
    with gw.client(auth=auth) as gateway:
        with pytest.raises(TypeError):
            gateway.new_cluster(cluster_options=10)
    assert auth.challenges == 0, "a request was sent for a client-side TypeError"


# --- 12. unknown cluster ----------------------------------------------------------------


def test_s12_unknown_cluster(alice: Gateway) -> None:
    with pytest.raises(ValueError, match="nope"):
        alice.get_cluster("nope")
    with pytest.raises(ValueError):
        alice.connect("nope")
    with pytest.raises(ValueError):
        alice.scale_cluster("nope", 1)
    with pytest.raises(ValueError):
        alice.adapt_cluster("nope")
    assert alice.stop_cluster("nope") is None


# --- 13. another user's cluster ---------------------------------------------------------


def test_s13_other_users_cluster(gw: GatewayUnderTest, running: GatewayCluster) -> None:
    with gw.client("bob") as bob:
        for action in (
            lambda: bob.get_cluster(running.name),
            lambda: bob.stop_cluster(running.name),
            lambda: bob.scale_cluster(running.name, 1),
            lambda: bob.adapt_cluster(running.name),
            lambda: bob.connect(running.name),
        ):
            with pytest.raises(aiohttp.ClientResponseError) as info:
                action()
            assert info.value.status == 403
        assert running.name not in names(bob.list_clusters())
        assert running.name not in names(bob.list_clusters(status=["running", "stopped"]))
    with gw.client("alice") as alice:
        assert alice.get_cluster(running.name).status is ClusterStatus.RUNNING


# --- 14. bad status filter --------------------------------------------------------------


def test_s14_bad_status_filter(gw: GatewayUnderTest, alice: Gateway) -> None:
    with pytest.raises(ValueError):
        alice.list_clusters(status="bogus")
    resp = gw.raw("GET", "/api/v1/clusters/?status=bogus", user="alice")
    assert resp.status == 422, resp
    assert "not a valid ClusterStatus" in resp.error()
    resp = gw.raw("GET", "/api/v1/clusters/?status=running", user="alice")
    assert resp.status == 200 and resp.is_json, resp
    assert isinstance(resp.json(), dict)
    resp = gw.raw("GET", "/api/v1/clusters/?status=RUNNING,pending", user="alice")
    assert resp.status == 200, resp


# --- 15. scale validation ---------------------------------------------------------------


def test_s15_scale_validation(
    gw: GatewayUnderTest, alice: Gateway, running: GatewayCluster
) -> None:
    path = f"/api/v1/clusters/{running.name}/scale"
    for body in ({"count": -1}, {"count": "2"}, {"count": 1.5}, {"count": None}, {}):
        resp = gw.raw("POST", path, user="alice", json_body=body)
        assert resp.status == 422, (body, resp)
        assert "non-negative integer" in resp.error(), (body, resp)
    with pytest.raises(ValueError, match="non-negative integer"):
        alice.scale_cluster(running.name, -1)
    assert alice.get_cluster(running.name).status is ClusterStatus.RUNNING


# --- 18. scale a non-running cluster ----------------------------------------------------


def test_s18_scale_not_running(alice: Gateway, stopped: str) -> None:
    wait_status(alice, stopped, "STOPPED", timeout=30)
    with pytest.raises(GatewayClusterError, match="not running"):
        alice.scale_cluster(stopped, 1)
    with pytest.raises(GatewayClusterError, match="not running"):
        alice.adapt_cluster(stopped)


# --- 21. connect to a stopped cluster ---------------------------------------------------


def test_s21_connect_to_stopped(alice: Gateway, stopped: str) -> None:
    wait_status(alice, stopped, "STOPPED", timeout=30)
    with pytest.raises(GatewayClusterError, match="already stopped"):
        alice.connect(stopped)


# --- 25. dashboard through the web proxy ------------------------------------------------


def test_s25_dashboard_via_web_proxy(gw: GatewayUnderTest) -> None:
    host, port = gw.web_host_port
    with gw.client("kim") as gateway:
        cluster = gateway.new_cluster()
        try:
            link = cluster.dashboard_link
            owner = {"Authorization": basic("kim")}  # dashboards are owner-only by default
            page = http_request(link, headers=owner)
            assert page.status == 200, page
            assert (page.header("Content-Type") or "").startswith("text/html"), page
            html = page.body.decode("utf-8", "replace")
            assert "<html" in html.lower()

            ws_path = f"/clusters/{cluster.name}/status/ws"
            token = re.search(r'"token"\s*:\s*"([^"]+)"', html)
            assert token, "no bokeh session token in the dashboard page"
            probe = websocket_probe(
                host, port, ws_path, protocols=["bokeh", token.group(1)], headers=owner
            )
            assert probe.status == 101, probe
            assert probe.accept_is_valid(), probe
            assert b'"msgtype": "ACK"' in probe.received, probe  # server -> client
            assert b"\x88" in probe.received, probe  # its reply to our close frame

            # Without the bokeh subprotocol bokeh still upgrades, then closes at once.
            assert websocket_probe(host, port, ws_path, headers=owner).status == 101
        finally:
            cluster.shutdown()
    wait_until(
        lambda: http_request(link, headers=owner).status == 404,
        10,
        "the dashboard route to be removed after shutdown",
    )
    missing = http_request(f"{gw.address}/clusters/zzz/status")
    assert missing.status == 404, missing


# --- 28. token endpoints ----------------------------------------------------------------


def test_s28_token_endpoints(gw: GatewayUnderTest, alice: Gateway, running: GatewayCluster) -> None:
    other = alice.new_cluster(shutdown_on_close=True)
    try:
        client = other.get_client(set_as_default=False)
        try:
            other_token = scheduler_token(client)
        finally:
            client.close()
        assert other_token
        gw.secrets.append(other_token)

        heartbeat = f"/api/v1/clusters/{running.name}/heartbeat"
        body = {
            "scheduler_address": "tls://127.0.0.1:1",
            "dashboard_address": "",
            "api_address": "http://127.0.0.1:1",
            "count": 0,
            "active_workers": [],
            "closing_workers": [],
            "closed_workers": [],
        }
        for headers in (
            {},
            {"Authorization": "token wrong"},
            {"Authorization": f"token {other_token}"},
            {"Authorization": "Basic YWxpY2U6"},  # alice's user credentials do not count
        ):
            resp = gw.raw("POST", heartbeat, headers=headers, json_body=body)
            assert resp.status == 401, (headers, resp)
            assert resp.header("WWW-Authenticate") == "token", resp
            assert resp.error()
        # The forged heartbeats changed nothing.
        assert gw.wire_cluster(running.name)["status"] == "RUNNING"
        assert gw.wire_cluster(running.name)["dashboard_route"] is not None

        # The right token with a garbage body (a confused or hostile scheduler): a clear
        # 4xx, and the cluster is unaffected.
        own_heartbeat = f"/api/v1/clusters/{other.name}/heartbeat"
        token_header = {"Authorization": f"token {other_token}"}
        for bad in (
            b"{not json",
            b"[]",
            json.dumps({**body, "count": "many"}).encode(),
            json.dumps({**body, "active_workers": 5}).encode(),
            json.dumps({**body, "closed_workers": [1, 2]}).encode(),
            json.dumps({**body, "scheduler_address": 7}).encode(),
        ):
            resp = gw.raw(
                "POST",
                own_heartbeat,
                headers={**token_header, "Content-Type": "application/json"},
                body=bad,
            )
            assert resp.status in (400, 422), (bad, resp)
            assert resp.error()
        assert alice.get_cluster(other.name).status is ClusterStatus.RUNNING
        client = other.get_client(set_as_default=False)
        try:
            assert client.scheduler_info()["type"] == "Scheduler"
        finally:
            client.close()

        # Another cluster's token does not stop this one (falls through to user auth: 401).
        resp = gw.raw(
            "DELETE",
            f"/api/v1/clusters/{running.name}",
            headers={"Authorization": f"token {other_token}"},
        )
        assert resp.status == 401, resp
        assert alice.get_cluster(running.name).status is ClusterStatus.RUNNING

        resp = gw.raw(
            "DELETE",
            f"/api/v1/clusters/{other.name}",
            headers={"Authorization": f"token {other_token}"},
        )
        assert resp.status == 204, resp
        assert resp.body == b""
        assert wait_status(alice, other.name, "STOPPED", timeout=30) == "STOPPED"
    finally:
        other.shutdown()


# --- 32. atexit cleanup -----------------------------------------------------------------


def test_s32_atexit_cleanup(gw: GatewayUnderTest) -> None:
    script = textwrap.dedent(
        f"""
        from dask_gateway import BasicAuth, GatewayCluster
        cluster = GatewayCluster(
            address={gw.address!r}, proxy_address={gw.proxy_address!r},
            auth=BasicAuth("leo", ""),
        )
        print(cluster.name, flush=True)
        # exit without closing: the client's atexit hook must stop the cluster
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=START_TIMEOUT + 30
    )
    assert done.returncode == 0, done.stderr[-2000:]
    name = done.stdout.strip().splitlines()[-1]
    with gw.client("leo") as gateway:
        assert gateway.list_clusters() == []
        report: Any = gateway.get_cluster(name)
        assert report.status in (ClusterStatus.STOPPING, ClusterStatus.STOPPED)
