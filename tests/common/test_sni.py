"""Tests for the sans-IO ClientHello parser (dask_gateway_common.sni)."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dask_gateway_common.sni import (
    DEFAULT_MAX_HELLO_BYTES,
    HELLO_ERROR_REASONS,
    INTERNAL_ERROR,
    NOT_TLS,
    UNRECOGNIZED_NAME,
    ClientHello,
    ClientHelloError,
    NeedData,
    NotTLS,
    parse_client_hello,
    tls_alert,
)

# ---- helpers: real hellos from the stdlib, synthetic ones built by hand --------------------


def real_hello(server_hostname: str | None, max_version: ssl.TLSVersion) -> bytes:
    """The first flight of a stdlib TLS client (no network: MemoryBIO)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ext(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + u16(len(data)) + data


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(u8(name_type) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(entries)) + entries)


def hello_msg(
    *exts: bytes,
    version: bytes = b"\x03\x03",
    session_id: bytes = bytes(32),
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    ext_block: bytes | None = None,
    handshake_type: int = 1,
) -> bytes:
    """A handshake message holding a ClientHello with the given extensions."""
    if ext_block is None:
        joined = b"".join(exts)
        ext_block = u16(len(joined)) + joined if exts else b""
    body = (
        version
        + bytes(range(32))
        + u8(len(session_id))
        + session_id
        + u16(len(suites))
        + suites
        + u8(len(compression))
        + compression
        + ext_block
    )
    return u8(handshake_type) + len(body).to_bytes(3, "big") + body


def records(payload: bytes, size: int = 16384, version: bytes = b"\x03\x01") -> bytes:
    """Wrap handshake bytes into handshake records of at most ``size`` payload bytes."""
    out = bytearray()
    for i in range(0, len(payload), size):
        chunk = payload[i : i + size]
        out += b"\x16" + version + u16(len(chunk)) + chunk
    return bytes(out)


