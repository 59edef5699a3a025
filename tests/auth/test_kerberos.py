"""Kerberos (SPNEGO) authentication against a REAL MIT KDC (temporary realm on loopback).

Client tokens come from ``pykerberos`` -- exactly what the official client's
``KerberosAuth`` calls -- with tickets from ``kinit``; the server side is our
``KerberosAuthenticator`` (``gssapi``) with the realm's keytab. First in-process (tokens,
mutual authentication, wrong principals, replays, garbage), then black-box through the
three services with ``Gateway(address, auth="kerberos")``.
"""

from __future__ import annotations

import base64
import gc
import logging
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import trio
from dask_gateway import Gateway
from hypothesis import given
from hypothesis import strategies as st

from dask_gateway_api.auth import CookieCache, User, UserAuth
from dask_gateway_api.auth_kerberos import (
    KERBEROS_FAILURE,
    MAX_TOKEN_BYTES,
    KerberosAuthenticator,
    negotiate_token_from_header,
    service_of_principal,
    user_from_principal,
)
from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import Response
from tests.auth.fakes import make_request
from tests.auth.kdc import TempRealm
from tests.auth.measure import record
from tests.auth.probe import WHOAMI_FIELD, decode_whoami
from tests.e2e.harness import ROOT, GatewayUnderTest, base_config, running_gateway

# --- pure parts -------------------------------------------------------------------------


def test_negotiate_header_parsing() -> None:
    token = base64.b64encode(b"\x60\x82gss").decode()
    assert negotiate_token_from_header(f"Negotiate {token}") == b"\x60\x82gss"
    assert negotiate_token_from_header(f"negotiate   {token} ") == b"\x60\x82gss"
    for bad in (
        None,
        "",
        "Negotiate",
        f"Basic {token}",
        "Negotiate not*base64",
        "Negotiate YWJj=extra",
        "Negotiate ====",
        "Negotiate " + "A" * (MAX_TOKEN_BYTES * 2),
    ):
        assert negotiate_token_from_header(bad) is None, bad


@given(st.text(max_size=300))
def test_negotiate_header_parsing_is_total(value: str) -> None:
    result = negotiate_token_from_header(value)
    assert result is None or (isinstance(result, bytes) and result)


def test_principal_parts() -> None:
    assert user_from_principal("alice@GATEWAY.TEST") == "alice"
    assert user_from_principal("alice/admin@GATEWAY.TEST") == "alice/admin"
    assert user_from_principal("bare") == "bare"
    assert service_of_principal("HTTP/gw.example.org@GATEWAY.TEST") == "HTTP"
    assert service_of_principal("HTTP@gw") == "HTTP"


# --- in-process, against the real KDC ---------------------------------------------------


def client_token(realm: TempRealm, user: str, service: str = "HTTP@127.0.0.1") -> tuple:
    """``(base64 token, pykerberos context)`` for ``service`` with ``user``'s ticket."""
    import kerberos

    os.environ["KRB5CCNAME"] = f"FILE:{realm.kinit(user)}"
    _, context = kerberos.authGSSClientInit(
        service, gssflags=kerberos.GSS_C_MUTUAL_FLAG | kerberos.GSS_C_SEQUENCE_FLAG
    )
    kerberos.authGSSClientStep(context, "")
    return kerberos.authGSSClientResponse(context), context


def negotiate(token: str) -> tuple[str, str]:
    return ("Authorization", f"Negotiate {token}")


async def test_ticket_gives_the_user_and_a_mutual_auth_token(realm: TempRealm) -> None:
    import kerberos

    auth = UserAuth(KerberosAuthenticator(str(realm.keytab)), CookieCache())
    with trio.fail_after(30):
        with pytest.raises(GatewayError) as info:
            await auth.authenticate(make_request())
        assert info.value.status == 401
        assert ("WWW-Authenticate", "Negotiate") in info.value.headers

        token, context = client_token(realm, "alice")
        request = make_request(negotiate(token))
        result = await auth.authenticate(request)
        assert result.user == User("alice") and result.fresh
        response = auth.finish(request, result, Response.json({}))
    [challenge] = [v for k, v in response.headers if k == "WWW-Authenticate"]
    scheme, _, server_token = challenge.partition(" ")
    assert scheme == "Negotiate" and server_token
    # The client checks the server's proof (what KerberosAuth.post_response does).
    assert kerberos.authGSSClientStep(context, server_token) == kerberos.AUTH_GSS_COMPLETE


