"""The shared HTTP layer against real sockets: keep-alive, limits, errors, streaming, upgrade."""

from __future__ import annotations

import json

import trio
import trio.testing

from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import (
    HTTPClient,
    HTTPLimits,
    Request,
    Response,
    Upgrade,
    open_http_connection,
    serve_http,
)


async def app(request: Request) -> Response | Upgrade:
    if request.path == "/echo":
        body = await request.read_body()
        return Response.json(
            {
                "method": request.method,
                "query": request.query_params,
                "body": body.decode(),
                "host": request.headers.get("host"),
            }
        )
    if request.path == "/json":
        return Response.json({"got": await request.json()})
    if request.path == "/fail":
        raise GatewayError("nope", status=422)
    if request.path == "/bug":
        raise RuntimeError("secret internal detail")
    if request.path == "/stream":

        async def chunks():
            for i in range(5):
                yield f"line {i}\n".encode()

        return Response(200, [("Content-Type", "text/plain")], chunks())
    if request.path == "/upgrade":

        async def relay(stream: trio.abc.Stream, trailing: bytes) -> None:
            await stream.send_all(b"raw:" + trailing)
            data = await stream.receive_some(100)
            await stream.send_all(data.upper())

        return Upgrade([("Upgrade", "echo"), ("Connection", "Upgrade")], relay)
    return Response.error(404, "Not Found")


async def start(nursery: trio.Nursery) -> int:
    _host, port = await nursery.start(serve_http, app, "127.0.0.1", 0)
    return port


async def test_keepalive_json_and_errors(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    base = f"http://127.0.0.1:{port}"
    with trio.fail_after(10):
        async with HTTPClient() as client:
            r = await client.fetch("POST", base + "/echo?wait&x=1&x=2", body=b"hello")
            assert r.status == 200
            assert r.headers.get("content-type") == "application/json"
            assert r.json() == {
                "method": "POST",
                "query": {"wait": "", "x": "1"},
                "body": "hello",
                "host": f"127.0.0.1:{port}",
            }
            r = await client.fetch("POST", base + "/json", body=b"{bad")
            assert r.status == 400 and "Malformed JSON" in r.json()["error"]
            r = await client.fetch("GET", base + "/fail")
            assert (r.status, r.json()) == (422, {"error": "nope"})
            r = await client.fetch("GET", base + "/bug")
            assert r.status == 500
            assert "secret" not in r.body.decode()
            assert "request id" in r.json()["error"]
            r = await client.fetch("GET", base + "/stream")
            assert r.body == b"".join(f"line {i}\n".encode() for i in range(5))
            # All of the above went over one pooled keep-alive connection.
            (pool,) = client._idle.values()
            assert len(pool) == 1 and pool[0].requests_sent == 5


async def test_body_limit_and_malformed_request(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    with trio.fail_after(10):
        async with HTTPClient() as client:
            r = await client.fetch(
                "POST", f"http://127.0.0.1:{port}/echo", body=b"x" * (2 * 1024 * 1024)
            )
            assert r.status == 413
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GARBAGE\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 400 ")
        assert b'"error"' in data


async def test_oversized_headers_get_431(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 431 ")


async def test_slow_headers_get_408(nursery: trio.Nursery) -> None:
    limits = HTTPLimits(header_timeout=0.2)
    _host, port = await nursery.start(
        lambda **kw: serve_http(app, "127.0.0.1", 0, limits=limits, **kw)
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.1\r\n")
        data = b""
        while chunk := await stream.receive_some(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 408 ")


async def test_upgrade_hands_over_raw_stream(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    with trio.fail_after(10):
        conn = await open_http_connection("127.0.0.1", port)
        response = await conn.request(
            "GET", "/upgrade", [("Upgrade", "echo"), ("Connection", "Upgrade")]
        )
        assert response.status == 101
        stream = response.upgraded_stream
        assert stream is not None
        got = response.trailing
        while len(got) < 4:
            got += await stream.receive_some(100)
        assert got == b"raw:"
        await stream.send_all(b"ping")
        got = b""
        while len(got) < 4:
            got += await stream.receive_some(100)
        assert got == b"PING"
        await conn.aclose()


async def test_client_retries_stale_pooled_connection(nursery: trio.Nursery) -> None:
    # A server that answers one request per connection and then closes it.
    async def one_shot(stream: trio.abc.Stream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(4096)
        body = json.dumps({"ok": True}).encode()
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, one_shot, 0)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        async with HTTPClient() as client:
            for _ in range(3):
                r = await client.fetch("GET", f"http://127.0.0.1:{port}/")
                assert r.json() == {"ok": True}


async def test_streamed_body_keeps_known_length_and_head(nursery: trio.Nursery) -> None:
    async def sized(request: Request) -> Response:
        async def chunks():
            yield b"abc"
            yield b"de"

        return Response(200, [("Content-Length", "5")], chunks())

    counts: list[int] = []
    _host, port = await nursery.start(
        lambda task_status: serve_http(
            sized, "127.0.0.1", 0, count_connection=counts.append, task_status=task_status
        )
    )
    with trio.fail_after(10):
        async with HTTPClient() as client:
            r = await client.fetch("GET", f"http://127.0.0.1:{port}/")
            assert (r.headers.get("content-length"), r.body) == ("5", b"abcde")
            assert r.headers.get("transfer-encoding") is None
            r = await client.fetch("HEAD", f"http://127.0.0.1:{port}/")
            assert (r.headers.get("content-length"), r.body) == ("5", b"")
        assert counts[0] == 1


async def test_early_answer_to_a_huge_upload_reaches_the_client(nursery: trio.Nursery) -> None:
    # The server refuses the body (413) without reading it; the client still gets the 413.
    port = await start(nursery)

    async def big_body():
        for _ in range(64):
            yield b"x" * (128 * 1024)

    with trio.fail_after(20):
        conn = await open_http_connection("127.0.0.1", port)
        response = await conn.request(
            "POST", "/echo", [("Content-Length", str(8 << 20))], big_body()
        )
        assert response.status == 413
        assert b"exceeds the limit" in await response.read()
        await conn.aclose()
