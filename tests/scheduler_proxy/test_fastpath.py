"""What only the relay engine's fast path has: cross-thread route lookups, engine failure,
accept back-off. (Everything the two connection paths share is in test_proxy.py.)"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import threading
from collections.abc import Callable

import pytest
import trio

from dask_gateway_common import engine as engine_module
from dask_gateway_common.metrics import ProxyMetrics, new_registry
from dask_gateway_common.routes import RouteTable
from dask_gateway_common.sni import UNRECOGNIZED_NAME, tls_alert
from dask_gateway_scheduler_proxy.config import ProxySettings
from dask_gateway_scheduler_proxy.proxy import serve_scheduler_proxy

from .conftest import (
    TOKEN,
    WAIT,
    client_hello,
    read_until_eof,
    round_trip,
    sni_route,
    start_echo_backend,
)

SETTINGS = ProxySettings(address=("127.0.0.1", 0), api_url="http://x/", token=TOKEN)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait for state that another thread (the engine) changes; no event to wait on."""
    with trio.fail_after(WAIT):
        for _ in range(int(WAIT / 0.005)):
            if predicate():
                return
            await trio.sleep(0.005)


def in_engine_thread() -> bool:
    return threading.current_thread().name == "relay-engine"


class HalfWayTable(RouteTable):
    """Seen from the engine thread, ``lambda`` is missing (as in the middle of a resync)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.engine_misses = 0

    def sni_target(self, name: str) -> tuple[str, int] | None:
        if name == "lambda" and in_engine_thread():
            self.engine_misses += 1
            return None
        return super().sni_target(name)


async def start(
    nursery: trio.Nursery, table: RouteTable, **overrides: object
) -> tuple[int, ProxyMetrics]:
    metrics = ProxyMetrics(new_registry())
    settings = ProxySettings(
        address=("127.0.0.1", 0),
        api_url="http://x/",
        token=TOKEN,
        **overrides,  # type: ignore[arg-type]
    )
    port = await nursery.start(
        functools.partial(serve_scheduler_proxy, settings, table, metrics, engine=True)
    )
    return port, metrics


async def raw_connect(port: int, data: bytes) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    return stream


async def test_a_miss_in_the_engine_is_confirmed_by_trio() -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "lambda")
            table = HalfWayTable([sni_route("lambda", backend.target)])
            port, _ = await start(nursery, table)
            stream = await raw_connect(port, client_hello("daskgateway-lambda"))
            assert (await round_trip(stream, b"x")).startswith(b"lambda:")
            assert table.engine_misses == 1  # looked up in the engine, found by trio
            await stream.aclose()
            # a real miss is still a miss
            stream = await raw_connect(port, client_hello("daskgateway-other"))
            assert await read_until_eof(stream) == tls_alert(UNRECOGNIZED_NAME)
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_engine_crash_fails_the_server_and_closes_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    crash = threading.Event()
    real_run_timers = engine_module.Engine._run_timers

    def run_timers(self: engine_module.Engine, now: float) -> None:
        if crash.is_set():
            raise SystemError("simulated engine bug")
        real_run_timers(self, now)

    monkeypatch.setattr(engine_module.Engine, "_run_timers", run_timers)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "nu")
            table = RouteTable([sni_route("nu", backend.target)])
            metrics = ProxyMetrics(new_registry())
            settings = ProxySettings(
                address=("127.0.0.1", 0), api_url="http://x/", token=TOKEN, hello_timeout=0.2
            )
            failed: list[BaseException] = []

            async def serve(task_status: trio.TaskStatus[int]) -> None:
                try:
                    await serve_scheduler_proxy(
                        settings, table, metrics, engine=True, task_status=task_status
                    )
                except RuntimeError as exc:
                    failed.append(exc)

            port = await nursery.start(serve)
            established = await raw_connect(port, client_hello("daskgateway-nu"))
            assert (await round_trip(established, b"1")).startswith(b"nu:")
            crash.set()
            slow = await raw_connect(port, b"\x16")  # its hello timer fires the bug
            assert await read_until_eof(established) == b""  # closed by the crash
            assert await read_until_eof(slow) == b""
            await eventually(lambda: bool(failed))
            assert "relay engine stopped" in str(failed[0])
            assert isinstance(failed[0].__cause__, engine_module.EngineCrashed)
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            monkeypatch.undo()
            # a new engine serves the next proxy
            port, _ = await start(nursery, table)
            stream = await raw_connect(port, client_hello("daskgateway-nu"))
            assert (await round_trip(stream, b"2")).startswith(b"nu:")
            await stream.aclose()
            await established.aclose()
            await slow.aclose()
            nursery.cancel_scope.cancel()


async def test_accept_backs_off_when_out_of_file_descriptors(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failures = [2]
    real_accept = socket.socket.accept

    def accept(self: socket.socket) -> tuple[socket.socket, object]:
        if in_engine_thread() and failures[0] > 0:
            failures[0] -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return real_accept(self)

    monkeypatch.setattr(socket.socket, "accept", accept)
    caplog.set_level(logging.ERROR)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "xi")
            port, metrics = await start(nursery, RouteTable([sni_route("xi", backend.target)]))
            started = trio.current_time()
            stream = await raw_connect(port, client_hello("daskgateway-xi"))
            assert (await round_trip(stream, b"x")).startswith(b"xi:")
            assert trio.current_time() - started >= 0.15  # two back-offs of 0.1 s
            assert failures == [0]
            assert "Cannot accept connections" in caplog.text
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_metrics_follow_connections() -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "omicron", tag=False)
            port, metrics = await start(nursery, RouteTable([sni_route("omicron", backend.target)]))

            def sample(name: str, **labels: str) -> float:
                value = metrics.registry.get_sample_value(f"dask_gateway_proxy_{name}", labels)
                return value or 0.0

            hello = client_hello("daskgateway-omicron")
            streams = [await raw_connect(port, hello) for _ in range(3)]
            for stream in streams:
                assert await round_trip(stream, b"abc") == hello + b"abc"
            assert sample("connections_active") == 3
            assert sample("connections_total") == 3
            assert sample("bytes_total", direction="up") == 3 * (len(hello) + 3)
            for stream in streams:
                await stream.send_eof()
                assert await read_until_eof(stream) == b""
                await stream.aclose()
            await eventually(lambda: sample("connections_active") == 0)
            nursery.cancel_scope.cancel()
