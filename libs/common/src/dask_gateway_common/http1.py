"""Sans-IO HTTP/1.1 codec for :mod:`.http`: parse request and response heads, decide how
a body is framed, decode chunked bodies, encode heads and chunks.

Theory of operation
-------------------
Bytes in, values out; no sockets. "Need more data" is a return value (``None``), not an
exception. The caller owns one ``bytearray`` per connection: it appends what it receives
and these functions consume from its front (``del buf[:n]`` is cheap on a bytearray), so
bytes past the end of a message (a pipelined request) simply stay for the next one.

Why not h11 (which this replaced): h11 runs its full state machine and re-validates every
header on every event: about 55 µs of CPU per server exchange and 60 µs per client
exchange, and the web proxy makes one of each per proxied request. Here a head is found
with one regex search for the blank line, split into lines, and each line checked; header
names already seen are looked up in a small cache instead of re-matched. The tests check
this codec against h11 on generated and mutated messages: whatever we accept, h11 accepts
alike, and we refuse what h11 refuses.

Rules follow RFC 9112 as h11 applies them. Request line ``token SP target SP HTTP/d.d``
(target: visible ASCII only; versions other than 1.x are refused with 505; a first byte
that cannot start a request line, such as a TLS handshake, is refused at once); status
line ``HTTP/d.d SP 3DIGIT [SP reason]``; header lines ``token ":" OWS value OWS`` with no
control characters but HTAB in the value, lines ending in CRLF or a bare LF; obsolete
line folding is refused (RFC 9112 §5.2 lets a server answer 400 and a proxy 502, where h11
would unfold); an HTTP/1.1 request has exactly one ``Host``; Transfer-Encoding must be
exactly ``chunked`` (else 501) and beats Content-Length; all Content-Length values must
agree; no response body for HEAD, 204, 304 and 2xx to CONNECT; otherwise a response
without either is read until the connection closes. Keep-alive needs HTTP/1.1 and no
``Connection: close``.

Errors: malformed input from the peer raises ``h11.RemoteProtocolError`` and a message we
were asked to produce that is not valid raises ``h11.LocalProtocolError``, so callers that
already catch ``h11.ProtocolError`` keep working.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Literal

import h11

__all__ = [
    "MAX_HEAD_BYTES",
    "ChunkedReader",
    "Framing",
    "RequestHead",
    "ResponseHead",
    "asks_to_close",
    "encode_chunk",
    "encode_request_head",
    "encode_response_head",
    "expects_continue",
    "parse_request_head",
    "parse_response_head",
    "request_framing",
    "response_framing",
]

#: Largest response head accepted (status line + headers).
MAX_HEAD_BYTES: Final = 64 * 1024
# Longest chunk-size line (with extensions) and the most trailer bytes accepted.
_MAX_CHUNK_LINE: Final = 4096
_MAX_TRAILERS: Final = 16 * 1024
_MAX_LENGTH_DIGITS: Final = 20

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_TOKEN_TEXT = re.compile(r"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_TARGET_TEXT = re.compile(r"[\x21-\x7e]+")
_BAD_HEAD_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_BAD_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_REQUEST_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+) ([\x21-\x7e]+) HTTP/([0-9]\.[0-9])")
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")
_DIGITS = re.compile(rb"[0-9]+")

# Header names that passed validation once (bounded), so steady traffic skips the regex:
# names we send, and names we received (raw -> lower-cased).
_known_names: set[str] = set()
_known_raw_names: dict[bytes, bytes] = {}
_KNOWN_NAMES_MAX: Final = 512


@dataclass(slots=True)
class ResponseHead:
    """A parsed response head; header names are lower-cased, values OWS-stripped."""

    status: int
    reason: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]


@dataclass(slots=True)
class RequestHead:
    """A parsed request head; header names are lower-cased, values OWS-stripped."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]


Framing = tuple[Literal["length", "chunked", "close"], int]


# ------------------------------------------------------------------------- encoding


