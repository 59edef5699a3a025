"""A real dask dashboard (distributed Scheduler + bokeh) behind the web proxy."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import trio
from trio_websocket import open_websocket_url

from .helpers import get, open_proxy

DASHBOARD_RE = re.compile(rb"dashboard at:\s+http://([0-9.]+):([0-9]+)/status")


async def _start_scheduler(nursery: trio.Nursery) -> tuple[trio.Process, int]:
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            "127.0.0.1:0",
            "--no-show",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    log = b""
    with trio.fail_after(60):
        while (match := DASHBOARD_RE.search(log)) is None:
            chunk = await process.stderr.receive_some(65536)
            if not chunk:
                raise AssertionError(f"scheduler exited early:\n{log.decode(errors='replace')}")
            log += chunk

    async def drain() -> None:  # keep the pipe from filling up
        while await process.stderr.receive_some(65536):  # type: ignore[union-attr]
            pass

    nursery.start_soon(drain)
    return process, int(match.group(2))


async def _stop(process: trio.Process) -> None:
    process.terminate()
    with trio.fail_after(30):
        await process.wait()


@pytest.mark.slow
async def test_real_dashboard_through_proxy() -> None:
    async with open_proxy() as env:
        process, dash_port = await _start_scheduler(env.nursery)
        try:
            await env.route("/clusters/alice.abc123", f"http://127.0.0.1:{dash_port}")
            with trio.fail_after(60):
                status, headers, html = await get(env.port, "/clusters/alice.abc123/status")
            assert status == 200
            assert headers["content-type"].startswith("text/html")
            assert b"<html" in html.lower() and b"bokeh" in html.lower()

            # a JSON endpoint of the dashboard, to see the path really is stripped
            with trio.fail_after(30):
                status, _, body = await get(env.port, "/clusters/alice.abc123/json/identity.json")
            assert status == 200
            assert json.loads(body)["type"] == "Scheduler"

            # the bokeh session websocket (…/status/ws) through the HTTP/1.1 upgrade path
            token = re.search(rb'"token":\s*"([^"]+)"', html)
            assert token is not None, html[:500]
            url = f"ws://127.0.0.1:{env.port}/clusters/alice.abc123/status/ws"
            with trio.fail_after(30):
                async with open_websocket_url(
                    url, subprotocols=["bokeh", token.group(1).decode()]
                ) as ws:
                    first = await ws.get_message()  # bokeh's ACK header frame
                    assert "ACK" in str(first)
        finally:
            await _stop(process)
