"""The shared HTTP layer against real sockets: keep-alive, limits, errors, streaming, upgrade."""

from __future__ import annotations

import hashlib
import json

import h11
import pytest
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
from dask_gateway_common.http1 import parse_request_head, parse_response_head, response_framing


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


# --------------------------------------------------------------------------- fast paths


def _pattern(size: int) -> bytes:
    """Bytes that differ from chunk to chunk, so a lost or repeated chunk shows."""
    block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    out = bytearray()
    i = 0
    while len(out) < size:
        out += hashlib.sha256(i.to_bytes(4, "big")).digest() + block[: 65536 - 32]
        i += 1
    return bytes(out[:size])


BIG = _pattern(6 * 1024 * 1024 + 123)


async def sized_app(request: Request) -> Response:
    if request.method == "POST":
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.iter_body():
            digest.update(chunk)
            size += len(chunk)
        return Response.json({"size": size, "sha256": digest.hexdigest()})
    if request.path == "/lie":
        declared, actual = (int(x) for x in request.query.split("-"))

        async def short():
            yield b"x" * actual

        return Response(200, [("Content-Length", str(declared))], short())
    if request.path == "/bad-header":
        return Response(200, [("X-Bad", "a\r\nInjected: yes")], b"nope")

    async def chunks():
        view = memoryview(BIG)
        for start in range(0, len(BIG), 100_000):
            yield bytes(view[start : start + 100_000])

    return Response(200, [("Content-Length", str(len(BIG)))], chunks())


async def _read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def test_sized_bodies_both_ways_and_keep_alive(nursery: trio.Nursery) -> None:
    _host, port = await nursery.start(serve_http, sized_app, "127.0.0.1", 0)

    async def upload():
        view = memoryview(BIG)
        for start in range(0, len(BIG), 300_000):
            yield bytes(view[start : start + 300_000])

    with trio.fail_after(30):
        conn = await open_http_connection("127.0.0.1", port)
        try:
            for _ in range(2):
                response = await conn.request("GET", "/big")
                assert response.content_length == len(BIG)
                digest = hashlib.sha256()
                async for chunk in response.iter_body():
                    digest.update(chunk)
                assert digest.hexdigest() == hashlib.sha256(BIG).hexdigest()
                assert conn.reusable
                response = await conn.request(
                    "POST", "/up", [("Content-Length", str(len(BIG)))], upload()
                )
                assert json.loads(await response.read()) == {
                    "size": len(BIG),
                    "sha256": hashlib.sha256(BIG).hexdigest(),
                }
                assert conn.reusable
            assert conn.requests_sent == 4
        finally:
            await conn.aclose()


async def test_streamed_body_not_matching_its_length_cuts_the_connection(
    nursery: trio.Nursery,
) -> None:
    _host, port = await nursery.start(serve_http, sized_app, "127.0.0.1", 0)
    with trio.fail_after(10):
        for query in ("10-5", "3-5"):
            conn = await open_http_connection("127.0.0.1", port)
            response = await conn.request("GET", f"/lie?{query}")
            assert response.status == 200
            with pytest.raises(trio.BrokenResourceError):
                await response.read()
            assert not conn.reusable
            await conn.aclose()


async def test_invalid_handler_header_becomes_500(nursery: trio.Nursery) -> None:
    _host, port = await nursery.start(serve_http, sized_app, "127.0.0.1", 0)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /bad-header HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await _read_all(stream)
    assert data.startswith(b"HTTP/1.1 500 ")
    assert b"Injected" not in data


