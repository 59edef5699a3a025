"""The HTTP API (E1–E11) end to end over loopback, with a fake backend and fake preload.

Checks exact status codes, messages, content types and cluster object keys, and that
bad input leaves the state unchanged.
"""

from __future__ import annotations

import json

import pytest
import trio

from dask_gateway_api.app import Endpoint, WireCache, match_route, normalize_prefix, wants_wait
from dask_gateway_api.manager import ManagerConfig
from dask_gateway_api.models import WIRE_KEYS, Cluster, ClusterStatus, to_wire
from dask_gateway_api.options import OptionsConfig, field_from_config
from dask_gateway_api.resources import ClusterConfig
from tests.api.api_harness import DEADLINE, PROXY_TOKEN, basic, open_api

CLUSTER_KEYS = {
    "name",
    "status",
    "dashboard_route",
    "start_time",
    "stop_time",
    "options",
    "tls_cert",
    "tls_key",
}


def test_match_route() -> None:
    assert match_route("/api/version") == (Endpoint.VERSION, None)
    assert match_route("/api/health") == (Endpoint.HEALTH, None)
    assert match_route("/api/v1/options") == (Endpoint.OPTIONS, None)
    assert match_route("/api/v1/clusters/") == (Endpoint.CLUSTERS, None)
    assert match_route("/api/v1/clusters") == (Endpoint.CLUSTERS, None)
    assert match_route("/api/v1/clusters/abc") == (Endpoint.CLUSTER, "abc")
    assert match_route("/api/v1/clusters/abc/scale") == (Endpoint.SCALE, "abc")
    assert match_route("/api/v1/clusters/abc/adapt") == (Endpoint.ADAPT, "abc")
    assert match_route("/api/v1/clusters/abc/heartbeat") == (Endpoint.HEARTBEAT, "abc")
    assert match_route("/api/v1/routes") == (Endpoint.ROUTES, None)
    for bad in (
        "/",
        "/api",
        "/api/v1/clusters/abc/",
        "/api/v1/clusters//scale",
        "/api/v1/clusters/abc/stop",
        "/api/v1/clusters/a/b/c",
        "/api/version/",
        "/clusters/abc/status",
    ):
        assert match_route(bad) is None, bad
    assert match_route("/svc/api/version", "/svc") == (Endpoint.VERSION, None)
    assert match_route("/api/version", "/svc") is None
    assert match_route("/svcx/api/version", "/svc") is None
    assert normalize_prefix("svc/") == "/svc" and normalize_prefix("/") == ""


def test_wants_wait() -> None:
    assert not wants_wait({})
    assert wants_wait({"wait": ""})
    assert wants_wait({"wait": "1"})
    assert not wants_wait({"wait": "0"})
    assert not wants_wait({"wait": "yes"})


async def test_version_and_health_need_no_auth() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            reply = await api.request("GET", "/api/version")
            assert reply.status == 200
            assert reply.header("Content-Type") == "application/json"
            assert isinstance(reply.json["version"], str)
            reply = await api.request("GET", "/api/health")
            assert (reply.status, reply.json) == (200, {"status": "pass"})


async def test_auth_handshake_and_cookie() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            reply = await api.request("GET", "/api/v1/clusters/")
            assert reply.status == 401
            assert reply.header("WWW-Authenticate") == "Basic"
            assert reply.header("Content-Type") == "application/json"
            assert reply.json == {"error": "Authentication required"}

            reply = await api.request("GET", "/api/v1/clusters/", user="alice")
            assert (reply.status, reply.json) == (200, {})
            (cookie,) = reply.headers_named("Set-Cookie")
            assert "; Max-Age=600; Path=/" in cookie and cookie.startswith("dask-gateway-")
            pair = cookie.split(";")[0]

            reply = await api.request("GET", "/api/v1/clusters/", headers=[("Cookie", pair)])
            assert (reply.status, reply.json) == (200, {})
            assert reply.headers_named("Set-Cookie") == []

            # Errors on the authenticator path add no cookie.
            reply = await api.request("GET", "/api/v1/clusters/nope", user="alice")
            assert reply.status == 404 and reply.headers_named("Set-Cookie") == []


@pytest.mark.parametrize(
    "value",
    ["Basic", "Basicabc", "Negotiate abc", "jupyterhub tok", "Basic %%%", "Basic YWxpY2U="],
)
async def test_malformed_authorization_is_401(value: str) -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            reply = await api.request(
                "GET", "/api/v1/clusters/", headers=[("Authorization", value)]
            )
            assert reply.status == 401
            assert reply.header("WWW-Authenticate") == "Basic"
            assert reply.json == {"error": "Authentication required"}


