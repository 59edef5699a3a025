"""The web proxy end to end, in process: real sockets, routes through the real feed."""

from __future__ import annotations

import hashlib
import ssl
from contextlib import aclosing
from functools import partial
from pathlib import Path

import trio
from trio_websocket import open_websocket_url, serve_websocket

from dask_gateway_common.http import Request, Response, open_http_connection, serve_http
from dask_gateway_common.tls import generate_cluster_credentials, write_private_file
from dask_gateway_web_proxy.proxy import ProxyTimeouts

from .helpers import (
    Seen,
    get,
    header_map,
    loads,
    open_proxy,
    raw_exchange,
    recording_handler,
    start_backend,
)


async def test_dashboard_route_rewrites_path_and_headers() -> None:
    async with open_proxy() as env:
        seen = Seen()
        port = await start_backend(env.nursery, recording_handler(seen))
        await env.route("/clusters/abc", f"http://127.0.0.1:{port}")
        status, headers, body = await get(
            env.port,
            "/clusters/abc/status?x=1&y",
            [
                ("Host", "public.example:8000"),
                ("User-Agent", "test-agent/1.0"),
                ("X-Forwarded-For", "10.1.2.3"),
                ("Connection", "keep-alive, X-Drop-Me"),
                ("X-Drop-Me", "1"),
                ("Proxy-Authorization", "Basic c2VjcmV0"),
                ("Accept", "text/html"),
            ],
        )
        assert status == 200
        assert headers["x-backend"] == "yes"
        info = loads(body)
        assert info["target"] == "/status?x=1&y"
        h = header_map(info)
        assert h["host"] == [f"127.0.0.1:{port}"]
        assert h["x-forwarded-for"] == ["10.1.2.3, 127.0.0.1"]
        assert h["x-forwarded-proto"] == ["http"]
        assert h["x-forwarded-host"] == ["public.example:8000"]
        assert h["user-agent"] == ["test-agent/1.0"]
        assert h["accept"] == ["text/html"]
        for gone in ("x-drop-me", "proxy-authorization", "keep-alive"):
            assert gone not in h

        # the bare prefix goes to the dashboard's root
        status, _, body = await get(env.port, "/clusters/abc")
        assert status == 200 and loads(body)["target"] == "/"


async def test_root_route_and_target_path_and_query() -> None:
    async with open_proxy() as env:
        api, dash = Seen(), Seen()
        api_port = await start_backend(env.nursery, recording_handler(api))
        dash_port = await start_backend(env.nursery, recording_handler(dash))
        await env.route("/", f"http://127.0.0.1:{api_port}")
        await env.route("/clusters/ab", f"http://127.0.0.1:{dash_port}/base/?token=t")
        status, _, body = await get(env.port, "/api/v1/clusters/?wait")
        assert status == 200 and loads(body)["target"] == "/api/v1/clusters/?wait"
        # segment boundary: /clusters/abc is not /clusters/ab, so the root route takes it
        status, _, body = await get(env.port, "/clusters/abc/status")
        assert loads(body)["target"] == "/clusters/abc/status"
        status, _, body = await get(env.port, "/clusters/ab/status?q=1")
        assert loads(body)["target"] == "/base/status?token=t&q=1"
        assert len(api.requests) == 2 and len(dash.requests) == 1


async def test_no_route_is_404_text() -> None:
    async with open_proxy() as env:
        status, headers, body = await get(env.port, "/clusters/nope/status")
        assert status == 404
        assert headers["content-type"].startswith("text/plain")
        assert body == b"Not Found"


async def test_route_removal_and_router_rebuilt_only_on_change() -> None:
    async with open_proxy() as env:
        seen = Seen()
        port = await start_backend(env.nursery, recording_handler(seen))
        await env.route("/clusters/x", f"http://127.0.0.1:{port}")
        assert (await get(env.port, "/clusters/x/"))[0] == 200
        # no route change: further requests reuse the very same trie
        from dask_gateway_web_proxy.proxy import WebProxy

        probe = WebProxy(env.table, pool=env.pool)
        first = probe.router
        assert probe.router is first
        await env.unroute("/clusters/x")
        assert probe.router is not first
        assert (await get(env.port, "/clusters/x/"))[0] == 404


async def test_refused_upstream_is_502() -> None:
    async with open_proxy() as env:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        await listener.aclose()
        await env.route("/clusters/dead", f"http://127.0.0.1:{port}")
        status, headers, body = await get(env.port, "/clusters/dead/status")
        assert status == 502
        assert body == b"Bad Gateway"
        assert b"Traceback" not in body


