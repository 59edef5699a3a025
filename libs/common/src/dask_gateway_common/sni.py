"""Sans-IO parser for the TLS ClientHello: find the SNI without touching a socket.

Theory of operation
-------------------
The caller accumulates what it has read from the client and calls
``parse_client_hello(buf)`` after every read. The parser keeps no state between calls: each
call walks the buffer from the start and answers one of

* ``NeedData``: the buffer is a valid prefix of a ClientHello; read more and call again.
  ``NeedData.at_least`` is the buffer length below which the answer cannot change, so a
  caller may skip calls until it has that many bytes (optional: calling early is correct,
  just wasted work).
* ``NotTLS``: the first bytes are not a TLS handshake record (e.g. plain HTTP, or an SSLv2
  style hello). Decided from the first byte, or the second one (TLS record versions all
  start with 0x03).
* ``ClientHello``: the whole hello is in the buffer. ``sni`` is the ``host_name`` entry of
  the server_name extension (ASCII, lowercased) or None; ``hello_bytes`` is the number of
  bytes up to the end of the TLS record that holds the last byte of the hello.

and raises ``ClientHelloError(reason)`` for anything malformed, ``reason`` being a short
label (see ``HELLO_ERROR_REASONS``) suitable for a Prometheus label.

Each call is cheap until the hello is complete: only the 5-byte record headers (and the
4-byte handshake header) are examined; the hello body is parsed once, when all of it is
there. The walk has four layers:

1. Record layer. Records are ``type(1) version(2) length(2) payload``. Every record must
   be a handshake record (type 22) with a record version 0x0300-0x0304 and a length of
   1..2**14 (RFC 8446 §5.1 forbids empty handshake fragments and caps plaintext records at
   16 KiB). 0x0300 (SSL 3.0) is accepted on purpose: RFC 5246 Appendix E says clients may
   put it in the record header of their first hello, the record version carries no meaning
   for routing, and the proxy never terminates TLS, so the scheduler still decides what it
   accepts.
2. Handshake reassembly. A handshake message may be fragmented over any number of
   records (post-quantum key shares make hellos larger than one 16 KiB record), so the
   payloads of consecutive records are concatenated until ``4 + length`` handshake bytes
   are there. The first message must be a ClientHello (type 1).
3. ClientHello fields: legacy_version, random, session_id (≤ 32 bytes), cipher_suites
   (even, non-empty), compression_methods (non-empty), then optional extensions, which must
   fill the rest of the message exactly.
4. Extensions: ``type(2) length(2) data``, each type at most once. server_name (type 0)
   holds a list of ``name_type(1) length(2) name``; at most one ``host_name`` (type 0)
   entry, which must be a non-empty DNS-style name of at most 255 bytes from
   ``[A-Za-z0-9._-]`` without a trailing dot (RFC 6066 §3). The character set is strict on
   purpose: the name is used as a routing key and appears in logs.

The parser never looks past ``max_bytes`` of the buffer: a hello that would need more
(known as soon as a record or handshake header says so) is ``ClientHelloError("too_large")``.

``tls_alert(description)`` builds the fatal alert record a server sends before closing,
e.g. ``tls_alert(UNRECOGNIZED_NAME)`` for an unknown SNI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "DEFAULT_MAX_HELLO_BYTES",
    "HELLO_ERROR_REASONS",
    "INTERNAL_ERROR",
    "NOT_TLS",
    "UNRECOGNIZED_NAME",
    "ClientHello",
    "ClientHelloError",
    "NeedData",
    "NotTLS",
    "ParseResult",
    "parse_client_hello",
    "tls_alert",
]

DEFAULT_MAX_HELLO_BYTES: Final = 65536

# TLS constants (RFC 8446 §5.1, §4, §6; RFC 6066 §3).
_CONTENT_HANDSHAKE: Final = 22
_CONTENT_ALERT: Final = 21
_HANDSHAKE_CLIENT_HELLO: Final = 1
_EXT_SERVER_NAME: Final = 0
_NAME_TYPE_HOST_NAME: Final = 0
_RECORD_HEADER: Final = 5
_HANDSHAKE_HEADER: Final = 4
_MAX_RECORD_PAYLOAD: Final = 1 << 14
_MAX_HOST_NAME: Final = 255

# Alert descriptions the proxies send (RFC 8446 §6).
UNRECOGNIZED_NAME: Final = 112
INTERNAL_ERROR: Final = 80

HELLO_ERROR_REASONS: Final = frozenset(
    {
        "bad_record_version",  # record version outside 0x0300-0x0304
        "record_too_large",  # record length > 2**14
        "empty_record",  # zero-length handshake record
        "unexpected_record_type",  # a non-handshake record before the hello is complete
        "not_client_hello",  # the first handshake message is not a ClientHello
        "too_large",  # the hello would need more than max_bytes
        "bad_version",  # ClientHello.legacy_version is not 0x03xx
        "truncated_hello",  # a fixed field runs past the end of the message
        "bad_session_id",
        "bad_cipher_suites",
        "bad_compression_methods",
        "bad_extensions_length",  # extensions block does not fill the message exactly
        "truncated_extension",
        "duplicate_extension",
        "bad_server_name",
    }
)

_HOST_NAME_BYTES: Final = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_"
)


class ClientHelloError(ValueError):
    """A malformed (or oversized) ClientHello. ``reason`` is a short, fixed label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass(frozen=True, slots=True)