async def test_shared_password() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api(password="pw") as api:
            ok = await api.request("GET", "/api/v1/clusters/", headers=[basic("alice", "pw")])
            bad = await api.request("GET", "/api/v1/clusters/", headers=[basic("alice", "no")])
            assert ok.status == 200 and bad.status == 401


async def test_unknown_paths_and_methods() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            for path in ("/", "/nope", "/api/v1/clusters/x/y/z", "/clusters/zzz/status"):
                reply = await api.request("GET", path, user="alice")
                assert reply.status == 404, path
                assert reply.json == {"error": "Not Found"}
                assert reply.header("Content-Type") == "application/json"
            for method, path, allow in (
                ("PUT", "/api/v1/clusters/", "GET, POST"),
                ("POST", "/api/v1/clusters/abc", "GET, DELETE"),
                ("GET", "/api/v1/clusters/abc/scale", "POST"),
                ("DELETE", "/api/version", "GET"),
                ("POST", "/api/v1/routes", "GET"),
            ):
                reply = await api.request(method, path, user="alice")
                assert reply.status == 405, (method, path)
                assert reply.header("Allow") == allow
                assert reply.json == {"error": "Method Not Allowed"}


async def test_prefix() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api(prefix="/svc") as api:
            assert (await api.request("GET", "/svc/api/version")).status == 200
            assert (await api.request("GET", "/api/version")).status == 404
            name = await api.running_cluster()
            routes = {(r.kind, r.key): r.target for r in api.feed.table.routes()}
            assert routes[("PATH", "/svc/")] == api.base + "/svc"
            assert routes[("PATH", f"/svc/clusters/{name}")] == "http://127.0.0.1:40002"
            reply = await api.request("GET", f"/svc/api/v1/clusters/{name}", user="alice")
            assert reply.json["dashboard_route"] == f"/clusters/{name}/status"
            assert api.backend.launches[0].api_url == api.base + "/svc/api"


async def test_create_list_get_and_cluster_object_keys() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            reply = await api.request("POST", "/api/v1/clusters/", user="alice", body={})
            assert reply.status == 201
            assert reply.header("Content-Type") == "application/json"
            name = reply.json["name"]
            assert len(name) == 32 and int(name, 16) >= 0

            listed = await api.request("GET", "/api/v1/clusters/", user="alice")
            assert list(listed.json) == [name]
            obj = listed.json[name]
            assert set(obj) == CLUSTER_KEYS and set(obj) <= WIRE_KEYS
            assert obj["status"] == "PENDING"
            assert obj["dashboard_route"] is None and obj["tls_key"] is None
            assert isinstance(obj["start_time"], int) and obj["stop_time"] is None
            assert obj["options"] == {}

            # Nobody else sees it.
            assert (await api.request("GET", "/api/v1/clusters/", user="bob")).json == {}

            await api.heartbeat(name)
            got = await api.request("GET", f"/api/v1/clusters/{name}", user="alice")
            assert set(got.json) == CLUSTER_KEYS
            assert got.json["status"] == "RUNNING"
            assert got.json["dashboard_route"] == f"/clusters/{name}/status"
            assert got.json["tls_cert"].startswith("-----BEGIN CERTIFICATE-----")
            assert "PRIVATE KEY" in got.json["tls_key"]

            # Null cluster_options and an absent one are both {}.
            reply = await api.request(
                "POST", "/api/v1/clusters/", user="alice", body={"cluster_options": None}
            )
            assert reply.status == 201


async def test_status_filter() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            running = await api.running_cluster()
            pending = await api.create()
            stopped = await api.create()
            await api.request("DELETE", f"/api/v1/clusters/{stopped}", user="alice")
            await api.until(lambda: api.manager.get(stopped).status.name == "STOPPED")

            async def names(query: str) -> set[str]:
                reply = await api.request("GET", f"/api/v1/clusters/{query}", user="alice")
                assert reply.status == 200, reply.body
                return set(reply.json)

            assert await names("") == {running, pending}
            assert await names("?status=RUNNING") == {running}
            assert await names("?status=running,pending") == {running, pending}
            assert await names("?status=STOPPED") == {stopped}
            for bad, shown in (("bogus", "'bogus'"), ("running,", "''"), ("", "''")):
                reply = await api.request("GET", f"/api/v1/clusters/?status={bad}", user="alice")
                assert reply.status == 422
                assert reply.json == {"error": f"{shown} is not a valid ClusterStatus"}


