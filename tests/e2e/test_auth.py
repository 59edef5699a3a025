"""Spec §11.3 (shared password) and §11.31 (cookie expiry) on a password-protected server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.cookies import SimpleCookie

import aiohttp
import pytest
from dask_gateway import BasicAuth

from tests.e2e.harness import (
    CountingBasicAuth,
    GatewayUnderTest,
    base_config,
    basic,
    running_gateway,
)

PASSWORD = "e2e-shared-password-7f3a"  # distinctive: the logs are searched for it
COOKIE_MAX_AGE = 2


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    config = base_config(auth={"password": PASSWORD, "cookie_max_age": COOKIE_MAX_AGE})
    with running_gateway(
        tmp_path_factory, "password", config, default_password=PASSWORD, log_level="DEBUG"
    ) as gateway:
        yield gateway


def test_s03_shared_password(gw: GatewayUnderTest) -> None:
    auth = BasicAuth("alice", "bad")
    with gw.client(auth=auth) as gateway:
        with pytest.raises(aiohttp.ClientResponseError) as info:
            gateway.list_clusters()
        assert info.value.status == 401
        auth.password = PASSWORD
        assert gateway.list_clusters() == []


def test_s03_shared_password_raw(gw: GatewayUnderTest) -> None:
    for header in (basic("alice", "bad"), basic("alice", ""), basic("alice", PASSWORD + "x")):
        resp = gw.raw("GET", "/api/v1/clusters/", headers={"Authorization": header})
        assert resp.status == 401, resp
        assert resp.error()
        assert (resp.header("WWW-Authenticate") or "").split()[0] == "Basic", resp
        assert not resp.header_all("Set-Cookie"), resp
    resp = gw.raw("GET", "/api/v1/clusters/", user="alice", password=PASSWORD)
    assert resp.status == 200 and resp.json() == {}, resp


def test_s31_cookie_expiry(gw: GatewayUnderTest) -> None:
    resp = gw.raw("GET", "/api/v1/clusters/", user="carol")
    assert resp.status == 200, resp
    cookie = SimpleCookie()
    cookie.load(resp.header_all("Set-Cookie")[0])
    [(_, morsel)] = cookie.items()
    assert morsel["max-age"] == str(2 * COOKIE_MAX_AGE)

    auth = CountingBasicAuth("carol", PASSWORD)
    with gw.client(auth=auth) as gateway:
        assert gateway.list_clusters() == []
        assert gateway.list_clusters() == []
        assert auth.challenges == 1
        # The scenario itself: let the server-side cookie validity lapse.
        time.sleep(COOKIE_MAX_AGE + 1)
        assert gateway.list_clusters() == []
        assert auth.challenges == 2, "an expired cookie must be answered by a fresh 401"