async def test_silent_upstream_is_504() -> None:
    timeouts = ProxyTimeouts(connect=5, response=0.3, body_idle=5)
    async with open_proxy(timeouts=timeouts) as env:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        held: list[trio.SocketStream] = []

        async def accept_and_hold() -> None:
            held.append(await listener.accept())
            await trio.sleep_forever()

        env.nursery.start_soon(accept_and_hold)
        await env.route("/clusters/slow", f"http://127.0.0.1:{port}")
        with trio.fail_after(5):
            status, _, body = await get(env.port, "/clusters/slow/status")
        assert status == 504
        assert body == b"Gateway Timeout"
        assert len(held) == 1
        for stream in held:
            await stream.aclose()
        await listener.aclose()


async def test_malformed_request_is_400() -> None:
    async with open_proxy() as env:
        data = await raw_exchange(env.port, b"THIS IS NOT HTTP\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400 ")
        assert b"Traceback" not in data


async def test_oversized_headers_are_431() -> None:
    async with open_proxy() as env:
        big = b"X-Big: " + b"a" * 40_000 + b"\r\n"
        data = await raw_exchange(env.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
        assert data.startswith(b"HTTP/1.1 431 ")


async def test_keepalive_on_both_sides() -> None:
    async with open_proxy() as env:
        seen = Seen()
        port = await start_backend(env.nursery, recording_handler(seen))
        await env.route("/clusters/k", f"http://127.0.0.1:{port}")
        with trio.fail_after(10):
            conn = await open_http_connection("127.0.0.1", env.port)
            try:
                for i in range(3):
                    resp = await conn.request("GET", f"/clusters/k/{i}", [], b"")
                    assert resp.status == 200
                    assert loads(await resp.read())["target"] == f"/{i}"
                    assert conn.reusable  # the proxy kept our connection open
                # a POST with a body on the same connection
                resp = await conn.request("POST", "/clusters/k/post", [], b"x" * 1000)
                assert loads(await resp.read())["body_len"] == 1000
            finally:
                await conn.aclose()
        assert len(seen.requests) == 4
        assert len(seen.client_ports) == 1  # the upstream saw one connection
        assert env.pool.connections_opened == 1


async def test_websocket_echo_through_proxy() -> None:
    async with open_proxy() as env:

        async def echo(request) -> None:  # noqa: ANN001
            ws = await request.accept()
            try:
                while True:
                    message = await ws.get_message()
                    await ws.send_message(
                        f"echo:{message}" if isinstance(message, str) else message
                    )
            except Exception:  # connection closed by the client
                return

        server = await env.nursery.start(partial(serve_websocket, echo, "127.0.0.1", 0, None))
        await env.route("/clusters/ws", f"http://127.0.0.1:{server.port}")
        with trio.fail_after(10):
            async with open_websocket_url(f"ws://127.0.0.1:{env.port}/clusters/ws/status/ws") as ws:
                for i in range(5):
                    await ws.send_message(f"hello {i}")
                    assert await ws.get_message() == f"echo:hello {i}"
                blob = bytes(range(256)) * 1000
                await ws.send_message(blob)
                assert await ws.get_message() == blob


async def test_upgrade_refused_by_upstream_is_plain_response() -> None:
    async with open_proxy() as env:
        seen = Seen()
        port = await start_backend(env.nursery, recording_handler(seen))
        await env.route("/clusters/nows", f"http://127.0.0.1:{port}")
        status, _, body = await get(
            env.port,
            "/clusters/nows/ws",
            [("Connection", "Upgrade"), ("Upgrade", "websocket")],
        )
        assert status == 200
        h = header_map(loads(body))
        assert h["upgrade"] == ["websocket"] and h["connection"] == ["Upgrade"]


CHUNK = bytes(range(256)) * 256  # 64 KiB


async def _bulk_handler(request: Request) -> Response:
    if request.method == "POST":
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.iter_body():
            digest.update(chunk)
            size += len(chunk)
        return Response.json({"size": size, "sha256": digest.hexdigest()})
    count = int(request.query_params.get("chunks", "1"))

    async def body():  # noqa: ANN202
        for _ in range(count):
            yield CHUNK

    return Response(200, [("Content-Type", "application/octet-stream")], body())


async def test_streamed_download_and_upload_in_process() -> None:
    async with open_proxy() as env:
        port = await start_backend(env.nursery, _bulk_handler)
        await env.route("/clusters/bulk", f"http://127.0.0.1:{port}")
        with trio.fail_after(30):
            conn = await open_http_connection("127.0.0.1", env.port)
            try:
                resp = await conn.request("GET", "/clusters/bulk/data?chunks=128", [], b"")
                assert resp.status == 200
                size = 0
                digest = hashlib.sha256()
                async for chunk in resp.iter_body():
                    size += len(chunk)
                    digest.update(chunk)
                assert size == 128 * len(CHUNK)
                assert digest.hexdigest() == hashlib.sha256(CHUNK * 128).hexdigest()

                async def upload():  # noqa: ANN202
                    for _ in range(64):
                        yield CHUNK

                # chunked upload (no Content-Length) ...
                resp = await conn.request("POST", "/clusters/bulk/up", [], upload())
                info = loads(await resp.read())
                assert info == {
                    "size": 64 * len(CHUNK),
                    "sha256": hashlib.sha256(CHUNK * 64).hexdigest(),
                }
                # ... and with a Content-Length
                length = [("Content-Length", str(64 * len(CHUNK)))]
                resp = await conn.request("POST", "/clusters/bulk/up", length, upload())
                assert loads(await resp.read())["size"] == 64 * len(CHUNK)
            finally:
                await conn.aclose()
        down = env.metrics.bytes_total.labels(direction="down")._value.get()
        up = env.metrics.bytes_total.labels(direction="up")._value.get()
        assert down >= 128 * len(CHUNK) and up == 128 * len(CHUNK)


async def test_upstream_breaking_off_mid_body_aborts_client_response() -> None:
    async with open_proxy() as env:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]

        async def half_answer() -> None:
            stream = await listener.accept()
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(4096)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000
            )
            await stream.aclose()

        env.nursery.start_soon(half_answer)
        await env.route("/clusters/half", f"http://127.0.0.1:{port}")
        with trio.fail_after(10):
            conn = await open_http_connection("127.0.0.1", env.port)
            resp = await conn.request("GET", "/clusters/half/x", [], b"")
            assert resp.status == 200
            got = 0
            try:
                async for chunk in resp.iter_body():
                    got += len(chunk)
                completed = True
            except Exception:
                completed = False
            await conn.aclose()
        assert not completed  # never presented as a complete response
        assert got == 1000
        await listener.aclose()