async def test_create_validation_errors_leave_state_unchanged() -> None:
    options = OptionsConfig(
        fields=(
            field_from_config(
                {"field": "worker_cores", "type": "integer", "default": 1, "min": 1, "max": 4}
            ),
            field_from_config({"field": "size", "type": "select", "options": ["small", "large"]}),
        )
    )
    config = ManagerConfig(
        options=options,
        cluster_defaults=ClusterConfig(extra={"size": None}),
        check_period=0.05,
    )
    with trio.fail_after(DEADLINE):
        async with open_api(config, max_body=4096) as api:
            spec = await api.request("GET", "/api/v1/options", user="alice")
            assert [f["field"] for f in spec.json["cluster_options"]] == ["worker_cores", "size"]
            cases = [
                ({"cluster_options": {"bogus": 1}}, 422, "Unknown fields ['bogus']"),
                ({"cluster_options": {"worker_cores": 9}}, 422, "worker_cores must be <="),
                ({"cluster_options": {"worker_cores": "2"}}, 422, "worker_cores must be an"),
                ({"cluster_options": {"size": "medium"}}, 422, "'medium' is not a valid option"),
                ({"cluster_options": [1]}, 422, "options must be a dict"),
                ([1, 2], 422, "Request body must be a JSON object"),
                ("text", 422, "Request body must be a JSON object"),
            ]
            for body, status, message in cases:
                reply = await api.request("POST", "/api/v1/clusters/", user="alice", body=body)
                assert reply.status == status, (body, reply.body)
                assert message in reply.json["error"], (body, reply.json)
            reply = await api.request("POST", "/api/v1/clusters/", user="alice", body=b"{nope")
            assert reply.status == 400 and "Malformed JSON" in reply.json["error"]
            reply = await api.request("POST", "/api/v1/clusters/", user="alice", body=b" " * 10_000)
            assert reply.status == 413
            assert (await api.request("GET", "/api/v1/clusters/", user="alice")).json == {}
            assert api.backend.launches == []

            name = await api.create(options={"size": "large"})
            cluster = api.manager.get(name)
            assert cluster is not None
            assert cluster.options == {"worker_cores": 1, "size": "large"}


