"""Settings (pure) and the dispatch decision (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dask_gateway_common.sni import NOT_TLS, UNRECOGNIZED_NAME, ClientHello
from dask_gateway_scheduler_proxy.config import ProxySettings, SettingsError, load_settings
from dask_gateway_scheduler_proxy.dispatch import Forward, Reject, cluster_name, decide

URL = "http://127.0.0.1:8000/api/v1/routes"
ENV = {"DASK_GATEWAY_PROXY_TOKEN": "s3cret-token"}


def settings(*argv: str, env: dict[str, str] = ENV, platform: str = "linux") -> ProxySettings:
    return load_settings(["--address", ":8786", "--api-url", URL, *argv], env, platform=platform)


def problems(argv: list[str], env: dict[str, str] = ENV, platform: str = "linux") -> list[str]:
    with pytest.raises(SettingsError) as info:
        load_settings(argv, env, platform=platform)
    return info.value.problems


def test_defaults() -> None:
    s = settings()
    assert s.address == ("0.0.0.0", 8786)
    assert s.api_url == URL
    assert s.token == "s3cret-token"
    assert s.admin_address == ("127.0.0.1", 0)
    assert s.log_level == "INFO"
    assert s.http_forward is None
    assert s.hello_timeout == 10.0 and s.connect_timeout == 10.0
    assert s.workers == 1
    assert "s3cret" not in repr(s)


def test_all_flags() -> None:
    s = settings(
        "--admin-address",
        "[::1]:9000",
        "--log-level",
        "debug",
        "--http-forward",
        "web:8000",
        "--hello-timeout",
        "2.5",
        "--connect-timeout",
        "0.5",
        "--workers",
        "4",
    )
    assert s.admin_address == ("::1", 9000)
    assert s.log_level == "DEBUG"
    assert s.http_forward == ("web", 8000)
    assert (s.hello_timeout, s.connect_timeout, s.workers) == (2.5, 0.5, 4)


def test_token_file_wins_over_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert settings("--api-token-file", str(token_file)).token == "from-file"


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        [
            "--address",
            "8786",
            "--api-url",
            "127.0.0.1:8000/api/v1/routes",
            "--admin-address",
            "x:99999",
            "--log-level",
            "chatty",
            "--http-forward",
            "web:0",
            "--hello-timeout",
            "nan",
            "--connect-timeout",
            "-1",
            "--workers",
            "many",
            "--frobnicate",
        ],
        env={},
    )
    text = "\n".join(found)
    assert len(found) == 10, found
    for needle in (
        "--frobnicate",
        "--address",
        "--api-url",
        "--admin-address",
        "log level",
        "DASK_GATEWAY_PROXY_TOKEN",
        "--http-forward",
        "--hello-timeout",
        "--connect-timeout",
        "--workers",
    ):
        assert needle in text


def test_missing_required_flags_are_listed_together() -> None:
    found = problems([], env={})
    assert "--address is required (HOST:PORT)" in found
    assert "--api-url is required (the routes URL)" in found
    assert any("no token" in p for p in found)


def test_workers_need_linux() -> None:
    assert settings("--workers", "1", platform="darwin").workers == 1
    (message,) = problems(
        ["--address", ":1", "--api-url", URL, "--workers", "2"], platform="darwin"
    )
    assert "Linux" in message


@pytest.mark.parametrize(
    "url", ["http://h:0/r", "http://user:pw@h/r", "http://h/r?x=1", "http:///r"]
)
def test_bad_api_urls(url: str) -> None:
    (message,) = problems(["--address", ":1", "--api-url", url])
    assert message.startswith("--api-url")


def test_malformed_argv_is_a_settings_error() -> None:
    (message,) = problems(["--address"])
    assert "expected one argument" in message


# ---- dispatch ------------------------------------------------------------------------------

ROUTES = {"abc": ("10.0.0.1", 8786)}
FORWARD = ("web", 8000)


def hello(sni: str | None) -> ClientHello:
    return ClientHello(sni=sni, hello_bytes=517)


def test_cluster_name() -> None:
    assert cluster_name("daskgateway-abc") == "abc"
    assert cluster_name("daskgateway-ns.abc") == "ns.abc"
    assert cluster_name("daskgateway-") is None
    assert cluster_name("abc") is None
    assert cluster_name(None) is None


def test_decide_routes_known_clusters() -> None:
    action = decide(hello("daskgateway-abc"), ROUTES.get, None)
    assert action == Forward(("10.0.0.1", 8786), "scheduler", "abc")
    # The HTTP forward never takes a connection meant for a cluster, known or not.
    assert decide(hello("daskgateway-abc"), ROUTES.get, FORWARD) == action
    unknown = decide(hello("daskgateway-zzz"), ROUTES.get, FORWARD)
    assert unknown == Reject("unknown_cluster", UNRECOGNIZED_NAME)


def test_decide_without_http_forward() -> None:
    assert decide(NOT_TLS, ROUTES.get, None) == Reject("not_tls", None)
    assert decide(hello(None), ROUTES.get, None) == Reject("no_sni", UNRECOGNIZED_NAME)
    assert decide(hello("example.com"), ROUTES.get, None) == Reject(
        "sni_without_prefix", UNRECOGNIZED_NAME
    )


def test_decide_with_http_forward() -> None:
    for result in (NOT_TLS, hello(None), hello("gateway.example.com")):
        assert decide(result, ROUTES.get, FORWARD) == Forward(FORWARD, "http")
