"""The proxy in-process, routes from a real feed over HTTP, real sockets on 127.0.0.1.

Every test runs against both connection paths: the relay engine's fast path (the Linux
default, ``fastpath.py``) and a trio task per connection (``proxy.py``).
"""

from __future__ import annotations

import functools
import socket

import pytest
import trio

from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.http import Request, Response, serve_http
from dask_gateway_common.metrics import ProxyMetrics, new_registry
from dask_gateway_common.relay import ENGINE_AVAILABLE
from dask_gateway_common.routes import RouteTable
from dask_gateway_common.sni import INTERNAL_ERROR, UNRECOGNIZED_NAME, tls_alert
from dask_gateway_scheduler_proxy import proxy as proxy_module
from dask_gateway_scheduler_proxy.config import ProxySettings
from dask_gateway_scheduler_proxy.proxy import serve_scheduler_proxy

from .conftest import (
    TOKEN,
    WAIT,
    Credentials,
    bulk_echo,
    client_hello,
    open_tls_client,
    read_until_eof,
    round_trip,
    sni_route,
    start_echo_backend,
    start_feed_server,
    start_proxy,
    wait_for_route,
)


@pytest.fixture(autouse=True, params=["engine", "trio"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with the given connection path as the default."""
    if request.param == "engine":
        assert ENGINE_AVAILABLE, "the relay engine is required on this platform"
    monkeypatch.setattr(proxy_module, "ENGINE_AVAILABLE", request.param == "engine")
    return str(request.param)


async def feed_with(nursery: trio.Nursery, *routes) -> tuple[RouteFeed, int]:  # type: ignore[no-untyped-def]
    feed = RouteFeed()
    for route in routes:
        feed.put(route)
    port, _ = await start_feed_server(nursery, make_feed_handler(feed, TOKEN))
    return feed, port


async def exchange_raw(port: int, data: bytes, *, send_eof: bool = False) -> bytes:
    """Send ``data`` on a plain TCP connection and read everything until EOF."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        if send_eof:
            await stream.send_eof()
        return await read_until_eof(stream)


async def test_tls_connection_is_routed_end_to_end(credentials: Credentials) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "alpha", credentials.server_context())
            bulk = await start_echo_backend(
                nursery, "bulk", credentials.server_context(), tag=False
            )
            _, feed_port = await feed_with(
                nursery, sni_route("alpha", backend.target), sni_route("bulk", bulk.target)
            )
            proxy = await start_proxy(nursery, feed_port)

            stream = await open_tls_client(proxy.port, "alpha", credentials)
            assert await round_trip(stream, b"hello") == b"alpha:hello"
            assert proxy.sample("connections_active") == 1
            await stream.aclose()

            stream = await open_tls_client(proxy.port, "bulk", credentials)
            big = bytes(range(256)) * 4096  # 1 MiB each way: exercises the bulk relay path
            assert await bulk_echo(stream, big) == big
            await stream.aclose()

            assert proxy.sample("connections_total") == 2
            assert proxy.sample("bytes_total", direction="up") > len(big)
            assert proxy.sample("bytes_total", direction="down") > len(big)
            nursery.cancel_scope.cancel()


async def test_replays_exact_hello_bytes_to_backend() -> None:
    hello = client_hello("daskgateway-beta")
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "beta")
            _, feed_port = await feed_with(nursery, sni_route("beta", backend.target))
            proxy = await start_proxy(nursery, feed_port)

            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            # Byte by byte: the proxy must reassemble the hello across many reads.
            for i in range(len(hello)):
                await stream.send_all(hello[i : i + 1])
            reply = await round_trip(stream, b"after")
            assert reply.startswith(b"beta:")
            assert bytes(backend.received[0]) == hello + b"after"
            await stream.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("server_name", "reason"),
    [
        ("daskgateway-nosuchcluster", "unknown_cluster"),
        (None, "no_sni"),
        ("example.com", "sni_without_prefix"),
        ("daskgateway-", "sni_without_prefix"),
    ],
)
async def test_unroutable_hello_gets_unrecognized_name_alert(
    server_name: str | None, reason: str
) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "gamma")
            _, feed_port = await feed_with(nursery, sni_route("gamma", backend.target))
            proxy = await start_proxy(nursery, feed_port)

            reply = await exchange_raw(proxy.port, client_hello(server_name))
            assert reply == tls_alert(UNRECOGNIZED_NAME)
            assert proxy.hello_errors(reason) == 1
            assert backend.connections == 0
            nursery.cancel_scope.cancel()