async def test_get_errors_and_wait() -> None:
    config = ManagerConfig(check_period=0.05, wait_timeout=0.2)
    with trio.fail_after(DEADLINE):
        async with open_api(config) as api:
            reply = await api.request("GET", "/api/v1/clusters/nope", user="alice")
            assert (reply.status, reply.json) == (404, {"error": "Cluster nope not found"})
            name = await api.create("alice")
            reply = await api.request("GET", f"/api/v1/clusters/{name}", user="bob")
            assert reply.status == 403
            assert reply.json == {"error": f"User bob lacks permissions to view cluster {name}"}

            # ?wait gives up after the wait timeout while PENDING ...
            start = trio.current_time()
            reply = await api.request("GET", f"/api/v1/clusters/{name}?wait", user="alice")
            assert reply.json["status"] == "PENDING"
            assert trio.current_time() - start >= 0.2

    config = ManagerConfig(check_period=0.05, wait_timeout=15)
    with trio.fail_after(DEADLINE):
        async with open_api(config) as api:
            name = await api.create("alice")
            await api.until(lambda: bool(api.manager.get(name).state))
            replies = []

            async def waiter() -> None:
                replies.append(
                    await api.request("GET", f"/api/v1/clusters/{name}?wait", user="alice")
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.sleep(0.1)
                assert replies == []
                await api.heartbeat(name)
            # ... and returns as soon as the cluster is RUNNING.
            assert replies[0].json["status"] == "RUNNING"


async def test_delete() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            reply = await api.request("DELETE", "/api/v1/clusters/nope", user="alice")
            assert (reply.status, reply.body) == (204, b"")
            name = await api.running_cluster("alice")
            reply = await api.request("DELETE", f"/api/v1/clusters/{name}", user="bob")
            assert reply.status == 403
            assert reply.json == {"error": f"User bob lacks permissions to stop cluster {name}"}
            assert api.manager.get(name).status.name == "RUNNING"
            assert (await api.request("DELETE", f"/api/v1/clusters/{name}")).status == 401

            reply = await api.request("DELETE", f"/api/v1/clusters/{name}", user="alice")
            assert reply.status == 204
            assert api.manager.get(name).status.name in ("STOPPING", "STOPPED")
            assert ("SNI", name) not in api.feed.table
            await api.until(lambda: api.manager.get(name).status.name == "STOPPED")
            got = (await api.request("GET", f"/api/v1/clusters/{name}", user="alice")).json
            assert got["status"] == "STOPPED" and isinstance(got["stop_time"], int)
            assert got["tls_key"] is None and got["dashboard_route"] is None
            assert (
                await api.request("DELETE", f"/api/v1/clusters/{name}", user="alice")
            ).status == 204
            assert api.backend.clusters_stopped == [name]


async def test_delete_with_cluster_token() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            name = await api.running_cluster("alice")
            other = await api.running_cluster("alice")
            token = api.manager.get(name).token
            other_token = api.manager.get(other).token
            # Another cluster's token falls through to user auth: 401 Basic.
            reply = await api.request(
                "DELETE",
                f"/api/v1/clusters/{name}",
                headers=[("Authorization", f"token {other_token}")],
            )
            assert reply.status == 401 and reply.header("WWW-Authenticate") == "Basic"
            reply = await api.request(
                "DELETE", f"/api/v1/clusters/{name}", headers=[("Authorization", f"token {token}")]
            )
            assert reply.status == 204
            await api.until(lambda: api.manager.get(name).status.name == "STOPPED")
            assert api.manager.get(other).status.name == "RUNNING"


async def test_heartbeat_auth_and_validation() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            name = await api.create()
            other = await api.create()
            path = f"/api/v1/clusters/{name}/heartbeat"
            for headers in (
                [],
                [("Authorization", f"token {api.manager.get(other).token}")],
                [basic("alice")],
                [("Authorization", "token")],
            ):
                reply = await api.request("POST", path, headers=headers, body={"count": 0})
                assert reply.status == 401
                assert reply.header("WWW-Authenticate") == "token"
            reply = await api.request(
                "POST",
                "/api/v1/clusters/nope/heartbeat",
                headers=[("Authorization", "token x")],
                body={},
            )
            assert reply.status == 401
            for fields in (
                {"count": -1},
                {"count": "1"},
                {"active_workers": "w1"},
                {"scheduler_address": 5},
                {"scheduler_address": "tcp://127.0.0.1:1"},
                {"scheduler_address": "tls://no-port"},
            ):
                reply = await api.heartbeat(name, **fields)
                assert reply.status == 422, (fields, reply.body)
                assert api.manager.get(name).status.name == "PENDING"
            assert len(api.feed.table) == 1  # only the API's own route
            reply = await api.heartbeat(name)
            assert (reply.status, reply.body) == (200, b"")
            assert api.manager.get(name).status.name == "RUNNING"
            assert api.feed.table.get("SNI", name).target == "tls://127.0.0.1:40001"


async def test_routes_feed_is_mounted_with_proxy_token() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            reply = await api.request("GET", "/api/v1/routes")
            assert reply.status == 401
            reply = await api.request(
                "GET", "/api/v1/routes", headers=[("Authorization", f"token {PROXY_TOKEN}")]
            )
            assert reply.status == 200
            assert reply.json["routes"] == [{"kind": "PATH", "path": "/", "target": api.base}]


async def test_scale() -> None:
    config = ManagerConfig(cluster_defaults=ClusterConfig(cluster_max_workers=2), check_period=0.05)
    with trio.fail_after(DEADLINE):
        async with open_api(config) as api:
            reply = await api.request(
                "POST", "/api/v1/clusters/nope/scale", user="alice", body={"count": 1}
            )
            assert (reply.status, reply.json) == (404, {"error": "Cluster nope not found"})
            name = await api.running_cluster("alice")
            path = f"/api/v1/clusters/{name}/scale"
            reply = await api.request("POST", path, user="bob", body={"count": 1})
            assert reply.status == 403
            for body, shown in (({"count": -1}, "-1"), ({"count": "2"}, "2"), ({}, "None")):
                reply = await api.request("POST", path, user="alice", body=body)
                assert reply.status == 422
                assert reply.json == {"error": f"Scale expects a non-negative integer, got {shown}"}
            assert api.preload.messages == []

            reply = await api.request("POST", path, user="alice", body={"count": 1, "x": 1})
            assert (reply.status, reply.json) == (200, {"ok": True, "msg": None})
            reply = await api.request("POST", path, user="alice", body={"count": 3})
            assert reply.json == {
                "ok": False,
                "msg": "Scale request of 3 workers would exceed resource limit of 2 workers. "
                "Scaling to 2 instead.",
            }
            assert api.preload.messages == [
                {"op": "scale", "count": 1},
                {"op": "scale", "count": 2},
            ]

            # Not running → 409, nothing forwarded.
            await api.request("DELETE", f"/api/v1/clusters/{name}", user="alice")
            reply = await api.request("POST", path, user="alice", body={"count": 1})
            assert (reply.status, reply.json) == (409, {"error": f"cluster {name} is not running"})
            assert len(api.preload.messages) == 2


async def test_adapt() -> None:
    config = ManagerConfig(cluster_defaults=ClusterConfig(cluster_max_workers=2), check_period=0.05)
    with trio.fail_after(DEADLINE):
        async with open_api(config) as api:
            name = await api.running_cluster("alice")
            path = f"/api/v1/clusters/{name}/adapt"
            reply = await api.request("POST", path, user="bob", body={})
            assert reply.status == 403
            reply = await api.request("POST", path, user="alice", body={"minimum": -1})
            assert reply.status == 422
            reply = await api.request("POST", path, user="alice", body={"active": "yes"})
            assert reply.status == 422
            reply = await api.request(
                "POST", path, user="alice", body={"minimum": None, "maximum": 3, "active": True}
            )
            assert reply.json == {
                "ok": False,
                "msg": "Adapt with `maximum=3, minimum=0` workers would exceed resource limit "
                "of 2 workers. Using `maximum=2, minimum=0` instead.",
            }
            reply = await api.request("POST", path, user="alice", body={"active": False})
            assert reply.json == {"ok": True, "msg": None}
            assert api.preload.messages == [
                {"op": "adapt", "minimum": 0, "maximum": 2, "active": True},
                {"op": "adapt", "minimum": None, "maximum": None, "active": False},
            ]


async def test_unreachable_scheduler_fails_cluster_with_409() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            name = await api.running_cluster("alice")
            api.preload.fail_with = 500
            start = trio.current_time()
            reply = await api.request(
                "POST", f"/api/v1/clusters/{name}/scale", user="alice", body={"count": 1}
            )
            assert (reply.status, reply.json) == (409, {"error": f"cluster {name} is not running"})
            assert trio.current_time() - start >= 0.3  # 3 attempts, 0.1 s then 0.2 s apart
            assert api.manager.get(name).status.name in ("STOPPING", "FAILED")
            await api.until(lambda: api.manager.get(name).status.name == "FAILED")
            reply = await api.request("GET", "/api/v1/clusters/?status=failed", user="alice")
            assert list(reply.json) == [name]


async def test_wrong_json_types_in_every_body() -> None:
    with trio.fail_after(DEADLINE):
        async with open_api() as api:
            name = await api.running_cluster("alice")
            for path in (f"/api/v1/clusters/{name}/scale", f"/api/v1/clusters/{name}/adapt"):
                for body in (b"[]", b'"x"', b"3", b"{bad"):
                    reply = await api.request("POST", path, user="alice", body=body)
                    assert reply.status in (400, 422), (path, body, reply.body)
                    assert "error" in reply.json
            assert api.preload.messages == []
            assert api.manager.get(name).status.name == "RUNNING"


def test_wire_cache_reencodes_on_visible_changes() -> None:
    cluster = Cluster(
        name="abc",
        username="alice",
        token="t",
        status=ClusterStatus.PENDING,
        options={"a": 1},
        config=ClusterConfig(),
        cert_pem="CERT",
        key_pem="KEY",
        start_time_ms=1,
    )
    cache = WireCache()
    first = cache.encode(cluster)
    assert json.loads(first) == to_wire(cluster)
    assert cache.encode(cluster) is first  # cached
    cluster.dashboard_address = "http://h:1"
    cluster.status = ClusterStatus.RUNNING
    running = json.loads(cache.encode(cluster))
    assert running["status"] == "RUNNING" and running["tls_key"] == "KEY"
    assert running["dashboard_route"] == "/clusters/abc/status"
    cluster.status, cluster.stop_time_ms = ClusterStatus.STOPPED, 5
    assert json.loads(cache.encode(cluster))["stop_time"] == 5
    cache.prune(lambda name: False)
    assert len(cache) == 0
