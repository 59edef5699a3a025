"""``make_authenticator``: settings (file + environment) → the authenticator, or every
problem as a ``SettingsError``; TLS toward the hub (CA + client certificate) end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import trio

from dask_gateway_api.auth import SimpleAuthenticator, User
from dask_gateway_api.auth_jupyterhub import UPSTREAM_FAILURE, JupyterHubAuthenticator
from dask_gateway_api.config import settings_from_mapping
from dask_gateway_api.main import make_authenticator
from dask_gateway_common.errors import GatewayError
from dask_gateway_common.settings import SettingsError
from tests.auth.fakes import (
    FakeHub,
    hub_auth,
    make_pki,
    make_request,
    mutual_tls_server_context,
    running_fake_hub,
)

ENV = {"DASK_GATEWAY_PROXY_TOKEN": "p" * 32}
HUB = {"type": "jupyterhub", "jupyterhub_api_url": "http://hub:8081/hub/api"}


def problems_of(auth: dict[str, object], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(SettingsError) as info:
        settings_from_mapping({"auth": auth}, {**ENV, **(env or {})})
    return info.value.problems


def test_jupyterhub_settings_and_defaults() -> None:
    settings = settings_from_mapping({"auth": HUB}, ENV).auth
    assert settings.jupyterhub_cache_ttl == 60.0 and settings.jupyterhub_cache_size == 1024
    assert settings.jupyterhub_timeout == 10.0 and settings.jupyterhub_legacy_api is False
    assert settings.jupyterhub_use_service_access_scopes is None
    auth = make_authenticator(settings)
    assert isinstance(auth, JupyterHubAuthenticator)
    assert auth.config.check_scopes is False  # no service name
    env = {
        "JUPYTERHUB_SERVICE_NAME": "dask-gateway",
        "DASK_GATEWAY_AUTH__JUPYTERHUB_CACHE_TTL": "5",
        "DASK_GATEWAY_AUTH__JUPYTERHUB_CACHE_SIZE": "10",
        "DASK_GATEWAY_AUTH__JUPYTERHUB_TIMEOUT": "2.5",
    }
    settings = settings_from_mapping({"auth": HUB}, {**ENV, **env}).auth
    auth = make_authenticator(settings)
    assert isinstance(auth, JupyterHubAuthenticator)
    assert auth.config.check_scopes is True and auth.config.service_name == "dask-gateway"
    assert (auth.config.cache_ttl, auth.config.cache_size, auth.config.timeout) == (5, 10, 2.5)
    assert "hub-secret" not in repr(
        settings_from_mapping({"auth": dict(HUB, jupyterhub_api_token="hub-secret")}, ENV)
    )


def test_jupyterhub_problems_are_all_reported() -> None:
    problems = problems_of(
        dict(
            HUB,
            jupyterhub_legacy_api=True,
            jupyterhub_use_service_access_scopes=True,
            jupyterhub_tls_key="/k.pem",
            jupyterhub_cache_ttl=-1,
            jupyterhub_cache_size=0,
            jupyterhub_timeout=0,
        )
    )
    text = "\n".join(problems)
    for expected in (
        "auth.jupyterhub_legacy_api needs the gateway's own hub token",
        "cannot be enforced with auth.jupyterhub_legacy_api",
        "auth.jupyterhub_tls_key is set without auth.jupyterhub_tls_cert",
        "auth.jupyterhub_cache_ttl: must be >= 0",
        "auth.jupyterhub_cache_size: must be > 0",
        "auth.jupyterhub_timeout: must be > 0",
    ):
        assert expected in text, (expected, problems)
    secret = "bad token\x01"
    problems = problems_of(dict(HUB, jupyterhub_api_token=secret))
    assert problems == ["auth.jupyterhub_api_token: must be printable ASCII without whitespace"]
    assert secret not in "".join(problems)
    padded = settings_from_mapping({"auth": dict(HUB, jupyterhub_api_token=" tok \n")}, ENV)
    assert padded.auth.jupyterhub_api_token == "tok"
    assert any(
        "needs auth.jupyterhub_service_name" in p
        for p in problems_of(dict(HUB, jupyterhub_use_service_access_scopes=True))
    )
    assert problems_of(HUB, {"DASK_GATEWAY_AUTH__JUPYTERHUB_LEGACY_API": "maybe"}) == [
        "DASK_GATEWAY_AUTH__JUPYTERHUB_LEGACY_API: expected true or false, got 'maybe'"
    ]
    # The JupyterHub keys are only cross-checked when that authenticator is used.
    settings_from_mapping({"auth": {"jupyterhub_legacy_api": True}}, ENV)


def test_unreadable_tls_files_are_settings_errors(tmp_path: Path) -> None:
    settings = settings_from_mapping(
        {"auth": dict(HUB, jupyterhub_tls_ca=str(tmp_path / "missing-ca.pem"))}, ENV
    ).auth
    with pytest.raises(SettingsError) as info:
        make_authenticator(settings)
    assert "auth.jupyterhub_tls_*: cannot load" in info.value.problems[0]


def test_simple() -> None:
    settings = settings_from_mapping({"auth": {"password": "pw"}}, ENV).auth
    assert isinstance(make_authenticator(settings), SimpleAuthenticator)


def test_kerberos_keytab_must_be_readable(tmp_path: Path) -> None:
    if importlib.util.find_spec("gssapi") is None:
        # Without the binding the error names the missing package instead.
        settings = settings_from_mapping({"auth": {"type": "kerberos"}}, ENV).auth
        with pytest.raises(SettingsError, match="needs the Python package 'gssapi'"):
            make_authenticator(settings)
        return
    missing = str(tmp_path / "nope.keytab")
    settings = settings_from_mapping(
        {"auth": {"type": "kerberos", "kerberos_keytab": missing}}, ENV
    ).auth
    with pytest.raises(SettingsError) as info:
        make_authenticator(settings)
    assert info.value.problems == [
        f"auth.kerberos_keytab: cannot read {missing!r}: No such file or directory"
    ]
    assert problems_of({"type": "kerberos", "kerberos_service_name": " "}) == [
        "auth.kerberos_service_name: must not be empty"
    ]


async def test_hub_over_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    hub = FakeHub()
    hub.user("tok", {"kind": "user", "name": "alice"})
    with trio.fail_after(20):
        async with running_fake_hub(hub, ssl_context=mutual_tls_server_context(pki)):

            def build(**tls: str) -> JupyterHubAuthenticator:
                keys = {f"jupyterhub_{k}": v for k, v in tls.items()}
                settings = settings_from_mapping(
                    {"auth": dict(HUB, jupyterhub_api_url=hub.url, **keys)}, ENV
                ).auth
                auth = make_authenticator(settings)
                assert isinstance(auth, JupyterHubAuthenticator)
                return auth

            auth = build(
                tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key)
            )
            assert await auth.authenticate(make_request(hub_auth("tok"))) == User("alice")
            await auth.aclose()
            # Without the client certificate the hub hangs up: 502, not a crash.
            # Without our CA the hub's certificate is not trusted: 502 too.
            for tls in (
                {"tls_ca": str(pki.ca)},
                {"tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)},
            ):
                auth = build(**tls)
                with pytest.raises(GatewayError) as info:
                    await auth.authenticate(make_request(hub_auth("tok")))
                assert (info.value.status, info.value.message) == (502, UPSTREAM_FAILURE)
                await auth.aclose()
    assert len(hub.requests) == 1
