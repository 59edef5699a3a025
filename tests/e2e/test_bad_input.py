"""Bad input through the public web proxy: every request gets a clear JSON error with the
right status (never a 500) and the gateway's state is unchanged afterwards."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.harness import (
    START_TIMEOUT,
    GatewayUnderTest,
    basic,
    default_config,
    parse_response,
    running_gateway,
    send_oversized,
    time_limit,
    wait_status,
)

ALL_STATUSES = "pending,running,stopping,stopped,failed"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    with running_gateway(tmp_path_factory, "bad-input", default_config()) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def name(gw: GatewayUnderTest) -> Iterator[str]:
    """A RUNNING cluster of alice's (no workers)."""
    with gw.client("alice") as gateway, time_limit(START_TIMEOUT + 10, "cluster start"):
        cluster_name = gateway.submit()
        wait_status(gateway, cluster_name, "RUNNING", timeout=START_TIMEOUT)
    yield cluster_name
    with gw.client("alice") as gateway:
        gateway.stop_cluster(cluster_name)


def snapshot(gw: GatewayUnderTest) -> dict[str, Any]:
    """Every cluster of alice and bob, in every status (raw wire objects)."""
    state = {}
    for user in ("alice", "bob"):
        resp = gw.raw("GET", f"/api/v1/clusters/?status={ALL_STATUSES}", user=user)
        assert resp.status == 200, resp
        state[user] = resp.json()
    return state


@dataclass
class Case:
    id: str
    method: str
    path: str  # "{name}" is alice's cluster
    expect: int | tuple[int, ...]
    body: bytes | None = None
    auth: str | None = "alice"  # a user name (Basic, any password), or None
    message: str | None = None  # a substring of the error message
    authorization: str | None = None  # a raw Authorization header value instead of auth

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.authorization is not None:
            headers["Authorization"] = self.authorization
        elif self.auth is not None:
            headers["Authorization"] = basic(self.auth)
        if self.body is not None:
            headers["Content-Type"] = "application/json"
        return headers


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


CREATE = "/api/v1/clusters/"
CLUSTER = "/api/v1/clusters/{name}"
SCALE = "/api/v1/clusters/{name}/scale"
ADAPT = "/api/v1/clusters/{name}/adapt"
B64 = base64.b64encode