def handshake_bytes(wire: bytes) -> bytes:
    """Concatenated payloads of the handshake records in ``wire``."""
    out, pos = bytearray(), 0
    while pos < len(wire):
        assert wire[pos] == 22
        length = int.from_bytes(wire[pos + 3 : pos + 5], "big")
        out += wire[pos + 5 : pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def refragment(wire: bytes, sizes: list[int]) -> bytes:
    """Re-split the handshake payload of ``wire`` into records of the given sizes (cycled)."""
    payload = handshake_bytes(wire)
    out, pos, i = bytearray(), 0, 0
    while pos < len(payload):
        chunk = payload[pos : pos + sizes[i % len(sizes)]]
        out += b"\x16\x03\x01" + u16(len(chunk)) + chunk
        pos += len(chunk)
        i += 1
    return bytes(out)


def feed(wire: bytes, splits: list[int], max_bytes: int = DEFAULT_MAX_HELLO_BYTES) -> object:
    """Feed ``wire`` in pieces, as a proxy would; return the first non-NeedData answer."""
    buf = bytearray()
    cuts = sorted({c for c in splits if 0 < c < len(wire)}) + [len(wire)]
    start = 0
    for cut in cuts:
        buf += wire[start:cut]
        start = cut
        try:
            result = parse_client_hello(buf, max_bytes)
        except ClientHelloError as exc:
            return ("error", exc.reason)
        if not isinstance(result, NeedData):
            return result
    return result


def outcome(wire: bytes, max_bytes: int = DEFAULT_MAX_HELLO_BYTES) -> object:
    try:
        return parse_client_hello(wire, max_bytes)
    except ClientHelloError as exc:
        return ("error", exc.reason)


VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
REAL = {
    (v.name, name): real_hello(name, v)
    for v in VERSIONS
    for name in ("daskgateway-abc123", "DaskGateway-Team.0f3A", None)
}


# ---- real hellos ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(REAL, key=str), ids=str)
def test_real_hello_whole_and_byte_by_byte(key: tuple[str, str | None]) -> None:
    wire = REAL[key]
    name = key[1]
    expected = ClientHello(sni=name.lower() if name else None, hello_bytes=len(wire))
    assert parse_client_hello(wire) == expected
    for i in range(len(wire)):
        result = parse_client_hello(wire[:i])
        assert isinstance(result, NeedData), i
        assert result.at_least > i
    # byte by byte into a growing bytearray, the way a proxy accumulates reads
    buf = bytearray()
    for b in wire[:-1]:
        buf.append(b)
        assert isinstance(parse_client_hello(buf), NeedData)
    buf.append(wire[-1])
    assert parse_client_hello(buf) == expected
    assert parse_client_hello(memoryview(buf)) == expected


def test_trailing_bytes_after_hello_are_ignored() -> None:
    wire = REAL[("TLSv1_3", "daskgateway-abc123")]
    result = parse_client_hello(wire + b"\x17\x03\x03\x00\x05hello")
    assert result == ClientHello(sni="daskgateway-abc123", hello_bytes=len(wire))


@pytest.mark.parametrize("sizes", [[1], [2, 3], [7], [100, 1, 50], [4], [3, 1]])
@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_real_hello_fragmented_over_records(sizes: list[int], version: str) -> None:
    wire = refragment(REAL[(version, "daskgateway-abc123")], sizes)
    expected = ClientHello(sni="daskgateway-abc123", hello_bytes=len(wire))
    assert parse_client_hello(wire) == expected
    assert feed(wire, list(range(len(wire)))) == expected
    for i in range(len(wire)):
        assert isinstance(parse_client_hello(wire[:i]), NeedData)


def test_record_versions_accepted() -> None:
    msg = hello_msg(sni_ext(b"daskgateway-x"))
    for minor in range(5):
        wire = records(msg, version=bytes((3, minor)))
        assert parse_client_hello(wire) == ClientHello("daskgateway-x", len(wire))
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(records(msg, version=b"\x03\x05"))
    assert info.value.reason == "bad_record_version"


def test_hello_without_extensions_has_no_sni() -> None:
    wire = records(hello_msg(version=b"\x03\x00"))
    assert parse_client_hello(wire) == ClientHello(sni=None, hello_bytes=len(wire))


def test_other_name_types_are_skipped() -> None:
    entries = u8(7) + u16(3) + b"abc" + u8(0) + u16(5) + b"HOST1"
    wire = records(hello_msg(ext(0, u16(len(entries)) + entries)))
    assert parse_client_hello(wire) == ClientHello(sni="host1", hello_bytes=len(wire))


# ---- large hellos --------------------------------------------------------------------------


def big_hello(key_share_bytes: int, suites: int = 2, sni: bytes = b"daskgateway-pq") -> bytes:
    """A hello with a huge fake key_share, like a post-quantum hybrid (X25519MLKEM768+)."""
    share = u16(0x11EC) + u16(key_share_bytes) + bytes(key_share_bytes)
    return hello_msg(
        ext(10, u16(2) + u16(0x11EC)),  # supported_groups
        ext(51, u16(len(share)) + share),  # key_share
        sni_ext(sni),
        ext(43, u8(2) + b"\x03\x04"),  # supported_versions
        suites=b"\x13\x01" * suites,
    )


def test_large_post_quantum_hello_spanning_records() -> None:
    msg = big_hello(40_000)
    wire = records(msg)
    assert len(wire) > 2 * 16384  # three records
    expected = ClientHello(sni="daskgateway-pq", hello_bytes=len(wire))
    assert parse_client_hello(wire) == expected
    assert feed(wire, list(range(0, len(wire), 1000))) == expected
    # the same hello, re-split into records of odd sizes
    odd = refragment(wire, [16384, 3, 9000])
    assert parse_client_hello(odd) == ClientHello("daskgateway-pq", len(odd))


def test_hello_larger_than_cap_is_rejected_early() -> None:
    # The extensions block is capped at 64 KiB by its length field; a long cipher-suite list
    # pushes the hello past the cap.
    wire = records(big_hello(40_000, suites=15_000))
    assert len(wire) > DEFAULT_MAX_HELLO_BYTES
    # The handshake header (in the first record) already says it cannot fit:
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(wire[: 5 + 16384])
    assert info.value.reason == "too_large"
    assert outcome(wire) == ("error", "too_large")
    # ... and before that we only ask for more data.
    assert isinstance(parse_client_hello(wire[:8]), NeedData)


def test_cap_is_exact_and_bytes_past_it_are_never_read() -> None:
    wire = REAL[("TLSv1_3", "daskgateway-abc123")]
    assert outcome(wire, max_bytes=len(wire)) == ClientHello("daskgateway-abc123", len(wire))
    assert outcome(wire, max_bytes=len(wire) - 1) == ("error", "too_large")
    # a fragmented hello whose next record header would cross the cap
    frag = refragment(wire, [200])
    assert outcome(frag, max_bytes=len(frag) - 1) == ("error", "too_large")
    assert outcome(frag[:203], max_bytes=204) == ("error", "too_large")
    # garbage after the cap does not matter
    junk = bytes(100_000)
    assert outcome(wire + junk, max_bytes=len(wire)) == outcome(wire, max_bytes=len(wire))


# ---- not TLS and malformed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n", b"\x80\x2e\x01\x00\x02", b"\x16\x01", b"\x16\x00\x00", b"P"],
)
def test_not_tls(data: bytes) -> None:
    assert parse_client_hello(data) is NOT_TLS
    assert isinstance(parse_client_hello(data), NotTLS)