async def test_real_tls_client_sees_unrecognized_name(credentials: Credentials) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            _, feed_port = await feed_with(nursery)
            proxy = await start_proxy(nursery, feed_port)
            with pytest.raises(trio.BrokenResourceError) as info:
                await open_tls_client(proxy.port, "missing", credentials)
            assert "UNRECOGNIZED_NAME" in repr(info.value.__cause__).upper()
            nursery.cancel_scope.cancel()


async def test_not_tls_is_closed_without_forward() -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            _, feed_port = await feed_with(nursery)
            proxy = await start_proxy(nursery, feed_port)
            reply = await exchange_raw(proxy.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert reply == b""
            assert proxy.hello_errors("not_tls") == 1
            nursery.cancel_scope.cancel()


async def test_malformed_hello_is_closed_and_counted() -> None:
    bad = bytearray(client_hello("daskgateway-x"))
    bad[1:3] = b"\x03\x09"  # record version 0x0309 does not exist
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            _, feed_port = await feed_with(nursery)
            proxy = await start_proxy(nursery, feed_port)
            assert await exchange_raw(proxy.port, bytes(bad)) == b""
            assert proxy.hello_errors("bad_record_version") == 1
            # EOF in the middle of a hello
            partial = client_hello("daskgateway-x")[:20]
            assert await exchange_raw(proxy.port, partial, send_eof=True) == b""
            assert proxy.hello_errors("eof") == 1
            nursery.cancel_scope.cancel()


async def test_http_forward_carries_non_tls_and_foreign_tls(credentials: Credentials) -> None:
    async def web(request: Request) -> Response:
        return Response.text(200, f"web saw {request.method} {request.target}")

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            _, web_port = await nursery.start(serve_http, web, "127.0.0.1", 0)
            backend = await start_echo_backend(nursery, "delta", credentials.server_context())
            _, feed_port = await feed_with(nursery, sni_route("delta", backend.target))
            proxy = await start_proxy(nursery, feed_port, http_forward=("127.0.0.1", web_port))

            reply = await exchange_raw(
                proxy.port,
                b"GET /api/health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
            )
            assert reply.startswith(b"HTTP/1.1 200 ")
            assert reply.endswith(b"web saw GET /api/health")

            # TLS for our clusters still goes to the scheduler on the same port.
            stream = await open_tls_client(proxy.port, "delta", credentials)
            assert await round_trip(stream, b"x") == b"delta:x"
            await stream.aclose()

            # TLS without the daskgateway- prefix belongs to the HTTP(S) side too: the
            # bytes arrive there unchanged (here a plain HTTP server, which rejects them).
            reply = await exchange_raw(proxy.port, client_hello("gateway.example.com"))
            assert reply.startswith(b"HTTP/1.1 400 ")
            nursery.cancel_scope.cancel()


async def test_backend_unreachable_gets_internal_error_alert() -> None:
    # A bound socket that does not listen: connecting to it is refused.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                _, feed_port = await feed_with(
                    nursery, sni_route("dead", f"tls://127.0.0.1:{dead_port}")
                )
                proxy = await start_proxy(nursery, feed_port)
                reply = await exchange_raw(proxy.port, client_hello("daskgateway-dead"))
                assert reply == tls_alert(INTERNAL_ERROR)
                assert proxy.hello_errors("connect_failed") == 1
                nursery.cancel_scope.cancel()
    finally:
        closed.close()