CASES = [
    # malformed JSON
    Case("create-malformed-json", "POST", CREATE, 400, b'{"cluster_options": ', message="JSON"),
    Case("create-not-utf8", "POST", CREATE, 400, b"\xff\xfe{}"),
    Case("scale-malformed-json", "POST", SCALE, 400, b"{count: 2}", message="JSON"),
    Case("adapt-malformed-json", "POST", ADAPT, 400, b"nope", message="JSON"),
    # wrong types
    Case("create-body-not-object", "POST", CREATE, (400, 422), js([1, 2])),
    Case(
        "create-options-not-dict",
        "POST",
        CREATE,
        422,
        js({"cluster_options": 5}),
        message="options must be a dict, got 'int'",
    ),
    Case(
        "create-option-wrong-type",
        "POST",
        CREATE,
        422,
        js({"cluster_options": {"worker_cores": "two"}}),
        message="worker_cores must be an integer, got 'two'",
    ),
    Case(
        "create-option-float-for-int",
        "POST",
        CREATE,
        422,
        js({"cluster_options": {"worker_cores": 1.5}}),
        message="worker_cores must be an integer",
    ),
    Case(
        "create-option-below-min",
        "POST",
        CREATE,
        422,
        js({"cluster_options": {"worker_cores": 0}}),
        message="worker_cores must be >= 1.000000, got 0",
    ),
    Case(
        "create-select-not-a-string",
        "POST",
        CREATE,
        422,
        js({"cluster_options": {"size": 3}}),
        message="size must be a string, got 3",
    ),
    Case(
        "create-select-not-an-option",
        "POST",
        CREATE,
        422,
        js({"cluster_options": {"size": "medium"}}),
        message="'medium' is not a valid option for size",
    ),
    Case("scale-count-string", "POST", SCALE, 422, js({"count": "2"}), message="non-negative"),
    Case("scale-count-negative", "POST", SCALE, 422, js({"count": -1}), message="non-negative"),
    Case("scale-count-missing", "POST", SCALE, 422, js({}), message="non-negative"),
    Case("scale-body-not-object", "POST", SCALE, (400, 422), js([2])),
    Case("adapt-minimum-string", "POST", ADAPT, 422, js({"minimum": "a", "maximum": None})),
    Case("adapt-maximum-negative", "POST", ADAPT, 422, js({"minimum": 0, "maximum": -1})),
    Case("adapt-active-string", "POST", ADAPT, 422, js({"active": "yes"})),
    Case("adapt-body-not-object", "POST", ADAPT, (400, 422), js("adapt")),
    # unknown fields
    Case(
        "create-unknown-fields",
        "POST",
        CREATE,
        422,
        js({"cluster_options": {"bogus": 1, "alpha": 2}}),
        message="Unknown fields ['alpha', 'bogus']",
    ),
    # bad Authorization headers
    Case("auth-missing", "GET", CREATE, 401, auth=None),
    Case("auth-no-space", "GET", CREATE, 401, authorization="Basic"),
    Case("auth-no-space-with-value", "GET", CREATE, 401, authorization="BasicYWxpY2U6"),
    Case("auth-unknown-scheme", "GET", CREATE, 401, authorization="Bearer abc.def"),
    Case("auth-token-scheme-on-user-endpoint", "GET", CREATE, 401, authorization="token abc"),
    Case("auth-bad-base64", "GET", CREATE, 401, authorization="Basic !!!not-base64!!!"),
    Case("auth-empty-user", "GET", CREATE, 401, authorization="Basic " + B64(b":pw").decode()),
    Case("auth-bad-create", "POST", CREATE, 401, js({}), authorization="Basic %%%"),
    Case("auth-bad-delete", "DELETE", CLUSTER, 401, authorization="Bearer x"),
    # unknown clusters
    Case("get-unknown", "GET", "/api/v1/clusters/nope", 404, message="Cluster nope not found"),
    Case("scale-unknown", "POST", "/api/v1/clusters/nope/scale", 404, js({"count": 1})),
    Case("adapt-unknown", "POST", "/api/v1/clusters/nope/adapt", 404, js({})),
    Case("delete-unknown", "DELETE", "/api/v1/clusters/nope", 204),
    Case("get-dotdot", "GET", "/api/v1/clusters/..", (400, 404)),
    Case("get-encoded-slash", "GET", "/api/v1/clusters/a%2Fb", (400, 404)),
    # other users' clusters
    Case(
        "other-user-get",
        "GET",
        CLUSTER,
        403,
        auth="bob",
        message="User bob lacks permissions to view cluster",
    ),
    Case(
        "other-user-delete",
        "DELETE",
        CLUSTER,
        403,
        auth="bob",
        message="User bob lacks permissions to stop cluster",
    ),
    Case("other-user-scale", "POST", SCALE, 403, js({"count": 3}), auth="bob"),
    Case("other-user-adapt", "POST", ADAPT, 403, js({}), auth="bob"),
    Case("user-auth-on-heartbeat", "POST", CLUSTER + "/heartbeat", 401, js({}), auth="alice"),
    # unknown endpoints and methods
    Case("unknown-endpoint", "GET", "/api/v1/nothing", 404),
    Case("wrong-method-list", "PUT", CREATE, 405, js({})),
    Case("wrong-method-scale", "GET", SCALE, 405),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(gw: GatewayUnderTest, name: str, case: Case) -> None:
    before = snapshot(gw)
    resp = gw.raw(case.method, case.path.format(name=name), headers=case.headers(), body=case.body)
    expected = case.expect if isinstance(case.expect, tuple) else (case.expect,)
    assert resp.status in expected, resp
    if resp.status == 204:
        assert resp.body == b"", resp
    else:
        message = resp.error()  # JSON, exactly {"error": <non-empty str>}
        if case.message is not None:
            assert case.message in message, resp
        if resp.status == 401:
            assert resp.header("WWW-Authenticate"), resp
    assert snapshot(gw) == before


@pytest.mark.parametrize("size", [1024 * 1024 + 65536, 8 * 1024 * 1024], ids=["1.06MiB", "8MiB"])
@pytest.mark.parametrize("endpoint", ["create", "scale"])
def test_bad_input_huge_body(gw: GatewayUnderTest, name: str, size: int, endpoint: str) -> None:
    before = snapshot(gw)
    host, port = gw.web_host_port
    path = CREATE if endpoint == "create" else SCALE.format(name=name)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: {basic('alice')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    resp = send_oversized(host, port, head, size, timeout=10)
    assert resp.status == 413, resp
    assert resp.error()
    assert snapshot(gw) == before


def test_bad_input_huge_headers(gw: GatewayUnderTest) -> None:
    resp = gw.raw("GET", "/api/v1/clusters/", user="alice", headers={"X-Big": "a" * 100_000})
    assert resp.status == 431, resp
    assert resp.error()


def test_bad_input_state_unchanged_for_the_client(gw: GatewayUnderTest, name: str) -> None:
    with gw.client("alice") as alice:
        [report] = alice.list_clusters()
        assert report.name == name
        assert report.status.name == "RUNNING"
        assert report.options == {"worker_cores": 1, "size": "small"}
    with gw.client("bob") as bob:
        assert bob.list_clusters(status=["running", "stopped", "failed", "pending"]) == []


FRAMING_CASES = {
    "garbage-request-line": b"GARBAGE\r\n\r\n",
    "missing-host": b"GET /api/version HTTP/1.1\r\n\r\n",
    "conflicting-content-length": (
        b"POST /api/v1/clusters/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Content-Length: 6\r\n\r\nhello!"
    ),
    "bad-chunk-size": (
        b"POST /api/v1/clusters/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YWxpY2U6\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    ),
    "header-without-colon": b"GET /api/version HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
}


@pytest.mark.parametrize("raw", FRAMING_CASES.values(), ids=FRAMING_CASES.keys())
def test_bad_http_framing(gw: GatewayUnderTest, name: str, raw: bytes) -> None:
    """Unparseable HTTP: 400 JSON, then the connection is closed (framing is lost)."""
    before = snapshot(gw)
    host, port = gw.web_host_port
    received = b""
    closed = False
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(raw)
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    closed = True
                    break
                received += data
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    resp = parse_response(received)
    assert resp.status == 400, resp
    assert resp.error()
    assert closed, f"connection left open after a framing error: {resp!r}"
    assert snapshot(gw) == before
