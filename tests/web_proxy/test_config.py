"""Settings of the web proxy: every problem reported at once, secrets never echoed."""

from __future__ import annotations

from pathlib import Path

import pytest

from dask_gateway_web_proxy.config import SettingsError, WebProxySettings, load_settings

ENV = {"DASK_GATEWAY_PROXY_TOKEN": "s3cret-token"}
BASE = ["--address", ":8000", "--api-url", "http://127.0.0.1:8001/api/v1/routes"]


def test_minimal_settings() -> None:
    s = load_settings(BASE, ENV)
    assert s == WebProxySettings(
        address=("0.0.0.0", 8000),
        api_url="http://127.0.0.1:8001/api/v1/routes",
        token="s3cret-token",
    )
    assert "s3cret" not in repr(s)
    assert not s.tls


def test_all_flags(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    key = tmp_path / "k.pem"
    token = tmp_path / "token"
    for f in (cert, key):
        f.write_text("x")
    token.write_text("from-file\n")
    s = load_settings(
        [
            *BASE,
            "--admin-address",
            "127.0.0.1:9000",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--log-level",
            "debug",
            "--api-token-file",
            str(token),
            "--connect-timeout",
            "2.5",
            "--response-timeout",
            "30",
        ],
        {},
    )
    assert s.admin_address == ("127.0.0.1", 9000)
    assert (s.tls_cert, s.tls_key) == (str(cert), str(key))
    assert s.tls
    assert s.log_level == "DEBUG"
    assert s.token == "from-file"
    assert (s.connect_timeout, s.response_timeout) == (2.5, 30.0)


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(
            [
                "--address",
                "nope",
                "--api-url",
                "ftp://x",
                "--admin-address",
                "h:99999",
                "--log-level",
                "chatty",
                "--connect-timeout",
                "-1",
                "--response-timeout",
                "soon",
                "--tls-cert",
                str(tmp_path / "missing.pem"),
                "--tls-key",
                str(tmp_path / "missing.key"),
                "--bogus",
            ],
            {"DASK_GATEWAY_PROXY_TOKEN": "s3cret-token"},
        )
    text = "\n".join(info.value.problems)
    for needle in [
        "--bogus",
        "--address",
        "--api-url",
        "--admin-address",
        "log level",
        "--connect-timeout",
        "--response-timeout",
        "--tls-cert",
        "--tls-key",
    ]:
        assert needle in text, needle
    assert len(info.value.problems) == 9
    assert "s3cret" not in text


def test_missing_required_and_token() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings([], {})
    text = "\n".join(info.value.problems)
    assert "--address is required" in text
    assert "--api-url is required" in text
    assert "DASK_GATEWAY_PROXY_TOKEN" in text


def test_tls_flags_must_pair(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(SettingsError) as info:
        load_settings([*BASE, "--tls-cert", str(cert)], ENV)
    assert info.value.problems == ["--tls-cert and --tls-key must be given together"]


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(["--help"], {})
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ["--address", "--api-url", "--tls-cert", "--response-timeout", "--admin-address"]:
        assert flag in out