def test_empty_buffer_needs_data() -> None:
    assert parse_client_hello(b"") == NeedData()
    assert parse_client_hello(b"\x16") == NeedData()


GOOD = hello_msg(sni_ext(b"a"))
MALFORMED = {
    "bad_record_version": records(GOOD, version=b"\x03\x07"),
    "record_too_large": b"\x16\x03\x01\x40\x01" + bytes(16385),
    "empty_record": b"\x16\x03\x01\x00\x00",
    "unexpected_record_type": records(GOOD[:10]) + b"\x15\x03\x03\x00\x02\x02\x28",
    "not_client_hello": records(b"\x02" + GOOD[1:]),
    "too_large": records(b"\x01\x10\x00\x00"),  # declares a 1 MiB hello
    "bad_version": records(hello_msg(version=b"\x02\x00")),
    "truncated_hello": records(b"\x01\x00\x00\x05" + bytes(5)),
    "bad_session_id": records(hello_msg(session_id=bytes(33))),
    "bad_cipher_suites": records(hello_msg(suites=b"\x13")),
    "bad_compression_methods": records(hello_msg(compression=b"")),
    "bad_extensions_length": records(hello_msg(ext_block=u16(11) + sni_ext(b"a"))),
    "truncated_extension": records(hello_msg(ext_block=u16(6) + u16(0) + u16(5) + b"ab")),
    "duplicate_extension": records(hello_msg(sni_ext(b"a"), sni_ext(b"b"))),
    "bad_server_name": records(hello_msg(sni_ext(b"a", b"b"))),
}


def test_malformed_cases_cover_every_reason() -> None:
    assert set(MALFORMED) == HELLO_ERROR_REASONS


@pytest.mark.parametrize("reason", sorted(MALFORMED))
def test_malformed(reason: str) -> None:
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(MALFORMED[reason])
    assert info.value.reason == reason
    assert str(info.value).startswith(reason)


@pytest.mark.parametrize(
    "server_name",
    [
        sni_ext(b"caf\xc3\xa9"),  # non-ASCII
        sni_ext(b"a b"),  # space
        sni_ext(b"evil\r\nlog"),  # log injection
        sni_ext(b"trailing.dot."),
        sni_ext(b""),
        sni_ext(b"x" * 256),
        ext(0, b""),  # empty extension (what a server sends back, not a client)
        ext(0, u16(0)),  # empty list
        ext(0, u16(4) + b"\x00\x00\x05a"),  # entry longer than the list
        ext(0, u16(2) + b"\x00\x00"),  # truncated entry header
        ext(0, u16(3) + b"\x00\x00\x01"),  # list length != extension length
    ],
)
def test_bad_server_names(server_name: bytes) -> None:
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(records(hello_msg(server_name)))
    assert info.value.reason == "bad_server_name"


def test_longest_host_name_is_accepted() -> None:
    name = b"a" * 255
    wire = records(hello_msg(sni_ext(name)))
    assert parse_client_hello(wire) == ClientHello(name.decode(), len(wire))


def test_partial_header_of_a_later_record_is_checked() -> None:
    first = records(GOOD[:10])
    assert outcome(first + b"\x17") == ("error", "unexpected_record_type")
    assert outcome(first + b"\x16\x02") == ("error", "bad_record_version")
    assert isinstance(parse_client_hello(first + b"\x16\x03"), NeedData)