class NeedData:
    """The buffer is an incomplete ClientHello; call again with more bytes.

    ``at_least`` is a hint (not part of equality): the answer cannot change before the
    buffer holds that many bytes.
    """

    at_least: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class NotTLS:
    """The buffer does not start with a TLS handshake record."""


NOT_TLS: Final = NotTLS()


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A complete ClientHello."""

    sni: str | None
    hello_bytes: int


ParseResult = NeedData | NotTLS | ClientHello


def parse_client_hello(
    buf: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_HELLO_BYTES
) -> ParseResult:
    """Parse the ClientHello at the start of ``buf`` (see the module docstring)."""
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    view = view[:max_bytes]
    size = len(view)
    if size == 0:
        return NeedData(1)
    if view[0] != _CONTENT_HANDSHAKE:
        return NOT_TLS
    if size >= 2 and view[1] != 3:
        return NOT_TLS

    pos = 0  # start of the next record header
    payloads: list[memoryview] = []
    have = 0  # handshake bytes gathered so far
    need = -1  # 4 + hello length, once the handshake header is known
    while need < 0 or have < need:
        if need >= 0:
            _check_fits(pos, need - have, max_bytes)
        header_end = pos + _RECORD_HEADER
        if header_end > size:
            if header_end > max_bytes:
                raise ClientHelloError("too_large", f"record header past {max_bytes} bytes")
            # A later record's partial header: reject what is already wrong, in the same
            # order as the full-header checks below.
            if pos < size and view[pos] != _CONTENT_HANDSHAKE:
                raise ClientHelloError("unexpected_record_type", f"type {view[pos]}")
            if pos + 1 < size and view[pos + 1] != 3:
                raise ClientHelloError("bad_record_version", f"0x{view[pos + 1]:02x}..")
            return NeedData(header_end)
        content_type = view[pos]
        major = view[pos + 1]
        minor = view[pos + 2]
        length = (view[pos + 3] << 8) | view[pos + 4]
        if content_type != _CONTENT_HANDSHAKE:
            raise ClientHelloError("unexpected_record_type", f"type {content_type}")
        if major != 3 or minor > 4:
            raise ClientHelloError("bad_record_version", f"0x{major:02x}{minor:02x}")
        if length > _MAX_RECORD_PAYLOAD:
            raise ClientHelloError("record_too_large", f"{length} bytes")
        if length == 0:
            raise ClientHelloError("empty_record")
        end = header_end + length
        if end > max_bytes:
            raise ClientHelloError("too_large", f"record ends past {max_bytes} bytes")
        if end > size:
            return NeedData(end)
        payloads.append(view[header_end:end])
        have += length
        pos = end
        if need < 0 and have >= _HANDSHAKE_HEADER:
            header = _first_bytes(payloads, _HANDSHAKE_HEADER)
            if header[0] != _HANDSHAKE_CLIENT_HELLO:
                raise ClientHelloError("not_client_hello", f"handshake type {header[0]}")
            need = _HANDSHAKE_HEADER + int.from_bytes(header[1:4], "big")

    if len(payloads) == 1:
        message = payloads[0][_HANDSHAKE_HEADER:need]
    else:
        message = memoryview(b"".join(payloads))[_HANDSHAKE_HEADER:need]
    return ClientHello(sni=_parse_hello_body(message), hello_bytes=pos)


def tls_alert(description: int) -> bytes:
    """A fatal TLS alert record (level 2) with the given description (0-255)."""
    if not 0 <= description <= 255:
        raise ValueError(f"alert description out of range: {description}")
    return bytes((_CONTENT_ALERT, 3, 3, 0, 2, 2, description))


# ---- internals ---------------------------------------------------------------------------


def _check_fits(pos: int, missing: int, max_bytes: int) -> None:
    """Raise too_large if ``missing`` more handshake bytes cannot fit before max_bytes."""
    records = -(-missing // _MAX_RECORD_PAYLOAD)
    if pos + missing + records * _RECORD_HEADER > max_bytes:
        raise ClientHelloError("too_large", f"hello needs more than {max_bytes} bytes")


def _first_bytes(payloads: list[memoryview], n: int) -> bytes:
    out = bytearray()
    for chunk in payloads:
        out += chunk[: n - len(out)]
        if len(out) >= n:
            break
    return bytes(out)


def _parse_hello_body(msg: memoryview) -> str | None:
    """Walk the ClientHello fields; return the host_name or None."""
    end = len(msg)
    if end < 2 + 32 + 1:
        raise ClientHelloError("truncated_hello", "shorter than version + random")
    if msg[0] != 3:
        raise ClientHelloError("bad_version", f"0x{msg[0]:02x}{msg[1]:02x}")
    pos = 2 + 32
    session_len = msg[pos]
    if session_len > 32:
        raise ClientHelloError("bad_session_id", f"length {session_len}")
    pos += 1 + session_len
    if pos + 2 > end:
        raise ClientHelloError("truncated_hello", "cipher_suites length")
    suites_len = (msg[pos] << 8) | msg[pos + 1]
    if suites_len == 0 or suites_len % 2:
        raise ClientHelloError("bad_cipher_suites", f"length {suites_len}")
    pos += 2 + suites_len
    if pos + 1 > end:
        raise ClientHelloError("truncated_hello", "compression_methods")
    comp_len = msg[pos]
    if comp_len == 0:
        raise ClientHelloError("bad_compression_methods", "empty")
    pos += 1 + comp_len
    if pos > end:
        raise ClientHelloError("truncated_hello", "compression_methods")
    if pos == end:
        return None  # no extensions (legal before TLS 1.3)
    if pos + 2 > end:
        raise ClientHelloError("bad_extensions_length", "one stray byte")
    ext_total = (msg[pos] << 8) | msg[pos + 1]
    pos += 2
    if pos + ext_total != end:
        raise ClientHelloError("bad_extensions_length", f"{ext_total} != {end - pos}")

    seen: set[int] = set()
    sni: str | None = None
    while pos < end:
        if pos + 4 > end:
            raise ClientHelloError("truncated_extension", "header")
        ext_type = (msg[pos] << 8) | msg[pos + 1]
        ext_len = (msg[pos + 2] << 8) | msg[pos + 3]
        pos += 4
        if pos + ext_len > end:
            raise ClientHelloError("truncated_extension", f"type {ext_type}")
        if ext_type in seen:
            raise ClientHelloError("duplicate_extension", f"type {ext_type}")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            sni = _parse_server_name(msg[pos : pos + ext_len])
        pos += ext_len
    return sni


def _parse_server_name(ext: memoryview) -> str | None:
    end = len(ext)
    if end < 2:
        raise ClientHelloError("bad_server_name", "empty extension")
    list_len = (ext[0] << 8) | ext[1]
    if list_len + 2 != end or list_len == 0:
        raise ClientHelloError("bad_server_name", "list length")
    pos = 2
    host: str | None = None
    while pos < end:
        if pos + 3 > end:
            raise ClientHelloError("bad_server_name", "truncated entry")
        name_type = ext[pos]
        name_len = (ext[pos + 1] << 8) | ext[pos + 2]
        pos += 3
        if pos + name_len > end:
            raise ClientHelloError("bad_server_name", "truncated name")
        if name_type == _NAME_TYPE_HOST_NAME:
            if host is not None:
                raise ClientHelloError("bad_server_name", "two host_name entries")
            host = _host_name(ext[pos : pos + name_len])
        pos += name_len
    return host


def _host_name(raw: memoryview) -> str:
    name = bytes(raw)
    if not name or len(name) > _MAX_HOST_NAME:
        raise ClientHelloError("bad_server_name", f"length {len(name)}")
    if not _HOST_NAME_BYTES.issuperset(name):
        raise ClientHelloError("bad_server_name", "invalid character")
    if name.endswith(b"."):
        raise ClientHelloError("bad_server_name", "trailing dot")
    return name.decode("ascii").lower()
