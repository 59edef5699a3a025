"""Process wiring: ``run`` in-process (admin, graceful stop) and the real console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio
import trio.lowlevel

from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.http import HTTPClient
from dask_gateway_scheduler_proxy.config import ProxySettings
from dask_gateway_scheduler_proxy.main import Running, run

from .conftest import (
    TOKEN,
    WAIT,
    Credentials,
    open_tls_client,
    round_trip,
    routes_url,
    sni_route,
    start_echo_backend,
    start_feed_server,
)

SCRIPT = str(Path(sys.executable).with_name("dask-gateway-scheduler-proxy"))


async def test_run_serves_admin_and_stops_gracefully(credentials: Credentials) -> None:
    with trio.fail_after(WAIT * 2):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "kappa", credentials.server_context())
            feed = RouteFeed()
            feed.put(sni_route("kappa", backend.target))
            feed_port, _ = await start_feed_server(nursery, make_feed_handler(feed, TOKEN))
            settings = ProxySettings(
                address=("127.0.0.1", 0), api_url=routes_url(feed_port), token=TOKEN
            )
            stop = trio.Event()
            done = trio.Event()

            async def run_proxy(task_status: trio.TaskStatus[Running]) -> None:
                await run(
                    settings,
                    handle_signals=False,
                    stop=stop,
                    shutdown_grace=WAIT * 3,  # longer than the test: drain must end early
                    task_status=task_status,
                )
                done.set()

            running: Running = await nursery.start(run_proxy)
            assert running.admin_port is not None
            admin = f"http://127.0.0.1:{running.admin_port}"
            async with HTTPClient() as http:
                ready = await http.fetch("GET", f"{admin}/readyz", timeout=WAIT)
                assert ready.status == 200
                assert (await http.fetch("GET", f"{admin}/healthz", timeout=WAIT)).status == 200
                assert (await http.fetch("GET", f"{admin}/routes", timeout=WAIT)).status == 401
                routes = await http.fetch(
                    "GET",
                    f"{admin}/routes",
                    headers=[("Authorization", f"token {TOKEN}")],
                    timeout=WAIT,
                )
                assert json.loads(routes.body) == {
                    "routes": [{"kind": "SNI", "sni": "kappa", "target": backend.target}]
                }

                stream = await open_tls_client(running.port, "kappa", credentials)
                assert await round_trip(stream, b"1") == b"kappa:1"
                metrics = (await http.fetch("GET", f"{admin}/metrics", timeout=WAIT)).body
                assert b"dask_gateway_proxy_connections_active 1.0" in metrics
                assert b'dask_gateway_proxy_routes{kind="SNI"} 1.0' in metrics

                # Graceful stop: no new connections, the open one keeps working...
                stop.set()
                with trio.fail_after(WAIT):
                    while True:
                        try:
                            probe = await trio.open_tcp_stream("127.0.0.1", running.port)
                        except OSError:
                            break
                        await probe.aclose()
                        await trio.lowlevel.checkpoint()
                assert await round_trip(stream, b"2") == b"kappa:2"
                assert not done.is_set()
                # ...and once it closes, the proxy finishes well before the grace period.
                await stream.aclose()
                with trio.fail_after(WAIT):
                    await done.wait()
            nursery.cancel_scope.cancel()


def test_cli_reports_every_problem_at_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DASK_GATEWAY_PROXY_TOKEN"}
    result = subprocess.run(
        [
            SCRIPT,
            "--address",
            "nohost",
            "--api-url",
            "ftp://x/routes",
            "--log-level",
            "LOUD",
            "--hello-timeout",
            "0",
            "--connect-timeout",
            "soon",
            "--workers",
            "0",
            "--http-forward",
            "web",
            "--api-token-file",
            str(tmp_path / "missing-token"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
    )
    assert result.returncode == 2, result.stderr
    err = result.stderr
    for flag in (
        "--address",
        "--api-url",
        "log level",
        "--hello-timeout",
        "--connect-timeout",
        "--workers",
        "--http-forward",
        "missing-token",
    ):
        assert flag in err, (flag, err)
    assert "Traceback" not in err


def test_cli_help() -> None:
    result = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, timeout=WAIT * 3)
    assert result.returncode == 0
    for flag in (
        "--address",
        "--api-url",
        "--admin-address",
        "--log-level",
        "--api-token-file",
        "--http-forward",
        "--hello-timeout",
        "--connect-timeout",
        "--workers",
    ):
        assert flag in result.stdout


class StderrLines:
    """Reads a child's stderr line by line (the readiness signal of a subprocess)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.lines: list[str] = []

    async def next_line(self) -> str | None:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some()
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        text = line.decode(errors="replace")
        self.lines.append(text)
        return text

    async def wait_for(self, needle: str, count: int = 1) -> list[str]:
        found = [line for line in self.lines if needle in line]
        while len(found) < count:
            line = await self.next_line()
            assert line is not None, "stderr ended early:\n" + "\n".join(self.lines)
            if needle in line:
                found.append(line)
        return found

    async def read_to_eof(self) -> None:
        while await self.next_line() is not None:
            pass