# ---- property tests -------------------------------------------------------------------------

SAMPLES = [REAL[k] for k in sorted(REAL, key=str)] + [
    refragment(REAL[("TLSv1_3", "daskgateway-abc123")], [5, 60]),
    records(big_hello(20_000)),
]
PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_every_truncation_needs_data() -> None:
    for wire in SAMPLES:
        step = 1 if len(wire) < 5000 else 97
        for i in range(0, len(wire), step):
            assert isinstance(parse_client_hello(wire[:i]), NeedData), (len(wire), i)


@PROPERTY_SETTINGS
@given(
    index=st.integers(0, len(SAMPLES) - 1),
    splits=st.lists(st.integers(0, 70_000), max_size=30),
)
def test_any_split_gives_the_same_result(index: int, splits: list[int]) -> None:
    wire = SAMPLES[index]
    assert feed(wire, splits) == outcome(wire)


@PROPERTY_SETTINGS
@given(
    index=st.integers(0, len(SAMPLES) - 1),
    edits=st.lists(st.tuples(st.integers(0, 70_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, 70_000),
    splits=st.lists(st.integers(0, 70_000), max_size=10),
)
def test_mutations_only_raise_client_hello_error(
    index: int, edits: list[tuple[int, int]], cut: int, splits: list[int]
) -> None:
    wire = bytearray(SAMPLES[index])
    for pos, value in edits:
        wire[pos % len(wire)] = value
    wire = wire[: max(cut, 5)] if cut < len(wire) else wire
    result = outcome(bytes(wire))  # anything other than ClientHelloError propagates
    if isinstance(result, tuple):
        assert result[1] in HELLO_ERROR_REASONS
    # incremental feeding agrees with one-shot parsing
    assert feed(bytes(wire), splits) == result


@PROPERTY_SETTINGS
@given(data=st.binary(max_size=2000), tls_header=st.booleans(), max_bytes=st.integers(1, 3000))
def test_arbitrary_bytes_only_raise_client_hello_error(
    data: bytes, tls_header: bool, max_bytes: int
) -> None:
    if tls_header:  # get past the first-byte check to exercise the deeper layers
        data = b"\x16\x03\x01" + u16(min(len(data), 16384)) + b"\x01" + data
    result = outcome(data, max_bytes)
    assert isinstance(result, NeedData | NotTLS | ClientHello) or result[1] in HELLO_ERROR_REASONS


@PROPERTY_SETTINGS
@given(
    exts=st.lists(st.tuples(st.integers(0, 65535), st.binary(max_size=300)), max_size=6),
    sni=st.one_of(st.none(), st.from_regex(r"[a-z0-9][a-z0-9.\-]{0,60}[a-z0-9]", fullmatch=True)),
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=4),
)
def test_synthetic_hellos_round_trip(
    exts: list[tuple[int, bytes]], sni: str | None, sizes: list[int]
) -> None:
    blocks, seen = [], set()
    for t, d in exts:
        if t != 0 and t not in seen:
            seen.add(t)
            blocks.append(ext(t, d))
    if sni is not None:
        blocks.insert(len(blocks) // 2, sni_ext(sni.encode()))
    wire = refragment(records(hello_msg(*blocks)), sizes)
    expected = ClientHello(sni=sni, hello_bytes=len(wire))
    assert parse_client_hello(wire) == expected
    assert feed(wire, list(range(0, len(wire), 13))) == expected


# ---- alerts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "ssl_reason"),
    [(UNRECOGNIZED_NAME, "UNRECOGNIZED_NAME"), (INTERNAL_ERROR, "INTERNAL_ERROR")],
)
def test_tls_alert_is_understood_by_a_real_client(description: int, ssl_reason: str) -> None:
    alert = tls_alert(description)
    assert alert == bytes((21, 3, 3, 0, 2, 2, description))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="daskgateway-nope")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    incoming.write(alert)
    with pytest.raises(ssl.SSLError) as info:
        obj.do_handshake()
    assert ssl_reason in str(info.value.reason)


def test_tls_alert_range() -> None:
    with pytest.raises(ValueError):
        tls_alert(256)
    with pytest.raises(ValueError):
        tls_alert(-1)