async def test_head_and_no_content() -> None:
    async def handler(request: Request) -> Response:
        if request.path == "/empty":
            return Response.empty(204)
        return Response.text(200, "hello")

    async with open_proxy() as env:
        port = await start_backend(env.nursery, handler)
        await env.route("/clusters/h", f"http://127.0.0.1:{port}")
        with trio.fail_after(10):
            conn = await open_http_connection("127.0.0.1", env.port)
            try:
                resp = await conn.request("HEAD", "/clusters/h/x", [], b"")
                assert resp.status == 200 and await resp.read() == b""
                # the size of the resource is not misreported as 0
                assert resp.headers.get("content-length") in (None, "5")
                resp = await conn.request("GET", "/clusters/h/empty", [], b"")
                assert resp.status == 204 and await resp.read() == b""
                resp = await conn.request("GET", "/clusters/h/x", [], b"")
                assert await resp.read() == b"hello"
            finally:
                await conn.aclose()
        assert env.pool.connections_opened == 1


async def test_https_public_port(tmp_path: Path) -> None:
    cert, key = generate_cluster_credentials("localhost")
    write_private_file(tmp_path / "cert.pem", cert)
    write_private_file(tmp_path / "key.pem", key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cadata=cert.decode())
    async with open_proxy(ssl_context=server_ctx) as env:
        seen = Seen()
        port = await start_backend(env.nursery, recording_handler(seen))
        await env.route("/clusters/tls", f"http://127.0.0.1:{port}")
        with trio.fail_after(10):
            conn = await open_http_connection(
                "127.0.0.1", env.port, ssl_context=client_ctx, server_hostname="localhost"
            )
            try:
                resp = await conn.request("GET", "/clusters/tls/status", [], b"")
                info = loads(await resp.read())
            finally:
                await conn.aclose()
        assert resp.status == 200
        assert header_map(info)["x-forwarded-proto"] == ["https"]


async def test_https_upstream_target(tmp_path: Path) -> None:
    cert, key = generate_cluster_credentials("localhost")
    write_private_file(tmp_path / "cert.pem", cert)
    write_private_file(tmp_path / "key.pem", key)
    backend_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    backend_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    async with open_proxy() as env:
        env.pool._ssl_context = ssl.create_default_context(cadata=cert.decode())
        seen = Seen()
        _, port = await env.nursery.start(
            partial(serve_http, recording_handler(seen), "127.0.0.1", 0, ssl_context=backend_ctx)
        )
        await env.route("/clusters/s", f"https://localhost:{port}")
        for _ in range(2):
            status, _, body = await get(env.port, "/clusters/s/status")
            assert status == 200 and loads(body)["target"] == "/status"
        assert env.pool.connections_opened == 1


