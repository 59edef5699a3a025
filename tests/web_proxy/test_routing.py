"""Unit tests of the pure routing and rewriting logic of the web proxy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_gateway_web_proxy.routing import (
    Router,
    Target,
    connection_tokens,
    is_upgrade_request,
    join_path,
    merge_query,
    origin_form,
    parse_target,
    rewrite_request_headers,
    rewrite_response_headers,
    upstream_target,
)

ROUTES = [
    ("/", "http://api:8000"),
    ("/clusters/ab", "http://dash-ab:8787"),
    ("/clusters/abc", "http://dash-abc:8787"),
    ("/clusters/deep/er", "http://deeper:1"),
]


def hit(router: Router, path: str) -> tuple[str, str] | None:
    m = router.match(path)
    return None if m is None else (m[0].path, m[1])


def test_longest_segment_prefix_wins() -> None:
    r = Router(ROUTES)
    assert hit(r, "/clusters/abc/status") == ("/clusters/abc", "/status")
    assert hit(r, "/clusters/ab/status") == ("/clusters/ab", "/status")
    assert hit(r, "/clusters/deep/er/x/y") == ("/clusters/deep/er", "/x/y")
    # /clusters/deep alone has no route: falls back to the root route
    assert hit(r, "/clusters/deep/x") == ("/", "/clusters/deep/x")


def test_segment_boundaries() -> None:
    r = Router([("/clusters/ab", "http://a:1")])
    assert r.match("/clusters/abc") is None
    assert r.match("/clusters/abc/status") is None
    assert r.match("/clusters/a") is None
    assert r.match("/clusters") is None
    assert hit(r, "/clusters/ab") == ("/clusters/ab", "")


def test_trailing_slashes_ignored_when_matching() -> None:
    r = Router([("/clusters/ab/", "http://a:1")])
    assert hit(r, "/clusters/ab") == ("/clusters/ab/", "")
    assert hit(r, "/clusters/ab/") == ("/clusters/ab/", "/")
    assert hit(r, "/clusters/ab//status") == ("/clusters/ab/", "//status")
    r2 = Router([("/clusters/ab", "http://a:1")])
    assert hit(r2, "/clusters/ab/") == ("/clusters/ab", "/")


def test_root_route_matches_everything() -> None:
    r = Router([("/", "http://api:8000")])
    assert hit(r, "/") == ("/", "/")
    assert hit(r, "/api/v1/clusters/") == ("/", "/api/v1/clusters/")
    assert hit(r, "") == ("/", "")


def test_no_root_no_match() -> None:
    r = Router([("/prefix/", "http://api:8000")])
    assert r.match("/") is None
    assert r.match("/other") is None
    assert hit(r, "/prefix/api/v1/clusters/") == ("/prefix/", "/api/v1/clusters/")


def test_empty_router() -> None:
    assert Router().match("/anything") is None
    assert len(Router()) == 0


def test_bad_routes_rejected_not_fatal() -> None:
    r = Router(
        [
            ("/a", "tls://h:1"),
            ("/b", "http://"),
            ("c", "http://h:1"),
            ("/d", "http://h:notaport"),
            ("/ok", "http://h:1"),
        ]
    )
    assert [p for p, _ in r.rejected] == ["/a", "/b", "c", "/d"]
    assert all(reason for _, reason in r.rejected)
    assert len(r) == 1
    assert hit(r, "/ok/x") == ("/ok", "/x")


def test_from_routes_uses_path_routes_only() -> None:
    routes = [
        SimpleNamespace(kind="SNI", key="abc", target="tls://h:8786"),
        SimpleNamespace(kind="PATH", key="/clusters/abc", target="http://h:8787"),
        SimpleNamespace(kind="PATH", key="/gone", target=None),
    ]
    r = Router.from_routes(routes)
    assert len(r) == 1
    assert hit(r, "/clusters/abc/status") == ("/clusters/abc", "/status")
    assert r.match("/gone") is None


def test_parse_target() -> None:
    assert parse_target("http://h:8787") == Target("http", "h", 8787, "", "")
    assert parse_target("https://h/base/?x=1") == Target("https", "h", 443, "/base/", "x=1")
    assert parse_target("HTTP://[::1]:9") == Target("http", "::1", 9, "", "")
    assert parse_target("http://[::1]:9").authority == "[::1]:9"
    assert parse_target("http://h").authority == "h:80"
    for bad in ["", "h:1", "tls://h:1", "http://u:p@h:1", "http://h:99999"]:
        with pytest.raises(ValueError):
            parse_target(bad)


def test_join_path_single_slash() -> None:
    assert join_path("", "/status") == "/status"
    assert join_path("", "") == "/"
    assert join_path("/base", "") == "/base"
    assert join_path("/base/", "/status") == "/base/status"
    assert join_path("/base", "/status") == "/base/status"
    assert join_path("/base//", "//status") == "/base/status"
    assert join_path("/base", "/") == "/base/"
    assert join_path("", "/a/b/") == "/a/b/"


def test_query_merge() -> None:
    assert merge_query("", "") == ""
    assert merge_query("a=1", "") == "a=1"
    assert merge_query("", "b=2") == "b=2"
    assert merge_query("a=1", "b=2") == "a=1&b=2"


def test_upstream_target() -> None:
    t = parse_target("http://h:1/base?tq=1")
    assert upstream_target(t, "/status", "x=2") == "/base/status?tq=1&x=2"
    assert upstream_target(parse_target("http://h:1"), "", "") == "/"
    assert upstream_target(parse_target("http://h:1"), "/api/v1/clusters/", "wait") == (
        "/api/v1/clusters/?wait"
    )


def test_end_to_end_rewrite_dashboard() -> None:
    r = Router([("/clusters/abc", "http://10.0.0.5:8787"), ("/", "http://api:8000")])
    route, rem = r.match("/clusters/abc/status")  # type: ignore[misc]
    assert upstream_target(route.target, rem, "") == "/status"
    route, rem = r.match("/clusters/abc")  # type: ignore[misc]
    assert upstream_target(route.target, rem, "") == "/"


def test_origin_form() -> None:
    assert origin_form("/a/b?x=1") == ("/a/b", "x=1")
    assert origin_form("/a/b") == ("/a/b", "")
    assert origin_form("http://host:1/a?x") == ("/a", "x")
    assert origin_form("http://host:1") == ("/", "")
    assert origin_form("http://host:1?q=1") == ("/", "q=1")
    assert origin_form("*") is None
    assert origin_form("host:443") is None


def test_request_header_rewrite() -> None:
    headers = [
        ("Host", "public.example:8000"),
        ("User-Agent", "ua/1"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("Keep-Alive", "timeout=5"),
        ("X-Secret-Hop", "1"),
        ("Proxy-Authorization", "Basic xx"),
        ("TE", "trailers"),
        ("Trailer", "X-T"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("X-Forwarded-For", "1.2.3.4"),
        ("X-Forwarded-Host", "spoofed"),
        ("Accept", "text/html"),
        ("Cookie", "a=1"),
    ]
    out = rewrite_request_headers(
        headers, authority="10.0.0.5:8787", client_ip="127.0.0.9", proto="https"
    )
    assert out[0] == ("Host", "10.0.0.5:8787")
    names = [k.lower() for k, _ in out]
    for gone in [
        "connection",
        "keep-alive",
        "x-secret-hop",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]:
        assert gone not in names
    d = {k.lower(): v for k, v in out}
    assert names.count("host") == 1
    assert d["user-agent"] == "ua/1"
    assert d["x-forwarded-for"] == "1.2.3.4, 127.0.0.9"
    assert d["x-forwarded-proto"] == "https"
    assert d["x-forwarded-host"] == "public.example:8000"
    assert d["accept"] == "text/html"
    assert d["cookie"] == "a=1"


def test_content_length_dropped_when_transfer_encoding_frames_the_message() -> None:
    headers = [("Transfer-Encoding", "chunked"), ("Content-Length", "5"), ("X-A", "1")]
    out = rewrite_request_headers(headers, authority="h:1", client_ip=None, proto="http")
    assert [k for k, _ in out] == ["Host", "X-A", "X-Forwarded-Proto"]
    assert rewrite_response_headers(headers) == [("X-A", "1")]
    kept = rewrite_request_headers(
        [("Content-Length", "5")], authority="h:1", client_ip=None, proto="http"
    )
    assert ("Content-Length", "5") in kept


def test_request_header_rewrite_multiple_xff_and_no_client() -> None:
    headers = [("X-Forwarded-For", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2, 3.3.3.3")]
    out = dict(rewrite_request_headers(headers, authority="h:1", client_ip=None, proto="http"))
    assert out["X-Forwarded-For"] == "1.1.1.1, 2.2.2.2, 3.3.3.3"
    assert "X-Forwarded-Host" not in out
    out = dict(rewrite_request_headers([], authority="h:1", client_ip="::1", proto="http"))
    assert out["X-Forwarded-For"] == "::1"
    assert "User-Agent" not in out


def test_websocket_upgrade_headers_kept() -> None:
    headers = [
        ("Host", "p:1"),
        ("Connection", "keep-alive, Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "k"),
        ("Sec-WebSocket-Version", "13"),
    ]
    assert is_upgrade_request(headers)
    out = rewrite_request_headers(
        headers, authority="h:2", client_ip="127.0.0.1", proto="http", upgrade=True
    )
    d = {k.lower(): v for k, v in out}
    assert d["connection"] == "Upgrade"
    assert d["upgrade"] == "websocket"
    assert d["sec-websocket-key"] == "k"
    assert [k.lower() for k, _ in out].count("connection") == 1


def test_is_upgrade_request() -> None:
    assert not is_upgrade_request([("Upgrade", "websocket")])
    assert not is_upgrade_request([("Connection", "upgrade")])
    assert not is_upgrade_request([("Connection", "upgrade"), ("Upgrade", " ")])
    assert is_upgrade_request([("connection", "UPGRADE"), ("upgrade", "websocket")])


def test_connection_tokens() -> None:
    assert connection_tokens([("Connection", "a, B ,,"), ("connection", "c")]) == {"a", "b", "c"}


def test_response_header_rewrite() -> None:
    headers = [
        ("Content-Type", "text/html"),
        ("Content-Length", "12"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
    out = rewrite_response_headers(headers)
    assert out == [
        ("Content-Type", "text/html"),
        ("Content-Length", "12"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]
    up = rewrite_response_headers(
        [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Accept", "x")],
        upgrade=True,
    )
    assert sorted(up) == [
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", "x"),
        ("Upgrade", "websocket"),
    ]


segment = st.text(alphabet="abc", min_size=1, max_size=3)


@given(
    st.lists(st.lists(segment, min_size=0, max_size=3), max_size=6),
    st.lists(segment, max_size=5),
    st.booleans(),
)
def test_match_is_longest_segment_prefix(
    route_segs: list[list[str]], req_segs: list[str], trailing: bool
) -> None:
    routes = ["/" + "/".join(s) for s in route_segs]
    r = Router((p, "http://h:1") for p in routes)
    path = "/" + "/".join(req_segs) + ("/" if trailing and req_segs else "")
    expected = None
    for segs in route_segs:
        if req_segs[: len(segs)] == segs and (expected is None or len(segs) > len(expected)):
            expected = segs
    m = r.match(path)
    if expected is None:
        assert m is None
    else:
        assert m is not None
        route, rem = m
        assert [s for s in route.path.split("/") if s] == expected
        # prefix + remainder always reassembles the request path
        assert [s for s in rem.split("/") if s] == req_segs[len(expected) :]
        assert rem == "" or rem.startswith("/")