def _encode_fields(start: str, headers: list[tuple[str, str]]) -> tuple[bytes, int]:
    """``start`` line plus the header lines and the blank line, validated; also returns
    how many ``Host`` headers there were."""
    known = _known_names
    hosts = 0
    parts = [start]
    for name, value in headers:
        if name not in known:
            if not _TOKEN_TEXT.fullmatch(name):
                raise h11.LocalProtocolError(f"Illegal header name {name!r}")
            if len(known) < _KNOWN_NAMES_MAX:
                known.add(name)
        if name == "Host" or name.lower() == "host":
            hosts += 1
        parts += (name, ": ", value, "\r\n")
    parts.append("\r\n")
    text = "".join(parts)
    # One scan of the whole head instead of one per value: no control character but
    # HTAB, and CR/LF only where we put them (so no value smuggles in a line break).
    lines = len(headers) + 2
    if (
        _BAD_HEAD_TEXT.search(text)
        or text.count("\n") != lines
        or text.count("\r\n") != lines
        or text.count("\r") != lines
    ):
        raise h11.LocalProtocolError("Illegal character in a header value")
    try:
        return text.encode("latin-1"), hosts
    except UnicodeEncodeError as exc:
        raise h11.LocalProtocolError(f"Header text is not latin-1: {exc}") from None


def encode_request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """``method target HTTP/1.1`` and the headers, exactly one of them ``Host``."""
    if not _TOKEN_TEXT.fullmatch(method):
        raise h11.LocalProtocolError("Illegal method characters")
    if not _TARGET_TEXT.fullmatch(target):
        raise h11.LocalProtocolError("Illegal target characters")
    data, hosts = _encode_fields(f"{method} {target} HTTP/1.1\r\n", headers)
    if hosts != 1:
        raise h11.LocalProtocolError("A request needs exactly one Host header")
    return data


_status_lines: dict[int, str] = {}


def encode_response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """``HTTP/1.1 status reason`` and the headers (the standard reason phrase)."""
    line = _status_lines.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise h11.LocalProtocolError(f"Illegal status code {status}")
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        line = _status_lines[status] = f"HTTP/1.1 {status} {reason}\r\n"
    return _encode_fields(line, headers)[0]


def encode_chunk(data: bytes) -> tuple[bytes, bytes]:
    """The framing around one non-empty chunk of a chunked body: (before, after)."""
    return b"%x\r\n" % len(data), b"\r\n"


# ------------------------------------------------------------------------- parsing


def _find_head(buf: bytearray, start: int, max_bytes: int, what: str) -> tuple[int, int] | None:
    """Where the first blank line is: (end of the header lines, end of the head), or None
    if there is none yet. ``start`` is where a blank line may begin at the earliest."""
    start = max(0, start)
    # Fast path, every well-behaved peer: the first CRLF CRLF, with no blank line made of
    # bare LFs before it.
    i = buf.find(b"\r\n\r\n", start)
    if i >= 0 and buf.find(b"\n\n", start, i + 2) < 0 and buf.find(b"\n\r\n", start, i + 3) < 0:
        found: tuple[int, int] | None = (i + 1, i + 4)
    else:
        match = _BLANK_LINE.search(buf, start)
        found = None if match is None else (match.start(), match.end())
    if (found is None and len(buf) > max_bytes) or (found is not None and found[0] > max_bytes):
        raise h11.RemoteProtocolError(f"{what} too large", error_status_hint=431)
    return found