async def test_request_metrics_by_code() -> None:
    async with open_proxy() as env:
        await get(env.port, "/nowhere")
        await get(env.port, "/nowhere")
        counter = env.metrics.http_requests_total
        assert counter.labels(code="404")._value.get() == 2


async def _read_head(stream: trio.SocketStream) -> bytes:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise trio.BrokenResourceError("closed")
        buf += chunk
    return buf


async def _serve_then_drop(listener: trio.SocketListener) -> None:
    """First connection: answer one request, then close on the next one without answering
    (as an upstream whose keep-alive timer fires just as our request arrives). Later
    connections: answer every request."""
    first = await listener.accept()
    await _read_head(first)
    await first.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await _read_head(first)
    await first.aclose()
    while True:
        stream = await listener.accept()
        try:
            await _read_head(stream)
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")
        finally:
            await stream.aclose()


async def test_request_without_body_is_retried_once_when_a_pooled_connection_died() -> None:
    async with open_proxy() as env:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        env.nursery.start_soon(_serve_then_drop, listener)
        await env.route("/clusters/r", f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
        assert (await get(env.port, "/clusters/r/1"))[2] == b"ok"
        status, _, body = await get(env.port, "/clusters/r/2")
        assert (status, body) == (200, b"fresh")
        assert env.pool.connections_opened == 2
    await listener.aclose()


async def test_request_with_body_is_not_retried() -> None:
    async with open_proxy() as env:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        env.nursery.start_soon(_serve_then_drop, listener)
        await env.route("/clusters/r", f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
        assert (await get(env.port, "/clusters/r/1"))[2] == b"ok"
        status, _, body = await get(env.port, "/clusters/r/2", method="POST", body=b"data")
        assert (status, body) == (502, b"Bad Gateway")
        assert env.pool.connections_opened == 1
    await listener.aclose()


async def test_client_going_away_mid_download_closes_the_upstream() -> None:
    stopped = trio.Event()

    async def endless(request: Request) -> Response:
        async def body():  # noqa: ANN202
            try:
                while True:
                    yield CHUNK
            finally:
                stopped.set()

        return Response(200, [], body())

    async with open_proxy() as env:
        port = await start_backend(env.nursery, endless)
        await env.route("/clusters/e", f"http://127.0.0.1:{port}")
        with trio.fail_after(10):
            conn = await open_http_connection("127.0.0.1", env.port)
            resp = await conn.request("GET", "/clusters/e/x", [], b"")
            async with aclosing(resp.iter_body()) as chunks:
                async for _ in chunks:
                    break
            await conn.aclose()
            await stopped.wait()  # the backend saw the proxy hang up
        assert env.pool.idle_count == 0


async def test_transfer_encoding_wins_over_content_length() -> None:
    async with open_proxy() as env:
        seen = Seen()
        port = await start_backend(env.nursery, recording_handler(seen))
        await env.route("/clusters/te", f"http://127.0.0.1:{port}")
        data = await raw_exchange(
            env.port,
            b"POST /clusters/te/x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n"
            b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        assert data.startswith(b"HTTP/1.1 200 ")
        assert seen.requests[0]["body_len"] == 5
        assert "content-length" not in header_map(seen.requests[0]) or header_map(seen.requests[0])[
            "content-length"
        ] == ["5"]


async def test_upstream_that_stops_reading_an_upload_is_504() -> None:
    timeouts = ProxyTimeouts(connect=5, response=5, body_idle=5, upload_idle=0.5)
    async with open_proxy(timeouts=timeouts) as env:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        held: list[trio.SocketStream] = []

        async def read_head_then_stall() -> None:
            stream = await listener.accept()
            held.append(stream)
            await _read_head(stream)
            await trio.sleep_forever()

        env.nursery.start_soon(read_head_then_stall)
        await env.route("/clusters/stall", f"http://127.0.0.1:{listener.socket.getsockname()[1]}")
        size = 64 * 1024 * 1024
        with trio.fail_after(10):
            client = await trio.open_tcp_stream("127.0.0.1", env.port)

            async def send_body() -> None:
                try:
                    await client.send_all(
                        b"POST /clusters/stall/up HTTP/1.1\r\nHost: p\r\n"
                        + f"Content-Length: {size}\r\n\r\n".encode()
                    )
                    for _ in range(size // len(CHUNK)):
                        await client.send_all(CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_body)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += await client.receive_some(65536)
                nursery.cancel_scope.cancel()
            await client.aclose()
        assert head.startswith(b"HTTP/1.1 504 ")
        for stream in held:
            await stream.aclose()
    await listener.aclose()
