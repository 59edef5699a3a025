"""Sans-IO HTTP/1.1 pieces for the client side of :mod:`.http`: encode message heads,
parse response heads, decide how a response body is framed, decode chunked bodies.

Theory of operation
-------------------
Bytes in, values out; no sockets. "Need more data" is a return value (``None``), not an
exception. The caller owns one ``bytearray`` per connection: it appends what it receives
and these functions consume from its front (``del buf[:n]`` is cheap on a bytearray).

Why not h11 here: h11 runs its full state machine and re-validates every header on every
event, about 60 µs of CPU per client exchange, and the web proxy makes one exchange per
proxied request. Requests arriving at our servers are still parsed by h11 (the untrusted
direction, with its hardened parser); this module parses only *responses*, from upstreams
we route to, and is checked against h11 by differential tests.

Rules follow RFC 9112 as h11 applies them: status line ``HTTP/d.d SP 3DIGIT [SP reason]``;
header lines ``token ":" OWS value OWS``, lines ending in CRLF or a bare LF; obsolete line
folding is refused (a proxy may answer 502 to it, RFC 9112 §5.2); Transfer-Encoding
must be exactly ``chunked`` and beats Content-Length; all Content-Length values must
agree; no body for HEAD, 204, 304 and 2xx to CONNECT; otherwise a response without either
is read until the connection closes. Keep-alive needs HTTP/1.1 and no ``Connection:
close``.

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
    "ResponseHead",
    "asks_to_close",
    "encode_chunk",
    "encode_request_head",
    "encode_response_head",
    "parse_response_head",
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
_BAD_VALUE_TEXT = re.compile(r"[\x00\r\n]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_STATUS_LINE = re.compile(rb"HTTP/([0-9]\.[0-9]) ([0-9]{3})(?: ([^\x00\r\n]*))?")
_BLANK_LINE = re.compile(rb"\n\r?\n")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\r\n]*)?[ \t]*")
_DIGITS = re.compile(rb"[0-9]+")

# Header names that passed validation once (bounded), so steady traffic skips the regex:
# names we send, and names we received (raw -> lower-cased).
_known_names: set[str] = set()
_known_raw_names: dict[bytes, bytes] = {}
_KNOWN_NAMES_MAX: Final = 512


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed response head; header names are lower-cased, values OWS-stripped."""

    status: int
    reason: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]


Framing = tuple[Literal["length", "chunked", "close"], int]


# ------------------------------------------------------------------------- encoding


def _check_field(name: str, value: str) -> None:
    if name not in _known_names:
        if not _TOKEN_TEXT.fullmatch(name):
            raise h11.LocalProtocolError(f"Illegal header name {name!r}")
        if len(_known_names) < _KNOWN_NAMES_MAX:
            _known_names.add(name)
    if _BAD_VALUE_TEXT.search(value):
        raise h11.LocalProtocolError(f"Illegal header value for {name!r}")


def _encode(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise h11.LocalProtocolError(f"Header text is not latin-1: {exc}") from None


def encode_request_head(method: str, target: str, headers: list[tuple[str, str]]) -> bytes:
    """``method target HTTP/1.1`` and the headers, exactly one of them ``Host``."""
    if not _TOKEN_TEXT.fullmatch(method):
        raise h11.LocalProtocolError("Illegal method characters")
    if not _TARGET_TEXT.fullmatch(target):
        raise h11.LocalProtocolError("Illegal target characters")
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    hosts = 0
    for name, value in headers:
        _check_field(name, value)
        if name.lower() == "host":
            hosts += 1
        lines.append(f"{name}: {value}\r\n")
    if hosts != 1:
        raise h11.LocalProtocolError("A request needs exactly one Host header")
    lines.append("\r\n")
    return _encode("".join(lines))


_reasons: dict[int, str] = {}


def encode_response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    """``HTTP/1.1 status reason`` and the headers (the standard reason phrase)."""
    if not 100 <= status <= 999:
        raise h11.LocalProtocolError(f"Illegal status code {status}")
    reason = _reasons.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        _reasons[status] = reason
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    for name, value in headers:
        _check_field(name, value)
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return _encode("".join(lines))


def encode_chunk(data: bytes) -> tuple[bytes, bytes]:
    """The framing around one non-empty chunk of a chunked body: (before, after)."""
    return b"%x\r\n" % len(data), b"\r\n"


# ------------------------------------------------------------------------- parsing


def parse_response_head(
    buf: bytearray, start: int = 0, max_bytes: int = MAX_HEAD_BYTES
) -> tuple[ResponseHead, int] | None:
    """Parse a response head at the front of ``buf`` without consuming it.

    Returns ``(head, size)`` where ``size`` is the head's length in bytes (the body starts
    there), or ``None`` if the head is not complete yet. ``start`` is where to resume
    looking for the blank line ending the head (the length ``buf`` had at the previous
    call minus 3), so a head trickling in byte by byte is not rescanned each time.
    """
    match = _BLANK_LINE.search(buf, max(0, start))
    if match is None:
        if len(buf) > max_bytes:
            raise h11.RemoteProtocolError("Response head too large", error_status_hint=502)
        return None
    if match.start() > max_bytes:
        raise h11.RemoteProtocolError("Response head too large", error_status_hint=502)
    block = bytes(buf[: match.start()])
    if b"\0" in block:
        raise h11.RemoteProtocolError("NUL byte in the response head")
    lines = block.split(b"\n")
    status_line = lines[0].removesuffix(b"\r")
    status = _STATUS_LINE.fullmatch(status_line)
    if status is None:
        raise h11.RemoteProtocolError(f"Malformed status line {status_line[:100]!r}")
    headers: list[tuple[bytes, bytes]] = []
    known = _known_raw_names
    for raw in lines[1:]:
        line = raw.removesuffix(b"\r")
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
        if b"\r" in value:
            raise h11.RemoteProtocolError(f"Illegal value in header {name[:100]!r}")
        headers.append((lname, value.strip(b" \t")))
    head = ResponseHead(
        status=int(status.group(2)),
        reason=status.group(3) or b"",
        http_version=status.group(1),
        headers=headers,
    )
    return head, match.end()


def response_framing(method: str, head: ResponseHead) -> Framing:
    """How the body of a final (>= 200) response to ``method`` is delimited:
    ``("length", n)``, ``("chunked", 0)`` or ``("close", 0)`` (read until EOF)."""
    status = head.status
    if method == "HEAD" or status in (204, 304) or (method == "CONNECT" and status < 300):
        return ("length", 0)
    encodings = [v for n, v in head.headers if n == b"transfer-encoding"]
    if encodings:
        if len(encodings) > 1 or encodings[0].lower() != b"chunked":
            raise h11.RemoteProtocolError("Only Transfer-Encoding: chunked is supported")
        return ("chunked", 0)
    lengths = {
        part.strip() for n, v in head.headers if n == b"content-length" for part in v.split(b",")
    }
    if lengths:
        if len(lengths) != 1:
            raise h11.RemoteProtocolError("Conflicting Content-Length headers")
        (length,) = lengths
        if not _DIGITS.fullmatch(length) or len(length) > _MAX_LENGTH_DIGITS:
            raise h11.RemoteProtocolError("Bad Content-Length")
        return ("length", int(length))
    return ("close", 0)


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
                if b":" not in line or _BAD_VALUE.search(line):
                    raise h11.RemoteProtocolError(f"Malformed trailer line {line[:100]!r}")
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