def _parse_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Header lines (after the start line, control characters already refused) ->
    (lower-cased name, OWS-stripped value)."""
    headers: list[tuple[bytes, bytes]] = []
    known = _known_raw_names
    framing = 0  # 1: one plain Content-Length; more: normalise as h11 does
    for raw in lines:
        line = raw.removesuffix(b"\r")
        if b"\r" in line:
            raise h11.RemoteProtocolError("Bare CR in a header line")
        name, colon, value = line.partition(b":")
        lname = known.get(name) if colon else None
        if lname is None:
            if line[:1] in (b" ", b"\t"):
                raise h11.RemoteProtocolError("Obsolete header line folding is not supported")
            if not colon or not _TOKEN.fullmatch(name):
                raise h11.RemoteProtocolError(f"Malformed header line {line[:100]!r}")
            lname = name.lower()
            if len(known) < _KNOWN_NAMES_MAX:
                known[name] = lname
        value = value.strip(b" \t")
        headers.append((lname, value))
        if lname in _FRAMING_NAMES:
            # the common case, one plain Content-Length, needs no second look
            simple = framing == 0 and lname == b"content-length" and value.isdigit()
            framing += 1 if simple and len(value) <= _MAX_LENGTH_DIGITS else 2
    return _normalise_framing(headers) if framing > 1 else headers


_FRAMING_NAMES: Final = frozenset({b"content-length", b"transfer-encoding"})


def _normalise_framing(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """As h11 does: one Content-Length with its single value (repeated equal values are
    merged, different ones refused), one Transfer-Encoding, lower-cased (501 if not
    chunked)."""
    out: list[tuple[bytes, bytes]] = []
    length: bytes | None = None
    encoding = False
    for name, value in headers:
        if name == b"content-length":
            values = {part.strip() for part in value.split(b",")}
            if len(values) != 1:
                raise h11.RemoteProtocolError("Conflicting Content-Length headers")
            (value,) = values
            if not _DIGITS.fullmatch(value) or len(value) > _MAX_LENGTH_DIGITS:
                raise h11.RemoteProtocolError("Bad Content-Length")
            if length is not None:
                if value != length:
                    raise h11.RemoteProtocolError("Conflicting Content-Length headers")
                continue
            length = value
        elif name == b"transfer-encoding":
            value = value.lower()
            if encoding or value != b"chunked":
                raise h11.RemoteProtocolError(
                    "Only Transfer-Encoding: chunked is supported", error_status_hint=501
                )
            encoding = True
        out.append((name, value))
    return out


def _head_lines(buf: bytearray, end: int) -> list[bytes]:
    block = bytes(memoryview(buf)[:end])
    if _BAD_HEAD.search(block):
        raise h11.RemoteProtocolError("Control character in a message head")
    return block.split(b"\n")


def parse_response_head(
    buf: bytearray, start: int = 0, max_bytes: int = MAX_HEAD_BYTES
) -> tuple[ResponseHead, int] | None:
    """Parse a response head at the front of ``buf`` without consuming it.

    Returns ``(head, size)`` where ``size`` is the head's length in bytes (the body starts
    there), or ``None`` if the head is not complete yet. ``start`` is where to resume
    looking for the blank line ending the head (the length ``buf`` had at the previous
    call minus 3), so a head trickling in byte by byte is not rescanned each time.
    """
    found = _find_head(buf, start, max_bytes, "Response head")
    if found is None:
        return None
    lines = _head_lines(buf, found[0])
    status_line = lines[0].removesuffix(b"\r")
    status = _STATUS_LINE.fullmatch(status_line)
    if status is None:
        raise h11.RemoteProtocolError(f"Malformed status line {status_line[:100]!r}")
    head = ResponseHead(
        status=int(status.group(2)),
        reason=status.group(3) or b"",
        http_version=status.group(1),
        headers=_parse_fields(lines[1:]),
    )
    return head, found[1]


def parse_request_head(
    buf: bytearray, start: int = 0, max_bytes: int = MAX_HEAD_BYTES
) -> tuple[RequestHead, int] | None:
    """Parse a request head at the front of ``buf`` without consuming it; as
    :func:`parse_response_head`. Errors carry the status to answer with
    (``error_status_hint``: 400, 431 for a head over ``max_bytes``, 505 for an HTTP
    version other than 1.x); HTTP/1.1 requests need exactly one ``Host``."""
    if buf and buf[0] < 0x21:
        # Not even the start of a request line (a TLS handshake, a stray CRLF): no need
        # to wait for more.
        raise h11.RemoteProtocolError("Illegal request line")
    found = _find_head(buf, start, max_bytes, "Request head")
    if found is None:
        return None
    lines = _head_lines(buf, found[0])
    request_line = lines[0].removesuffix(b"\r")
    parts = _REQUEST_LINE.fullmatch(request_line)
    if parts is None:
        raise h11.RemoteProtocolError(f"Malformed request line {request_line[:100]!r}")
    version = parts.group(3)
    if version[:2] != b"1.":
        raise h11.RemoteProtocolError("HTTP version not supported", error_status_hint=505)
    headers = _parse_fields(lines[1:])
    hosts = sum(1 for name, _ in headers if name == b"host")
    if hosts > 1 or (hosts == 0 and version >= b"1.1"):
        raise h11.RemoteProtocolError("A request needs exactly one Host header")
    head = RequestHead(
        method=parts.group(1), target=parts.group(2), http_version=version, headers=headers
    )
    return head, found[1]


def request_framing(head: RequestHead) -> Framing:
    """How a request body is delimited: ``("length", n)`` (0: no body) or
    ``("chunked", 0)`` (Transfer-Encoding beats Content-Length)."""
    length = 0
    for name, value in head.headers:
        if name == b"transfer-encoding":
            return ("chunked", 0)
        if name == b"content-length":
            length = int(value)
    return ("length", length)


def expects_continue(head: RequestHead) -> bool:
    """Whether the client waits for ``100 Continue`` before sending the body."""
    if head.http_version < b"1.1":
        return False
    return any(
        name == b"expect" and b"100-continue" in (t.strip().lower() for t in value.split(b","))
        for name, value in head.headers
    )


def response_framing(method: str, head: ResponseHead) -> Framing:
    """How the body of a final (>= 200) response to ``method`` is delimited:
    ``("length", n)``, ``("chunked", 0)`` or ``("close", 0)`` (read until EOF)."""
    status = head.status
    if method == "HEAD" or status in (204, 304) or (method == "CONNECT" and status < 300):
        return ("length", 0)
    length: int | None = None
    for name, value in head.headers:
        if name == b"transfer-encoding":
            return ("chunked", 0)
        if name == b"content-length":
            length = int(value)
    return ("close", 0) if length is None else ("length", length)


def asks_to_close(http_version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a message forbids keep-alive: HTTP/1.0 or ``Connection: close``."""
    if http_version < b"1.1":
        return True
    for name, value in headers:
        if name == b"connection" and b"close" in (t.strip().lower() for t in value.split(b",")):
            return True
    return False


