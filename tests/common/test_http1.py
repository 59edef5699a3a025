"""The sans-IO HTTP/1.1 codec, checked against h11 as the oracle.

Valid messages (generated, split at random points, with random line endings) must parse
to exactly what h11 parses; mutated messages (a byte inserted, replaced or dropped) may be
refused by us where h11 is more lenient, but whatever we accept h11 must accept alike
(head and body): so we are never the laxer parser of the two.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_gateway_common.http1 import (
    ChunkedReader,
    RequestHead,
    ResponseHead,
    asks_to_close,
    encode_request_head,
    encode_response_head,
    expects_continue,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
)

# HTTP1_FUZZ_EXAMPLES=20000 for a long differential run.
SETTINGS = settings(
    max_examples=int(os.environ.get("HTTP1_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TOKEN = st.from_regex(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]{1,12}", fullmatch=True)
NAME = st.one_of(
    st.sampled_from([b"Accept", b"User-Agent", b"X-Thing", b"cookie", b"Content-Type"]), TOKEN
).filter(
    lambda n: (
        n.lower()
        not in (b"host", b"content-length", b"transfer-encoding", b"connection", b"expect")
    )
)
VALUE = st.from_regex(
    rb"([\x21-\x7e\x80-\xff]{1,8}([ \t]{1,2}[\x21-\x7e\x80-\xff]{1,8}){0,3})?", fullmatch=True
)
TARGET = st.from_regex(rb"/[\x21-\x7e]{0,30}", fullmatch=True)
BODY = st.binary(max_size=300)


@dataclass
class Parsed:
    """What a parser made of one message: head fields and the body bytes."""

    start: tuple[object, ...]
    headers: list[tuple[bytes, bytes]]
    body: bytes


def _lines(start: bytes, headers: list[tuple[bytes, bytes]], eol: bytes, ows: bytes) -> bytes:
    out = start + eol
    for name, value in headers:
        out += name + b":" + ows + value + ows + eol
    return out + eol


def _chunked(body: bytes, cuts: list[int], trailer: bool) -> bytes:
    out = b""
    pos = 0
    for cut in sorted({c % (len(body) + 1) for c in cuts} | {len(body)}):
        piece = body[pos:cut]
        if piece:
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
        pos = cut
    return out + b"0\r\n" + (b"X-Trailer: yes\r\n" if trailer else b"") + b"\r\n"


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]) | TOKEN)
    version = draw(st.sampled_from([b"1.1", b"1.0"]))
    headers = draw(st.lists(st.tuples(NAME, VALUE), max_size=5))
    headers.insert(draw(st.integers(0, len(headers))), (b"Host", b"example.com:8000"))
    body = draw(BODY)
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    payload = b""
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        payload = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", draw(st.sampled_from([b"chunked", b"Chunked"]))))
        cuts = draw(st.lists(st.integers(0, 400), max_size=4))
        payload = _chunked(body, cuts, draw(st.booleans()))
    if draw(st.booleans()):
        headers.append((b"Connection", draw(st.sampled_from([b"close", b"keep-alive"]))))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    ows = draw(st.sampled_from([b"", b" ", b"\t "]))
    start = method + b" " + draw(TARGET) + b" HTTP/" + version
    return _lines(start, headers, eol, ows) + payload


@st.composite
def responses(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(["GET", "HEAD", "POST"]))
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500, 502]) | st.integers(200, 599))
    reason = draw(st.sampled_from([b"OK", b"", b"Not Found", b"Weird \xe9 reason"]))
    version = draw(st.sampled_from([b"1.1", b"1.0"]))
    headers = draw(st.lists(st.tuples(NAME, VALUE), max_size=5))
    body = draw(BODY)
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    bodyless = method == "HEAD" or status in (204, 304)
    payload = b""
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        payload = b"" if bodyless else body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        cuts = draw(st.lists(st.integers(0, 400), max_size=4))
        payload = b"" if bodyless else _chunked(body, cuts, draw(st.booleans()))
    else:
        payload = b"" if bodyless else body
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    ows = draw(st.sampled_from([b"", b" "]))
    start = b"HTTP/" + version + b" %d" % status + (b" " + reason if reason else b"")
    return method, _lines(start, headers, eol, ows) + payload


# ------------------------------------------------------------------------ the parsers


def _ours_request(data: bytes, splits: list[int]) -> Parsed | Exception | None:
    """Feed ``data`` in pieces as the server does; None if it never completes."""
    buf = bytearray()
    pos = 0
    searched = 0
    head: RequestHead | None = None
    try:
        for cut in [*sorted({s % (len(data) + 1) for s in splits}), len(data)]:
            buf += data[pos:cut]
            pos = cut
            if head is None:
                parsed = parse_request_head(buf, searched - 3)
                if parsed is None:
                    searched = len(buf)
                    continue
                head, size = parsed
                del buf[:size]
        if head is None:
            return None
        framing, length = request_framing(head)
        body = _read_body(buf, framing, length, eof=False)
    except h11.RemoteProtocolError as exc:
        return exc
    if body is None:
        return None
    start = (head.method, head.target, head.http_version)
    return Parsed(start, head.headers, body)


def _read_body(buf: bytearray, framing: str, length: int, *, eof: bool) -> bytes | None:
    if framing == "length":
        if len(buf) < length:
            return None
        body = bytes(buf[:length])
        del buf[:length]
        return body
    if framing == "close":
        return bytes(buf) if eof else None
    reader = ChunkedReader()
    out = b""
    while True:
        piece = reader.read(buf, 7)
        if piece is None:
            return None
        if piece == b"":
            return out
        out += piece


def _h11_events(conn: h11.Connection, data: bytes, *, eof: bool) -> list[object] | Exception:
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    events: list[object] = []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return events
            events.append(event)
            if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return events
    except h11.RemoteProtocolError as exc:
        return exc


def _h11_parsed(events: list[object] | Exception) -> Parsed | Exception | None:
    if isinstance(events, Exception):
        return events
    if not events or not isinstance(events[-1], h11.EndOfMessage):
        return None
    head = events[0]
    body = b"".join(bytes(e.data) for e in events if isinstance(e, h11.Data))
    if isinstance(head, h11.Request):
        start: tuple[object, ...] = (head.method, head.target, head.http_version)
    else:
        assert isinstance(head, h11.Response)
        start = (head.status_code, head.reason, head.http_version)
    return Parsed(start, [(k, v) for k, v in head.headers], body)


def _h11_request(data: bytes) -> Parsed | Exception | None:
    return _h11_parsed(_h11_events(h11.Connection(h11.SERVER), data, eof=False))


def _h11_client(method: str) -> h11.Connection:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    return conn


def _ours_response(method: str, data: bytes, *, eof: bool) -> Parsed | Exception | None:
    buf = bytearray(data)
    try:
        parsed = parse_response_head(buf)
        if parsed is None:
            return None
        head, size = parsed
        del buf[:size]
        if head.status < 200:
            return None
        framing, length = response_framing(method, head)
        body = _read_body(buf, framing, length, eof=eof)
    except h11.RemoteProtocolError as exc:
        return exc
    if body is None:
        return None
    return Parsed((head.status, head.reason, head.http_version), head.headers, body)


def _h11_response(method: str, data: bytes, *, eof: bool) -> Parsed | Exception | None:
    return _h11_parsed(_h11_events(_h11_client(method), data, eof=eof))


# ------------------------------------------------------------------------ valid input


@SETTINGS
@given(requests(), st.lists(st.integers(0, 2000), max_size=6))
def test_valid_requests_parse_as_h11_parses_them(data: bytes, splits: list[int]) -> None:
    ours = _ours_request(data, splits)
    theirs = _h11_request(data)
    assert isinstance(theirs, Parsed), theirs
    assert ours == theirs


@SETTINGS
@given(responses(), st.booleans())
def test_valid_responses_parse_as_h11_parses_them(case: tuple[str, bytes], eof: bool) -> None:
    method, data = case
    ours = _ours_response(method, data, eof=eof)
    theirs = _h11_response(method, data, eof=eof)
    assert ours == theirs
    if not eof and b"Content-Length" not in data and b"chunked" not in data:
        # read-until-close bodies are complete only at EOF (unless there is no body)
        assert ours is None or ours.body == b""


# ------------------------------------------------------------------------ mutated input

INTERESTING = st.sampled_from(
    [b"\r", b"\n", b"\x00", b" ", b"\t", b":", b"\x0b", b"\x7f", b"x", b",", b"0", b"\r\n", b";"]
)


@st.composite
def mutations(draw: st.DrawFn, messages: st.SearchStrategy[bytes]) -> bytes:
    data = draw(messages)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["insert", "replace", "delete"]))
        if kind == "insert":
            data = data[:pos] + draw(INTERESTING) + data[pos:]
        elif kind == "replace":
            data = data[:pos] + draw(INTERESTING) + data[pos + 1 :]
        else:
            data = data[:pos] + data[pos + 1 :]
    return data


@SETTINGS
@given(mutations(requests()))
def test_mutated_requests_we_accept_h11_accepts_alike(data: bytes) -> None:
    ours = _ours_request(data, [])
    if isinstance(ours, Parsed):
        theirs = _h11_request(data)
        assert theirs == ours, (data, theirs)


@SETTINGS
@given(mutations(responses().map(lambda c: c[1])), st.sampled_from(["GET", "HEAD"]))
def test_mutated_responses_we_accept_h11_accepts_alike(data: bytes, method: str) -> None:
    ours = _ours_response(method, data, eof=True)
    if isinstance(ours, Parsed):
        theirs = _h11_response(method, data, eof=True)
        assert theirs == ours, (data, theirs)


# ------------------------------------------------------------------------ specific cases


def test_request_errors_carry_the_status_to_answer() -> None:
    def status_of(data: bytes) -> int:
        with pytest.raises(h11.RemoteProtocolError) as info:
            parsed = parse_request_head(bytearray(data), 0, 1024)
            assert parsed is not None
            request_framing(parsed[0])
        return info.value.error_status_hint

    assert status_of(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 2000 + b"\r\n\r\n") == 431
    assert status_of(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 2000) == 431  # incomplete
    assert status_of(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n") == 505
    assert status_of(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n") == 501
    assert status_of(b"\x16\x03\x01\x02\x00") == 400  # a TLS ClientHello: refused at once
    assert status_of(b"GET / HTTP/1.1\r\n\r\n") == 400  # no Host
    assert status_of(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") == 400
    assert status_of(b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n  folded\r\n\r\n") == 400
    assert status_of(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n") == 400
    assert status_of(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\n") == 400
    assert status_of(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n") == 400


def test_request_head_details() -> None:
    buf = bytearray(
        b"POST /x?y HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3, 3\r\n"
        b"Connection: keep-alive, Close\r\n\r\nabcGET"
    )
    parsed = parse_request_head(buf)
    assert parsed is not None
    head, size = parsed
    assert bytes(buf[size:]) == b"abcGET"  # the body and a pipelined request stay
    assert (head.method, head.target, head.http_version) == (b"POST", b"/x?y", b"1.1")
    assert request_framing(head) == ("length", 3)
    assert expects_continue(head)
    assert asks_to_close(head.http_version, head.headers)
    http10 = parse_request_head(bytearray(b"GET / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n"))
    assert http10 is not None and not expects_continue(http10[0])
    assert asks_to_close(b"1.0", [])
    assert parse_request_head(bytearray(b"GET / HTTP/1.1\r\nHost: x\r\n")) is None


def test_head_trickling_in_byte_by_byte() -> None:
    data = b"GET /abc HTTP/1.1\r\nHost: x\r\nA: b\r\n\r\nrest"
    buf = bytearray()
    searched = 0
    parsed = None
    for byte in data:
        buf.append(byte)
        parsed = parse_request_head(buf, searched - 3)
        if parsed is not None:
            break
        searched = len(buf)
    assert parsed is not None and len(buf) == data.index(b"rest")
    assert parsed[0].headers == [(b"host", b"x"), (b"a", b"b")]


def test_response_framing_rules() -> None:
    def framing(method: str, data: bytes) -> tuple[str, int]:
        parsed = parse_response_head(bytearray(data))
        assert parsed is not None
        return response_framing(method, parsed[0])

    ok = b"HTTP/1.1 200 OK\r\n"
    assert framing("GET", ok + b"Content-Length: 5\r\n\r\n") == ("length", 5)
    assert framing("HEAD", ok + b"Content-Length: 5\r\n\r\n") == ("length", 0)
    assert framing("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n") == (
        "length",
        0,
    )
    assert framing("CONNECT", ok + b"\r\n") == ("length", 0)
    both = ok + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert framing("GET", both) == ("chunked", 0)  # Transfer-Encoding wins
    assert framing("GET", ok + b"\r\n") == ("close", 0)
    assert framing("GET", b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n") == ("length", 0)
    with pytest.raises(h11.RemoteProtocolError):
        framing("GET", ok + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        framing("GET", ok + b"Transfer-Encoding: gzip, chunked\r\n\r\n")
    with pytest.raises(h11.RemoteProtocolError):
        parse_response_head(bytearray(b"HTTP/1.1 2000 OK\r\n\r\n"))
    with pytest.raises(h11.RemoteProtocolError):
        parse_response_head(bytearray(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000))


def test_chunked_reader_byte_by_byte_and_limits() -> None:
    data = b"3;ext=1\r\nabc\r\n10 \r\n" + b"x" * 16 + b"\r\n0\r\nT: 1\r\n\r\nNEXT"
    reader = ChunkedReader()
    buf = bytearray()
    body = b""
    for byte in data:
        buf.append(byte)
        while (piece := reader.read(buf, 5)) is not None:
            if piece == b"":
                break
            assert 0 < len(piece) <= 5
            body += piece
        if reader.done:
            break
    assert body == b"abc" + b"x" * 16 and reader.done
    for bad in (b"zz\r\n", b"3\r\nabcX\r\n", b"1" * 5000, b"0\r\nno colon\r\n\r\n"):
        with pytest.raises(h11.RemoteProtocolError):
            reader = ChunkedReader()
            buf = bytearray(bad)
            while reader.read(buf, 100) not in (None, b""):
                pass
    with pytest.raises(h11.RemoteProtocolError):
        reader = ChunkedReader()
        buf = bytearray(b"0\r\n" + b"T: " + b"v" * 3000 + b"\r\n" * 1)
        buf += (b"T: " + b"v" * 3000 + b"\r\n") * 10
        while reader.read(buf, 100) not in (None, b""):
            pass


# ------------------------------------------------------------------------ encoding


@SETTINGS
@given(
    st.sampled_from(["GET", "POST", "PATCH"]),
    TARGET.map(bytes.decode),
    st.lists(
        st.tuples(NAME.map(bytes.decode), VALUE.map(lambda v: v.decode("latin-1"))), max_size=5
    ),
)
def test_encoded_request_heads_parse_back_in_h11(
    method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    fields = [("Host", "example.com"), *headers]
    data = encode_request_head(method, target, fields)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    assert (event.method, event.target) == (method.encode(), target.encode())
    expected = [(k.lower().encode(), v.strip(" \t").encode("latin-1")) for k, v in fields]
    assert list(event.headers) == expected


@SETTINGS
@given(
    st.sampled_from([101, 200, 204, 404, 599, 799]),
    st.lists(
        st.tuples(NAME.map(bytes.decode), VALUE.map(lambda v: v.decode("latin-1"))), max_size=5
    ),
)
def test_encoded_response_heads_parse_back(status: int, headers: list[tuple[str, str]]) -> None:
    data = encode_response_head(status, [*headers, ("Content-Length", "0")])
    parsed = parse_response_head(bytearray(data))
    assert parsed is not None
    head, size = parsed
    assert size == len(data) and head.status == status and isinstance(head, ResponseHead)
    assert head.headers[:-1] == [
        (k.lower().encode(), v.strip(" \t").encode("latin-1")) for k, v in headers
    ]


def test_encoding_refuses_what_would_break_the_message() -> None:
    host = [("Host", "x")]
    for method, target, headers in [
        ("GET", "/", [("Host", "x"), ("X", "a\r\nInjected: 1")]),
        ("GET", "/", [("Host", "x"), ("Bad Name", "1")]),
        ("GET", "/a b", host),
        ("GE T", "/", host),
        ("GET", "/", []),
        ("GET", "/", [*host, *host]),
        ("GET", "/", [*host, ("X", "caf\u00e9\u2603")]),
    ]:
        with pytest.raises(h11.LocalProtocolError):
            encode_request_head(method, target, headers)
    with pytest.raises(h11.LocalProtocolError):
        encode_response_head(200, [("X", "a\nb")])
    with pytest.raises(h11.LocalProtocolError):
        encode_response_head(42, [])
    assert encode_response_head(404, []).startswith(b"HTTP/1.1 404 Not Found\r\n")
