"""The proxy's fast paths end to end: Content-Length bodies moved straight between the
sockets, small bodies answered in one write, and what happens when a side goes away."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import trio

from dask_gateway_common import http
from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import Request, Response, open_http_connection
from dask_gateway_common.tls import generate_cluster_credentials, write_private_file

from .helpers import loads, open_proxy, start_backend


def _pattern(size: int) -> bytes:
    """Bytes that differ from block to block, so a lost or repeated block shows."""
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(i.to_bytes(4, "big")).digest() * 1000
        i += 1
    return bytes(out[:size])


BIG = _pattern(8 * 1024 * 1024 + 7)
BIG_SHA = hashlib.sha256(BIG).hexdigest()


def _pieces(data: bytes, size: int):  # noqa: ANN202
    async def gen():  # noqa: ANN202
        view = memoryview(data)
        for start in range(0, len(data), size):
            yield bytes(view[start : start + size])

    return gen()


async def sized_backend(request: Request) -> Response:
    if request.method == "POST":
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.iter_body():
            digest.update(chunk)
            size += len(chunk)
        return Response.json({"size": size, "sha256": digest.hexdigest()})
    if request.path == "/small":
        return Response.text(200, "small " * 1000)
    return Response(
        200,
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(BIG)))],
        _pieces(BIG, 100_000),
    )


async def test_sized_download_and_upload_keep_both_connections_alive(monkeypatch) -> None:  # noqa: ANN001
    clients: set[int] = set()
    spliced: list[int] = []
    real_splice = http.splice_exactly

    async def counting_splice(src: int, dst: int, count: int, **kwargs: object) -> None:
        spliced.append(count)
        await real_splice(src, dst, count, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(http, "splice_exactly", counting_splice)

    async def backend(request: Request) -> Response:
        assert request.client is not None
        clients.add(request.client[1])
        return await sized_backend(request)

    async with open_proxy() as env:
        port = await start_backend(env.nursery, backend)
        await env.route("/clusters/sized", f"http://127.0.0.1:{port}")
        with trio.fail_after(30):
            conn = await open_http_connection("127.0.0.1", env.port)
            received = 0
            try:
                for _ in range(2):
                    response = await conn.request("GET", "/clusters/sized/big")
                    assert response.status == 200
                    # the upstream's length is kept: not re-chunked
                    assert response.content_length == len(BIG)
                    assert response.headers.get("transfer-encoding") is None
                    digest = hashlib.sha256()
                    async for chunk in response.iter_body():
                        digest.update(chunk)
                        received += len(chunk)
                    assert digest.hexdigest() == BIG_SHA
                    response = await conn.request(
                        "POST",
                        "/clusters/sized/up",
                        [("Content-Length", str(len(BIG)))],
                        _pieces(BIG, 250_000),
                    )
                    body = await response.read()
                    received += len(body)
                    assert loads(body) == {"size": len(BIG), "sha256": BIG_SHA}
                    response = await conn.request("GET", "/clusters/sized/small")
                    body = await response.read()
                    received += len(body)
                    assert body == b"small " * 1000
                    assert conn.reusable
            finally:
                await conn.aclose()
        assert env.pool.connections_opened == 1 and len(clients) == 1
        if http.SPLICE_AVAILABLE:  # the big downloads went socket to socket
            assert len(spliced) == 2 and all(0 < n <= len(BIG) for n in spliced)
        down = env.metrics.bytes_total.labels(direction="down")._value.get()
        up = env.metrics.bytes_total.labels(direction="up")._value.get()
        assert down == received and up == 2 * len(BIG)


async def test_client_going_away_mid_sized_download_closes_the_upstream() -> None:
    stopped = trio.Event()

    async def endless(request: Request) -> Response:
        async def body():  # noqa: ANN202
            try:
                while True:
                    yield b"z" * 65536
            finally:
                stopped.set()

        return Response(200, [("Content-Length", str(1 << 40))], body())

    async with open_proxy() as env:
        port = await start_backend(env.nursery, endless)
        await env.route("/clusters/e", f"http://127.0.0.1:{port}")
        with trio.fail_after(10):
            conn = await open_http_connection("127.0.0.1", env.port)
            response = await conn.request("GET", "/clusters/e/x", [], b"")
            assert response.content_length == 1 << 40
            got = 0
            async for chunk in response.iter_body():
                got += len(chunk)
                if got > 4 * 1024 * 1024:
                    break
            await conn.aclose()
            await stopped.wait()  # the backend saw the proxy hang up
        assert env.pool.idle_count == 0


async def test_client_going_away_mid_sized_upload_closes_the_upstream() -> None:
    outcome: dict[str, object] = {}
    done = trio.Event()

    async def sink(request: Request) -> Response:
        size = 0
        try:
            async for chunk in request.iter_body():
                size += len(chunk)
        except GatewayError as exc:
            outcome["error"] = exc.status
            raise
        finally:
            outcome["size"] = size
            done.set()
        return Response.json({"size": size})

    total = 64 * 1024 * 1024
    async with open_proxy() as env:
        port = await start_backend(env.nursery, sink)
        await env.route("/clusters/up", f"http://127.0.0.1:{port}")
        with trio.fail_after(10):
            client = await trio.open_tcp_stream("127.0.0.1", env.port)
            await client.send_all(
                b"POST /clusters/up/x HTTP/1.1\r\nHost: p\r\n"
                + f"Content-Length: {total}\r\n\r\n".encode()
            )
            await client.send_all(b"u" * (1024 * 1024))
            await client.aclose()
            await done.wait()
        # the backend saw the upload end early: the proxy closed its connection
        assert outcome["error"] == 400 and outcome["size"] < total  # type: ignore[operator]
        assert env.pool.idle_count == 0


async def test_small_bodies_are_buffered_and_their_connection_reused_at_once() -> None:
    async with open_proxy() as env:
        port = await start_backend(env.nursery, sized_backend)
        await env.route("/clusters/s", f"http://127.0.0.1:{port}")
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(8):

                    async def one() -> None:
                        conn = await open_http_connection("127.0.0.1", env.port)
                        try:
                            for _ in range(5):
                                response = await conn.request("GET", "/clusters/s/small")
                                assert response.content_length == 6000
                                assert await response.read() == b"small " * 1000
                        finally:
                            await conn.aclose()

                    nursery.start_soon(one)
        # every upstream connection went back to the pool: at most one per concurrent
        # client was ever opened
        assert env.pool.connections_opened <= 8
        assert env.pool.idle_count == env.pool.connections_opened


async def test_sized_download_to_a_tls_client_is_streamed_in_chunks(tmp_path: Path) -> None:
    cert, key = generate_cluster_credentials("localhost")
    write_private_file(tmp_path / "cert.pem", cert)
    write_private_file(tmp_path / "key.pem", key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cadata=cert.decode())
    async with open_proxy(ssl_context=server_ctx) as env:
        port = await start_backend(env.nursery, sized_backend)
        await env.route("/clusters/tls", f"http://127.0.0.1:{port}")
        with trio.fail_after(30):
            conn = await open_http_connection(
                "127.0.0.1", env.port, ssl_context=client_ctx, server_hostname="localhost"
            )
            try:
                for _ in range(2):
                    response = await conn.request("GET", "/clusters/tls/big")
                    assert response.content_length == len(BIG)
                    assert hashlib.sha256(await response.read()).hexdigest() == BIG_SHA
            finally:
                await conn.aclose()
        assert env.pool.connections_opened == 1
