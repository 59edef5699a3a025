"""The real console script as a subprocess: admin endpoint, bulk transfers with bounded
RSS, clean shutdown on SIGTERM, and bad settings reported at once (exit 2)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio

from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.http import Request, Response, open_http_connection, serve_http
from dask_gateway_common.routes import Route

from .helpers import TOKEN, get

SCRIPT = str(Path(sys.executable).with_name("dask-gateway-web-proxy"))
LISTEN_RE = re.compile(rb"Web proxy listening on http://127\.0\.0\.1:([0-9]+)")
ADMIN_RE = re.compile(rb"Admin endpoint on http://127\.0\.0\.1:([0-9]+)")

CHUNK = os.urandom(1 << 16)  # 64 KiB
MiB = 1 << 20


def _proc_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@dataclass
class RunningProxy:
    process: trio.Process
    port: int
    admin_port: int
    log: bytearray


@asynccontextmanager
async def run_cli(nursery: trio.Nursery, feed_url: str) -> AsyncIterator[RunningProxy]:
    env = {**os.environ, "DASK_GATEWAY_PROXY_TOKEN": TOKEN}
    process = await trio.lowlevel.open_process(
        [
            SCRIPT,
            "--address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
            "--api-url",
            feed_url,
            "--response-timeout",
            "30",
            # the route feed here is not an API that could answer access checks
            "--dashboard-access",
            "open",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log = bytearray()
    try:
        with trio.fail_after(30):
            while not (LISTEN_RE.search(log) and ADMIN_RE.search(log)):
                chunk = await process.stderr.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"proxy exited early:\n{log.decode(errors='replace')}")
                log += chunk

        async def drain() -> None:
            while chunk := await process.stderr.receive_some(65536):  # type: ignore[union-attr]
                log.extend(chunk)

        nursery.start_soon(drain)
        port = int(LISTEN_RE.search(log).group(1))  # type: ignore[union-attr]
        admin_port = int(ADMIN_RE.search(log).group(1))  # type: ignore[union-attr]
        yield RunningProxy(process, port, admin_port, log)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await process.wait()


async def _wait_ready(admin_port: int) -> dict[str, object]:
    """Poll /readyz (the proxy is another process: there is no in-process signal)."""
    with trio.fail_after(15):
        while True:
            status, _, body = await get(admin_port, "/readyz")
            if status == 200:
                return json.loads(body)
            await trio.sleep(0.05)


async def _bulk_handler(request: Request) -> Response:
    if request.method == "POST":
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.iter_body():
            digest.update(chunk)
            size += len(chunk)
        return Response.json({"size": size, "sha256": digest.hexdigest()})
    count = int(request.query_params.get("chunks", "1"))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield CHUNK

    headers = [("Content-Type", "application/octet-stream")]
    if "sized" in request.query_params:  # Content-Length framing: the proxy's raw path
        headers.append(("Content-Length", str(count * len(CHUNK))))
    return Response(200, headers, body())


@pytest.mark.slow
async def test_console_script_bulk_transfers_bounded_rss() -> None:
    async with trio.open_nursery() as nursery:
        feed = RouteFeed(heartbeat=1)
        _, feed_port = await nursery.start(
            partial(serve_http, make_feed_handler(feed, TOKEN), "127.0.0.1", 0)
        )
        _, bulk_port = await nursery.start(partial(serve_http, _bulk_handler, "127.0.0.1", 0))
        feed.put(Route("PATH", "/clusters/bulk", f"http://127.0.0.1:{bulk_port}"))
        feed_url = f"http://127.0.0.1:{feed_port}/api/v1/routes"

        async with run_cli(nursery, feed_url) as proxy:
            pid = proxy.process.pid
            ready = await _wait_ready(proxy.admin_port)
            assert ready["status"] == "ok" and ready["routes"] == 1

            # admin endpoint, like the scheduler proxy's
            assert (await get(proxy.admin_port, "/healthz"))[0] == 200
            status, _, body = await get(
                proxy.admin_port, "/routes", [("Authorization", f"token {TOKEN}")]
            )
            assert status == 200
            assert json.loads(body)["routes"] == [
                {
                    "kind": "PATH",
                    "path": "/clusters/bulk",
                    "target": f"http://127.0.0.1:{bulk_port}",
                }
            ]
            assert (await get(proxy.admin_port, "/routes"))[0] == 401

            with trio.fail_after(120):
                conn = await open_http_connection("127.0.0.1", proxy.port)
                try:
                    # warm up (pool, buffers), then measure
                    resp = await conn.request("GET", "/clusters/bulk/d?chunks=64", [], b"")
                    assert len(await resp.read()) == 64 * len(CHUNK)
                    rss_before = _proc_kib(pid, "VmRSS")

                    chunks = 4096  # 256 MiB, with a Content-Length
                    start = time.perf_counter()
                    resp = await conn.request(
                        "GET", f"/clusters/bulk/d?sized&chunks={chunks}", [], b""
                    )
                    assert resp.status == 200 and resp.content_length == chunks * len(CHUNK)
                    size = 0
                    async for chunk in resp.iter_body():
                        size += len(chunk)
                    down_seconds = time.perf_counter() - start
                    assert size == chunks * len(CHUNK)
                    peak_down = _proc_kib(pid, "VmHWM")

                    up_chunks = 1024  # 64 MiB, twice: chunked, then with a Content-Length

                    async def upload() -> AsyncIterator[bytes]:
                        for _ in range(up_chunks):
                            yield CHUNK

                    start = time.perf_counter()
                    for sized in ([], [("Content-Length", str(up_chunks * len(CHUNK)))]):
                        resp = await conn.request("POST", "/clusters/bulk/u", sized, upload())
                        info = json.loads(await resp.read())
                        assert info["size"] == up_chunks * len(CHUNK)
                        assert info["sha256"] == hashlib.sha256(CHUNK * up_chunks).hexdigest()
                    up_seconds = time.perf_counter() - start
                    peak_up = _proc_kib(pid, "VmHWM")
                finally:
                    await conn.aclose()

            growth_mib = (max(peak_down, peak_up) - rss_before) / 1024
            print(
                f"\nweb proxy: 256 MiB down in {down_seconds:.2f}s "
                f"({256 / down_seconds:.0f} MiB/s), 128 MiB up in {up_seconds:.2f}s "
                f"({128 / up_seconds:.0f} MiB/s); RSS {rss_before / 1024:.1f} MiB, "
                f"peak growth {growth_mib:.1f} MiB"
            )
            assert growth_mib < 32, f"proxy RSS grew by {growth_mib:.1f} MiB"

            # metrics saw the traffic
            status, _, body = await get(proxy.admin_port, "/metrics")
            text = body.decode()
            assert 'dask_gateway_proxy_http_requests_total{code="200"} 4.0' in text
            assert re.search(r'dask_gateway_proxy_bytes_total\{direction="down"\} 2\.7', text)

            # SIGTERM: clean exit
            proxy.process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                await proxy.process.wait()
            assert proxy.process.returncode == 0
            assert b"Traceback" not in proxy.log
        nursery.cancel_scope.cancel()


async def test_cli_reports_every_bad_setting_at_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DASK_GATEWAY_PROXY_TOKEN"}
    with trio.fail_after(30):
        result = await trio.run_process(
            [
                SCRIPT,
                "--address",
                "not-an-address",
                "--api-url",
                "nope",
                "--connect-timeout",
                "-3",
                "--tls-cert",
                str(tmp_path / "missing.pem"),
            ],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert result.returncode == 2
    err = result.stderr.decode()
    for needle in ["--address", "--api-url", "--connect-timeout", "--tls-cert", "no token"]:
        assert needle in err, needle
    assert "Traceback" not in err


async def test_cli_help() -> None:
    with trio.fail_after(30):
        result = await trio.run_process([SCRIPT, "--help"], capture_stdout=True, check=False)
    assert result.returncode == 0
    assert b"--response-timeout" in result.stdout and b"--api-url" in result.stdout