async def test_pipelined_requests_are_answered_in_order(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"POST /echo?n=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"POST /echo?n=2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
            b"GET /echo?n=3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = bytearray(await _read_all(stream))
    bodies = []
    while data:
        parsed = parse_response_head(data)
        assert parsed is not None
        head, size = parsed
        del data[:size]
        _, length = response_framing("GET", head)
        bodies.append(json.loads(bytes(data[:length])))
        del data[:length]
    assert [(b["query"]["n"], b["body"]) for b in bodies] == [
        ("1", "hello"),
        ("2", "abc"),
        ("3", ""),
    ]


async def test_expect_100_continue(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += await stream.receive_some(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(b"ok")
        response = bytearray()
        while (parsed := parse_response_head(response)) is None:
            response += await stream.receive_some(65536)
        assert parsed[0].status == 200
        # A request answered without reading its body gets no 100 and the connection
        # closes after the answer (the body is not coming).
        await stream.send_all(
            b"POST /fail HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n"
        )
        rest = await _read_all(stream)
        assert b"100 Continue" not in rest and b"HTTP/1.1 422 " in rest


async def test_http10_client_gets_a_body_delimited_by_close(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /stream HTTP/1.0\r\n\r\n")
        data = await _read_all(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == b"".join(f"line {i}\n".encode() for i in range(5))


async def test_client_reads_chunked_and_close_delimited_responses(nursery: trio.Nursery) -> None:
    async def server(stream: trio.abc.Stream) -> None:
        buf = bytearray()
        for answer in (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
        ):
            while parse_request_head(buf) is None:
                buf += await stream.receive_some(4096)
            parsed = parse_request_head(buf)
            assert parsed is not None
            del buf[: parsed[1]]
            await stream.send_all(answer)
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, server, 0)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        conn = await open_http_connection("127.0.0.1", port)
        response = await conn.request("GET", "/one")
        assert response.content_length is None
        assert await response.read() == b"hello world"
        assert conn.reusable
        response = await conn.request("GET", "/two")
        assert await response.read() == b"until the end"
        assert not conn.reusable
        await conn.aclose()


async def test_client_refuses_malformed_responses(nursery: trio.Nursery) -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"NOT HTTP\r\n\r\n",
    ]

    async def server(stream: trio.abc.Stream) -> None:
        buf = bytearray()
        while parse_request_head(buf) is None:
            buf += await stream.receive_some(4096)
        await stream.send_all(answers.pop(0))
        await trio.sleep_forever()

    listeners = await nursery.start(trio.serve_tcp, server, 0)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        for _ in range(4):
            conn = await open_http_connection("127.0.0.1", port)
            with pytest.raises(h11.RemoteProtocolError):
                response = await conn.request("GET", "/")
                await response.read()
            assert not conn.reusable
            await conn.aclose()


async def test_serving_a_memory_stream(nursery: trio.Nursery) -> None:
    """Not a socket (as behind a PrefixedStream or TLS): the generic Stream path."""
    from dask_gateway_common.http import HTTPConnection, serve_http_stream

    client_side, server_side = trio.testing.memory_stream_pair()
    nursery.start_soon(serve_http_stream, server_side, sized_app)
    conn = HTTPConnection(client_side, "memory")
    with trio.fail_after(30):
        response = await conn.request("GET", "/big")
        assert hashlib.sha256(await response.read()).hexdigest() == hashlib.sha256(BIG).hexdigest()
        response = await conn.request("POST", "/up", [], b"0123456789")
        assert json.loads(await response.read())["size"] == 10
        assert conn.reusable and conn.requests_sent == 2
    await conn.aclose()


async def test_broken_request_body_closes_the_connection(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    with trio.fail_after(5):
        for body in (b"zz\r\n", b"5\r\nhelloXX"):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body
            )
            data = await _read_all(stream)  # the server closes: framing is lost
            assert data.startswith(b"HTTP/1.1 400 ") and b"connection: close" in data.lower()
            assert b"Malformed request body" in data


async def test_passthrough_forwards_exactly_the_upstream_body(nursery: trio.Nursery) -> None:
    from dask_gateway_common.http import Passthrough

    answers = {
        # the upstream sends bytes past its body: they are not forwarded
        "/extra": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA",
        "/big": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BIG) + BIG,
        "/short": b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"s" * 1000,
    }

    async def upstream(stream: trio.abc.Stream) -> None:
        buf = bytearray()
        while (parsed := parse_request_head(buf)) is None:
            buf += await stream.receive_some(4096)
        await stream.send_all(answers[parsed[0].target.decode()])
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, upstream, 0)
    upstream_port = listeners[0].socket.getsockname()[1]
    ends: list[tuple[bool, bool]] = []

    async def proxy(request: Request) -> Response:
        conn = await open_http_connection("127.0.0.1", upstream_port)
        response = await conn.request("GET", request.path)

        async def on_end(complete: bool) -> None:
            ends.append((complete, conn.reusable))
            await conn.aclose()

        body = Passthrough(response, on_end=on_end)
        return Response(200, [("Content-Length", str(response.content_length))], body)

    _host, port = await nursery.start(serve_http, proxy, "127.0.0.1", 0)
    with trio.fail_after(10):
        conn = await open_http_connection("127.0.0.1", port)
        assert await (await conn.request("GET", "/extra")).read() == b"hello"
        assert await (await conn.request("GET", "/big")).read() == BIG
        response = await conn.request("GET", "/short")
        with pytest.raises(trio.BrokenResourceError):
            await response.read()  # the upstream broke off: the client is cut off too
        await conn.aclose()
    # complete twice; reusable only where nothing came past the body
    assert ends == [(True, False), (True, True), (False, False)]
