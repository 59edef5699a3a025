"""JupyterHub authentication against a REAL JupyterHub (``jupyterhub`` from PyPI).

In-process first (the authenticator talking to the hub: identities, scopes, legacy mode,
round-trip measurements), then black-box: the three real gateway services configured with
``auth.type: jupyterhub`` and the official client with ``auth="jupyterhub"``.

Who the gateway thinks the caller is comes from ``tests.auth.probe.whoami`` (an options
handler): submitting a cluster with ``whoami=True`` fails with the user as JSON, before any
process starts. Only one real dask cluster is started in this module.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest
import trio
from dask_gateway import Gateway, JupyterHubAuth

from dask_gateway_api.auth import User
from dask_gateway_api.auth_jupyterhub import (
    PERMISSION_FAILURE,
    UPSTREAM_FAILURE,
    HubAuthConfig,
    JupyterHubAuthenticator,
)
from dask_gateway_common.errors import GatewayError
from tests.auth.fakes import hub_auth, make_request
from tests.auth.hub import GATEWAY_SERVICE, RealHub, free_port
from tests.auth.measure import record
from tests.auth.probe import WHOAMI_FIELD, decode_whoami
from tests.e2e.harness import (
    ROOT,
    GatewayUnderTest,
    base_config,
    http_request,
    running_gateway,
    wait_workers,
)


@dataclass(frozen=True)
class Tokens:
    alice: str
    bob: str
    root: str
    narrow: str  # alice's token limited to reading her name: no access to the gateway


@pytest.fixture(scope="module")
def tokens(hub: RealHub) -> Tokens:
    return Tokens(
        alice=hub.create_token("alice"),
        bob=hub.create_token("bob"),
        root=hub.create_token("root"),
        narrow=hub.create_token("alice", scopes=["read:users:name!user"]),
    )


def hub_authenticator(hub: RealHub, **kwargs: object) -> JupyterHubAuthenticator:
    config = HubAuthConfig(api_url=hub.api_url, **kwargs)  # type: ignore[arg-type]
    return JupyterHubAuthenticator(config)


async def identify(auth: JupyterHubAuthenticator, token: str) -> User | None:
    return await auth.authenticate(make_request(hub_auth(token)))


# --- in-process, against the real hub ---------------------------------------------------


async def test_real_hub_identities(hub: RealHub, tokens: Tokens) -> None:
    with trio.fail_after(30):
        auth = hub_authenticator(hub, service_name=GATEWAY_SERVICE)
        try:
            assert await identify(auth, tokens.alice) == User("alice", frozenset({"analysts"}))
            assert await identify(auth, tokens.root) == User("root", admin=True)
            assert await identify(auth, hub.friend_token) == User("service:friend")
            # Valid hub tokens without access to the dask-gateway service:
            assert await identify(auth, tokens.narrow) is None
            assert await identify(auth, hub.stranger_token) is None
            # Not a hub token at all (the hub answers 403: for us a plain 401).
            assert await identify(auth, "0" * 32) is None
        finally:
            await auth.aclose()


async def test_real_hub_without_scope_check(hub: RealHub, tokens: Tokens) -> None:
    with trio.fail_after(30):
        auth = hub_authenticator(hub)  # no service name: any valid token is a user
        try:
            assert await identify(auth, tokens.narrow) == User("alice", frozenset({"analysts"}))
            assert await identify(auth, hub.stranger_token) == User("service:stranger")
            assert await identify(auth, "0" * 32) is None
        finally:
            await auth.aclose()


async def test_real_hub_legacy_token_api(hub: RealHub, tokens: Tokens) -> None:
    with trio.fail_after(30):
        auth = hub_authenticator(hub, legacy_api=True, api_token=hub.gateway_token)
        try:
            assert await identify(auth, tokens.bob) == User("bob")
            assert await identify(auth, hub.friend_token) == User("service:friend")
            assert await identify(auth, "0" * 32) is None  # hub 404
        finally:
            await auth.aclose()
        auth = hub_authenticator(hub, legacy_api=True, api_token="not-the-gateway-token")
        try:
            with pytest.raises(GatewayError) as info:
                await identify(auth, tokens.bob)
            assert (info.value.status, info.value.message) == (500, PERMISSION_FAILURE)
        finally:
            await auth.aclose()


async def test_measure_hub_round_trip(hub: RealHub, tokens: Tokens) -> None:
    """Uncached authentication costs one hub round trip; cached costs a dict lookup."""

    async def timed(auth: JupyterHubAuthenticator, n: int) -> list[float]:
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            assert await identify(auth, tokens.alice) is not None
            samples.append(time.perf_counter() - started)
        return samples

    with trio.fail_after(60):
        uncached = hub_authenticator(hub, service_name=GATEWAY_SERVICE, cache_ttl=0)
        cached = hub_authenticator(hub, service_name=GATEWAY_SERVICE, cache_ttl=60)
        try:
            await timed(uncached, 2)  # warm the connection pool
            slow = await timed(uncached, 20)
            await timed(cached, 1)
            fast = await timed(cached, 500)
        finally:
            await uncached.aclose()
            await cached.aclose()
    assert uncached.hub_requests == 22 and cached.hub_requests == 1
    slow_median, fast_median = statistics.median(slow), statistics.median(fast)
    record("hub auth, uncached (median of 20, GET /hub/api/user)", slow_median, "s")
    record("hub auth, cached (median of 500)", fast_median, "s")
    assert fast_median * 20 < slow_median, (fast_median, slow_median)


# --- black box: the three services and the official client ------------------------------


def hub_gateway_config(api_url: str) -> dict[str, object]:
    return base_config(
        auth={
            "type": "jupyterhub",
            "jupyterhub_api_url": api_url,
            "jupyterhub_service_name": GATEWAY_SERVICE,
            "jupyterhub_timeout": 5,
        },
        options={"fields": [WHOAMI_FIELD], "handler": "tests.auth.probe:whoami"},
        cluster={"worker_memory": "512 M", "scheduler_memory": "512 M"},
    )


#: The API process imports the probe handler from this checkout.
PROBE_ENV = {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def gw(hub: RealHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    with running_gateway(
        tmp_path_factory,
        "hub-auth",
        hub_gateway_config(hub.api_url),
        env=PROBE_ENV,
    ) as gateway:
        yield gateway


def client(gw: GatewayUnderTest, token: str) -> Gateway:
    return Gateway(gw.address, proxy_address=gw.proxy_address, auth=JupyterHubAuth(token))


def whoami(gateway: Gateway) -> dict[str, object]:
    # submit, not new_cluster: a failed new_cluster leaves an inner Gateway to the garbage
    # collector, whose __del__ deadlocks when it runs on the client's IO thread.
    with pytest.raises(ValueError) as info:
        gateway.submit(whoami=True)
    return decode_whoami(info.value)


def test_official_client_creates_and_uses_a_cluster(
    gw: GatewayUnderTest, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in a notebook: the token comes from the environment, auth="jupyterhub".
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", tokens.alice)
    with (
        Gateway(gw.address, proxy_address=gw.proxy_address, auth="jupyterhub") as alice,
        client(gw, tokens.bob) as bob,
    ):
        cluster = alice.new_cluster()
        try:
            assert [c.name for c in alice.list_clusters()] == [cluster.name]
            # Another hub user sees nothing of it.
            assert bob.list_clusters() == []
            with pytest.raises(aiohttp.ClientResponseError) as info:
                bob.get_cluster(cluster.name)
            assert info.value.status == 403  # not his (spec §2.2: names must match)
            cluster.scale(1)
            wait_workers(cluster, 1)
            with cluster.get_client(set_as_default=False) as dask_client:
                assert dask_client.submit(lambda x: x + 1, 41).result(timeout=60) == 42
        finally:
            cluster.shutdown()
            cluster.close()
        assert alice.list_clusters() == []


def test_gateway_sees_hub_names_groups_and_admin(gw: GatewayUnderTest, tokens: Tokens) -> None:
    with client(gw, tokens.alice) as gateway:
        assert whoami(gateway) == {"name": "alice", "groups": ["analysts"], "admin": False}
    with client(gw, tokens.root) as gateway:
        assert whoami(gateway) == {"name": "root", "groups": [], "admin": True}


def test_service_token_is_the_service_user(gw: GatewayUnderTest, hub: RealHub) -> None:
    with client(gw, hub.friend_token) as gateway:
        assert whoami(gateway) == {"name": "service:friend", "groups": [], "admin": False}
        assert gateway.list_clusters() == []


def test_tokens_without_the_service_scope_are_refused(
    gw: GatewayUnderTest, hub: RealHub, tokens: Tokens
) -> None:
    for token in (tokens.narrow, hub.stranger_token, "0" * 32):
        with client(gw, token) as gateway:
            with pytest.raises(aiohttp.ClientResponseError) as info:
                gateway.list_clusters()
            assert info.value.status == 401
    resp = gw.raw(
        "GET", "/api/v1/clusters/", headers={"Authorization": f"jupyterhub {tokens.narrow}"}
    )
    assert resp.status == 401, resp
    assert resp.header("WWW-Authenticate") == "jupyterhub", resp
    assert resp.error() == "Authentication required"
    assert not resp.header_all("Set-Cookie"), resp


def test_hub_down_is_502(tmp_path_factory: pytest.TempPathFactory, tokens: Tokens) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hub/api"  # nothing listens there
    with running_gateway(
        tmp_path_factory, "hub-down", hub_gateway_config(dead), env=PROBE_ENV
    ) as down:
        with client(down, tokens.alice) as gateway:
            with pytest.raises(aiohttp.ClientResponseError) as info:
                gateway.list_clusters()
            assert info.value.status == 502
        resp = http_request(
            down.address + "/api/v1/clusters/",
            headers={"Authorization": f"jupyterhub {tokens.alice}"},
        )
        assert resp.status == 502, resp
        assert resp.error() == UPSTREAM_FAILURE
        # The token is not in the API's log; its fingerprint is.
        log = down.local.log_tail("api", 200)
        assert UPSTREAM_FAILURE in log and tokens.alice not in log