async def test_slow_hello_is_cut_while_others_are_served(credentials: Credentials) -> None:
    hello_timeout = 0.5
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "eps", credentials.server_context())
            _, feed_port = await feed_with(nursery, sni_route("eps", backend.target))
            proxy = await start_proxy(nursery, feed_port, hello_timeout=hello_timeout)

            slow = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            await slow.send_all(client_hello("daskgateway-eps")[:10])
            started = trio.current_time()

            # Meanwhile another client connects and works normally.
            fast = await open_tls_client(proxy.port, "eps", credentials)
            assert await round_trip(fast, b"ping") == b"eps:ping"

            assert await read_until_eof(slow) == b""
            elapsed = trio.current_time() - started
            assert hello_timeout * 0.9 <= elapsed < hello_timeout + 3
            assert proxy.hello_errors("timeout") == 1
            # The fast client is still fine after the slow one was cut.
            assert await round_trip(fast, b"pong") == b"eps:pong"
            await fast.aclose()
            await slow.aclose()
            nursery.cancel_scope.cancel()


async def test_route_changes_leave_established_connections_alone(
    credentials: Credentials,
) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            old = await start_echo_backend(nursery, "old", credentials.server_context())
            new = await start_echo_backend(nursery, "new", credentials.server_context())
            feed, feed_port = await feed_with(nursery, sni_route("zeta", old.target))
            proxy = await start_proxy(nursery, feed_port)

            established = await open_tls_client(proxy.port, "zeta", credentials)
            assert await round_trip(established, b"1") == b"old:1"

            # Target changed: new connections go to the new backend, the old one stays.
            feed.put(sni_route("zeta", new.target))
            await wait_for_route(proxy, "zeta", new.target)
            assert await round_trip(established, b"2") == b"old:2"
            second = await open_tls_client(proxy.port, "zeta", credentials)
            assert await round_trip(second, b"3") == b"new:3"

            # Route deleted: new connections are refused, established ones keep working.
            feed.delete("SNI", "zeta")
            await wait_for_route(proxy, "zeta", None)
            assert await round_trip(established, b"4") == b"old:4"
            assert await round_trip(second, b"5") == b"new:5"
            reply = await exchange_raw(proxy.port, client_hello("daskgateway-zeta"))
            assert reply == tls_alert(UNRECOGNIZED_NAME)

            await established.aclose()
            await second.aclose()
            nursery.cancel_scope.cancel()


async def test_half_close_is_propagated() -> None:
    """A client that sends then shuts its write side still gets the backend's answer."""
    hello = client_hello("daskgateway-eta")

    async def answer_after_eof(stream: trio.SocketStream) -> None:
        data = await read_until_eof(stream)
        await stream.send_all(b"got %d bytes" % len(data))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, answer_after_eof, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            _, feed_port = await feed_with(nursery, sni_route("eta", f"tls://127.0.0.1:{port}"))
            proxy = await start_proxy(nursery, feed_port)
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            await stream.send_all(hello + b"tail")
            await stream.send_eof()
            assert await read_until_eof(stream) == b"got %d bytes" % (len(hello) + 4)
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_many_concurrent_clients(credentials: Credentials) -> None:
    with trio.fail_after(WAIT * 2):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "theta")
            _, feed_port = await feed_with(nursery, sni_route("theta", backend.target))
            proxy = await start_proxy(nursery, feed_port)
            hello = client_hello("daskgateway-theta")
            results: list[bool] = []

            async def one(i: int) -> None:
                stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
                await stream.send_all(hello)
                for j in range(5):
                    payload = b"%d-%d;" % (i, j)
                    got = await round_trip(stream, payload)
                    assert got.endswith(payload)
                await stream.aclose()
                results.append(True)

            async with trio.open_nursery() as clients:
                for i in range(100):
                    clients.start_soon(one, i)
            assert len(results) == 100
            assert backend.connections == 100
            assert proxy.sample("connections_total") == 100
            nursery.cancel_scope.cancel()


class ExplodingTable(RouteTable):
    """A table whose lookup fails for one name: stands in for any unexpected bug."""

    def sni_target(self, name: str) -> tuple[str, int] | None:
        if name == "boom":
            raise RuntimeError("lookup exploded")
        return super().sni_target(name)