async def test_gss_failures_are_500(realm: TempRealm, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    auth = KerberosAuthenticator(str(realm.keytab))
    garbage = base64.b64encode(b"\x60\x05hello").decode()
    with trio.fail_after(30):
        with pytest.raises(GatewayError) as info:
            await auth.authenticate(make_request(negotiate(garbage)))
        assert (info.value.status, info.value.message) == (500, KERBEROS_FAILURE)
        # The same token twice: the acceptor's replay cache refuses the second one.
        token, _ = client_token(realm, "alice")
        assert await auth.authenticate(make_request(negotiate(token))) == User("alice")
        with pytest.raises(GatewayError) as info:
            await auth.authenticate(make_request(negotiate(token)))
        assert info.value.status == 500
    assert "Kerberos failure" in caplog.text
    assert token not in caplog.text and garbage not in caplog.text


async def test_which_service_principals_are_accepted(realm: TempRealm) -> None:
    realm.kadmin("addprinc -randkey postgres/127.0.0.1")
    realm.kadmin(f"ktadd -k {realm.keytab} postgres/127.0.0.1")
    realm.kadmin("addprinc -randkey HTTP/not-in-keytab.test")
    default = KerberosAuthenticator(str(realm.keytab))  # any HTTP/* of the keytab
    bound = KerberosAuthenticator(str(realm.keytab), service_name="HTTP@127.0.0.1")
    with trio.fail_after(30):
        # Another HTTP host of the keytab: fine by default, refused when bound to one host.
        token, _ = client_token(realm, "bob", "HTTP@other.test")
        assert await default.authenticate(make_request(negotiate(token))) == User("bob")
        token, _ = client_token(realm, "bob", "HTTP@other.test")
        with pytest.raises(GatewayError):
            await bound.authenticate(make_request(negotiate(token)))
        token, _ = client_token(realm, "bob", "HTTP@127.0.0.1")
        assert await bound.authenticate(make_request(negotiate(token))) == User("bob")
        # A key of the keytab, but not an HTTP service: refused.
        token, _ = client_token(realm, "bob", "postgres@127.0.0.1")
        with pytest.raises(GatewayError) as info:
            await default.authenticate(make_request(negotiate(token)))
        assert info.value.status == 500
        # A principal the KDC knows but our keytab lacks.
        token, _ = client_token(realm, "bob", "HTTP@not-in-keytab.test")
        with pytest.raises(GatewayError):
            await default.authenticate(make_request(negotiate(token)))


async def test_sequential_and_concurrent_accepts_and_no_leak(realm: TempRealm) -> None:
    auth = KerberosAuthenticator(str(realm.keytab))
    tokens = [client_token(realm, "alice")[0] for _ in range(12)]
    users: list[User | None] = []

    async def one(token: str) -> None:
        users.append(await auth.authenticate(make_request(negotiate(token))))

    with trio.fail_after(30):
        samples = []
        for token in tokens[:6]:
            started = time.perf_counter()
            await one(token)
            samples.append(time.perf_counter() - started)
        async with trio.open_nursery() as nursery:
            for token in tokens[6:]:
                nursery.start_soon(one, token)
    assert users == [User("alice")] * 12
    record("Kerberos accept step incl. thread hop (median of 6)", statistics.median(samples), "s")
    # No pre_response happened (as when a handler fails): the tokens go with the requests.
    gc.collect()
    assert len(auth._server_tokens) == 0


def test_unusable_configuration(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        KerberosAuthenticator(str(tmp_path / "missing.keytab"))
    keytab = tmp_path / "empty.keytab"
    keytab.write_bytes(b"")
    with pytest.raises(ValueError):
        KerberosAuthenticator(str(keytab), service_name="  ")


# --- black box: the three services and the official client ------------------------------


@pytest.fixture(scope="module")
def gw(realm: TempRealm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    config = base_config(
        auth={"type": "kerberos", "kerberos_keytab": str(realm.keytab)},
        options={"fields": [WHOAMI_FIELD], "handler": "tests.auth.probe:whoami"},
        cluster={"worker_memory": "512 M", "scheduler_memory": "512 M"},
    )
    env = {**realm.env, "PYTHONPATH": str(ROOT)}
    with running_gateway(tmp_path_factory, "kerberos", config, env=env) as gateway:
        yield gateway


def kerberos_client(gw: GatewayUnderTest) -> Gateway:
    return Gateway(gw.address, proxy_address=gw.proxy_address, auth="kerberos")


def test_official_client_with_a_ticket(
    gw: GatewayUnderTest, realm: TempRealm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{realm.kinit('alice')}")
    with kerberos_client(gw) as alice:
        assert alice.list_clusters() == []
        # With the cookie from that answer, the options probe reports the user name.
        with pytest.raises(ValueError) as info:
            alice.submit(whoami=True)
        assert decode_whoami(info.value) == {"name": "alice", "groups": [], "admin": False}
        cluster = alice.new_cluster()
        try:
            assert [c.name for c in alice.list_clusters()] == [cluster.name]
            monkeypatch.setenv("KRB5CCNAME", f"FILE:{realm.kinit('bob')}")
            with kerberos_client(gw) as bob:
                assert bob.list_clusters() == []
                with pytest.raises(aiohttp.ClientResponseError) as error:
                    bob.get_cluster(cluster.name)
                assert error.value.status == 403
        finally:
            cluster.shutdown()
            cluster.close()


def test_official_client_without_a_ticket(
    gw: GatewayUnderTest, realm: TempRealm, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import kerberos

    monkeypatch.setenv("KRB5CCNAME", f"FILE:{tmp_path / 'no-such-ccache'}")
    with kerberos_client(gw) as nobody:
        # The client cannot even build a token: it fails before a second request.
        with pytest.raises(kerberos.GSSError):
            nobody.list_clusters()
    resp = gw.raw("GET", "/api/v1/clusters/")
    assert resp.status == 401 and resp.header("WWW-Authenticate") == "Negotiate", resp
    garbage = base64.b64encode(b"\x60\x05hello").decode()
    resp = gw.raw("GET", "/api/v1/clusters/", headers={"Authorization": f"Negotiate {garbage}"})
    assert resp.status == 500 and resp.error() == KERBEROS_FAILURE, resp
    assert resp.header("WWW-Authenticate") is None
