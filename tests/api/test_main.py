"""The ``dask-gateway-api`` command: help, configuration errors, a real process and SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import trio

from dask_gateway_api.auth import SimpleAuthenticator
from dask_gateway_api.config import settings_from_mapping
from dask_gateway_api.main import main, make_authenticator, manager_config
from dask_gateway_common.http import HTTPClient

ENV = {"DASK_GATEWAY_PROXY_TOKEN": "t" * 32}


def test_help(capsys) -> None:  # type: ignore[no-untyped-def]
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "--config" in capsys.readouterr().out


def test_every_config_problem_is_listed_with_exit_2(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "gateway.yaml"
    path.write_text("cluster:\n  worker_cores: many\nbogus_key: 1\n")
    assert main(["--config", str(path)], env={}) == 2
    err = capsys.readouterr().err
    assert "worker_cores" in err
    assert "bogus_key" in err
    assert "proxy_token is required" in err
    assert main(["--config", str(tmp_path / "missing.yaml")], env=ENV) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_unusable_authenticator_is_a_config_error(capsys) -> None:  # type: ignore[no-untyped-def]
    env = dict(
        ENV,
        DASK_GATEWAY_AUTH__TYPE="kerberos",
        DASK_GATEWAY_AUTH__KERBEROS_KEYTAB="/nonexistent/gateway.keytab",
    )
    assert main([], env=env) == 2
    err = capsys.readouterr().err
    assert "auth.kerberos_keytab" in err and "/nonexistent/gateway.keytab" in err


def test_settings_mapping() -> None:
    settings = settings_from_mapping(
        {"prefix": "/svc", "stop_clusters_on_shutdown": True, "auth": {"password": "pw"}},
        ENV,
    )
    config = manager_config(settings)
    assert config.prefix == "/svc" and config.stop_clusters_on_shutdown
    assert config.timeouts == settings.cluster.timeouts
    assert isinstance(make_authenticator(settings.auth), SimpleAuthenticator)


async def test_real_process_serves_and_stops_on_sigterm(tmp_path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"address: 127.0.0.1:0\ndb_path: {tmp_path}/db.sqlite\n"
        f"backend:\n  workdir: {tmp_path}/clusters\n"
    )
    env = dict(os.environ, **ENV)
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "dask_gateway_api.main", "--config", str(config)],
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            assert proc.stderr is not None
            seen = b""
            while (match := re.search(rb"API listening on (http://\S+)", seen)) is None:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, seen
                seen += chunk
            url = match.group(1).decode()
            async with HTTPClient() as http:
                reply = await http.fetch("GET", url + "/api/health")
                assert json.loads(reply.body) == {"status": "pass"}
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