class ChunkedReader:
    """Decodes one chunked body out of a buffer the caller keeps filling."""

    __slots__ = ("_left", "_state", "_trailer_bytes")

    _SIZE: Final = 0
    _DATA: Final = 1
    _DATA_END: Final = 2
    _TRAILER: Final = 3
    _DONE: Final = 4

    def __init__(self) -> None:
        self._state = self._SIZE
        self._left = 0
        self._trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def read(self, buf: bytearray, max_bytes: int) -> bytes | None:
        """Consume from ``buf``: the next body bytes (at most ``max_bytes``, never empty),
        ``b""`` once the body (with its trailers) has ended, ``None`` when ``buf`` holds too
        little to go on."""
        while True:
            state = self._state
            if state == self._DATA:
                if not buf:
                    return None
                n = min(self._left, len(buf), max_bytes)
                data = bytes(buf[:n])
                del buf[:n]
                self._left -= n
                if not self._left:
                    self._state = self._DATA_END
                return data
            if state == self._SIZE:
                line = _take_line(buf, _MAX_CHUNK_LINE, "Chunk size line too long")
                if line is None:
                    return None
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise h11.RemoteProtocolError(f"Bad chunk size line {line[:100]!r}")
                size = int(match.group(1), 16)
                if size:
                    self._left = size
                    self._state = self._DATA
                else:
                    self._state = self._TRAILER
            elif state == self._DATA_END:
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise h11.RemoteProtocolError("Chunk data not followed by CRLF")
                del buf[:2]
                self._state = self._SIZE
            elif state == self._TRAILER:
                line = _take_line(buf, _MAX_CHUNK_LINE, "Trailer line too long")
                if line is None:
                    return None
                self._trailer_bytes += len(line) + 2
                if self._trailer_bytes > _MAX_TRAILERS:
                    raise h11.RemoteProtocolError("Trailers too large")
                if not line:
                    self._state = self._DONE
                    return b""
                if line.endswith(b"\r") or _BAD_HEAD.search(line):
                    raise h11.RemoteProtocolError("Malformed trailer line")
                _parse_fields([line])  # validated, then dropped
            else:
                return b""


def _take_line(buf: bytearray, limit: int, too_long: str) -> bytes | None:
    end = buf.find(b"\r\n", 0, limit + 2)
    if end < 0:
        if len(buf) > limit + 1:
            raise h11.RemoteProtocolError(too_long)
        return None
    line = bytes(buf[:end])
    del buf[: end + 2]
    return line