async def test_unexpected_error_is_contained_and_counted(
    credentials: Credentials, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "iota", credentials.server_context())
            table = ExplodingTable([sni_route("iota", backend.target)])
            metrics = ProxyMetrics(new_registry())
            settings = ProxySettings(address=("127.0.0.1", 0), api_url="http://x/", token=TOKEN)
            port = await nursery.start(
                functools.partial(serve_scheduler_proxy, settings, table, metrics)
            )
            established = await open_tls_client(port, "iota", credentials)
            for _ in range(3):
                assert await exchange_raw(port, client_hello("daskgateway-boom")) == b""
            # The listener and the other connections are unaffected.
            assert await round_trip(established, b"ok") == b"iota:ok"
            fresh = await open_tls_client(port, "iota", credentials)
            assert await round_trip(fresh, b"ok") == b"iota:ok"
            internal = metrics.registry.get_sample_value(
                "dask_gateway_proxy_hello_errors_total", {"reason": "internal"}
            )
            assert internal == 3
            assert "lookup exploded" in caplog.text
            await established.aclose()
            await fresh.aclose()
            nursery.cancel_scope.cancel()


async def test_http_forward_by_host_name_is_resolved() -> None:
    """A forward target given as a host name (not an IP literal) is resolved per connect."""

    async def web(request: Request) -> Response:
        return Response.text(200, "resolved")

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            _, web_port = await nursery.start(serve_http, web, "127.0.0.1", 0)
            _, feed_port = await feed_with(nursery)
            proxy = await start_proxy(nursery, feed_port, http_forward=("localhost", web_port))
            for _ in range(2):
                reply = await exchange_raw(
                    proxy.port, b"GET / HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
                )
                assert reply.startswith(b"HTTP/1.1 200 ")
                assert reply.endswith(b"resolved")
            nursery.cancel_scope.cancel()


async def test_unresolvable_forward_is_a_connect_failure() -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            _, feed_port = await feed_with(nursery)
            proxy = await start_proxy(nursery, feed_port, http_forward=("no-such-host.invalid", 80))
            assert await exchange_raw(proxy.port, b"GET / HTTP/1.1\r\n\r\n") == b""
            # TLS for a foreign name goes the same way, and gets the internal_error alert
            reply = await exchange_raw(proxy.port, client_hello("example.com"))
            assert reply == tls_alert(INTERNAL_ERROR)
            assert proxy.hello_errors("connect_failed") == 2
            nursery.cancel_scope.cancel()


async def test_connect_timeout_sends_internal_error() -> None:
    """A backend that never answers the SYN (full backlog) hits --connect-timeout."""
    # A listener with a zero backlog that is never accepted from: once one connection
    # fills it, further SYNs are dropped and connects hang.
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    port = stuck.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                _, feed_port = await feed_with(
                    nursery, sni_route("slow", f"tls://127.0.0.1:{port}")
                )
                proxy = await start_proxy(nursery, feed_port, connect_timeout=0.3)
                started = trio.current_time()
                reply = await exchange_raw(proxy.port, client_hello("daskgateway-slow"))
                assert reply == tls_alert(INTERNAL_ERROR)
                assert 0.25 <= trio.current_time() - started < 3
                assert proxy.hello_errors("connect_failed") == 1
                nursery.cancel_scope.cancel()
    finally:
        for filler in fillers:
            filler.close()
        stuck.close()


async def test_graceful_stop_then_grace_deadline(credentials: Credentials) -> None:
    """Cancelling the listener stops accepting; open connections keep working in the
    handler nursery until that nursery is cancelled, which closes them."""
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            backend = await start_echo_backend(nursery, "mu", credentials.server_context())
            table = RouteTable([sni_route("mu", backend.target)])
            metrics = ProxyMetrics(new_registry())
            settings = ProxySettings(address=("127.0.0.1", 0), api_url="http://x/", token=TOKEN)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accept:
                    port = await accept.start(
                        functools.partial(
                            serve_scheduler_proxy,
                            settings,
                            table,
                            metrics,
                            handler_nursery=connections,
                        )
                    )
                    stream = await open_tls_client(port, "mu", credentials)
                    assert await round_trip(stream, b"1") == b"mu:1"
                    accept.cancel_scope.cancel()
                with pytest.raises(OSError):
                    await trio.open_tcp_stream("127.0.0.1", port)
                assert await round_trip(stream, b"2") == b"mu:2"
                connections.cancel_scope.cancel()
            assert await stream.transport_stream.receive_some(10) == b""
            gauge = metrics.registry.get_sample_value("dask_gateway_proxy_connections_active")
            assert gauge == 0
            await stream.aclose()
            nursery.cancel_scope.cancel()