def child_pids(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (trio spawns from a worker thread)."""
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread exited meanwhile
            continue
    return pids


def process_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


async def start_workers_cli(
    nursery: trio.Nursery, feed_port: int
) -> tuple[trio.Process, StderrLines, int, int]:
    env = {**os.environ, "DASK_GATEWAY_PROXY_TOKEN": TOKEN}
    process = await trio.lowlevel.open_process(
        [
            SCRIPT,
            "--address",
            "127.0.0.1:0",
            "--admin-address",
            "127.0.0.1:0",
            "--api-url",
            routes_url(feed_port),
            "--workers",
            "2",
        ],
        env=env,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    lines = StderrLines(process.stderr)
    listening = await lines.wait_for("Scheduler proxy listening on", count=2)
    ports = {int(line.rsplit(":", 1)[1]) for line in listening}
    assert len(ports) == 1, listening
    (admin_line,) = await lines.wait_for("Admin endpoint on")
    return process, lines, ports.pop(), int(admin_line.rsplit(":", 1)[1])


async def test_console_script_with_two_workers(credentials: Credentials) -> None:
    with trio.fail_after(WAIT * 3):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "lam", credentials.server_context())
            feed = RouteFeed()
            feed.put(sni_route("lam", backend.target))
            feed_port, _ = await start_feed_server(nursery, make_feed_handler(feed, TOKEN))
            process, lines, port, admin_port = await start_workers_cli(nursery, feed_port)
            try:
                (child,) = child_pids(process.pid)
                # Both processes own a listening socket on the one public port.
                listening = listening_inodes(port)
                assert len(listening) == 2
                assert socket_inodes(process.pid) & listening
                assert socket_inodes(child) & listening

                for i in range(20):
                    stream = await open_tls_client(port, "lam", credentials)
                    assert await round_trip(stream, b"%d" % i) == b"lam:%d" % i
                    await stream.aclose()
                assert backend.connections == 20

                async with HTTPClient() as http:
                    url = f"http://127.0.0.1:{admin_port}/readyz"
                    assert (await http.fetch("GET", url, timeout=WAIT)).status == 200

                # Ctrl-C (SIGINT) to the parent stops both; stderr closes once both exited.
                process.send_signal(signal.SIGINT)
                await lines.read_to_eof()
                assert await process.wait() == 0
                assert not process_exists(child)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert TOKEN not in "\n".join(lines.lines)
            nursery.cancel_scope.cancel()


async def test_workers_die_with_a_killed_parent() -> None:
    with trio.fail_after(WAIT * 3):
        async with trio.open_nursery() as nursery:
            feed_port, _ = await start_feed_server(nursery, make_feed_handler(RouteFeed(), TOKEN))
            process, lines, _, _ = await start_workers_cli(nursery, feed_port)
            (child,) = child_pids(process.pid)
            process.kill()  # SIGKILL: no chance to clean up
            assert await process.wait() == -signal.SIGKILL
            # The child holds stderr too: EOF means it has exited as well.
            await lines.read_to_eof()
            assert any("parent process exited" in line for line in lines.lines)
            nursery.cancel_scope.cancel()


async def test_cli_explains_a_busy_address() -> None:
    with trio.fail_after(WAIT * 3):
        async with trio.open_nursery() as nursery:
            feed_port, _ = await start_feed_server(nursery, make_feed_handler(RouteFeed(), TOKEN))
            busy = trio.socket.socket()
            await busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            try:
                result = await trio.run_process(
                    [SCRIPT, "--address", f"127.0.0.1:{port}", "--api-url", routes_url(feed_port)],
                    env={**os.environ, "DASK_GATEWAY_PROXY_TOKEN": TOKEN},
                    capture_stderr=True,
                    check=False,
                )
            finally:
                busy.close()
            err = result.stderr.decode()
            assert result.returncode == 1, err
            assert f"cannot listen on --address 127.0.0.1:{port}" in err
            assert "Traceback" not in err
            nursery.cancel_scope.cancel()
