"""Route model validation, wire shape, and RouteTable semantics."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from dask_gateway_common.routes import (
    Route,
    RouteError,
    RouteEvent,
    RouteTable,
    parse_host_port,
)


def test_wire_shapes_round_trip() -> None:
    sni = {"kind": "SNI", "sni": "abc", "target": "tls://10.0.0.1:8786"}
    path = {"kind": "PATH", "path": "/clusters/abc", "target": "http://10.0.0.1:8787"}
    assert Route.from_json(sni) == Route("SNI", "abc", "tls://10.0.0.1:8786")
    assert Route.from_json(sni).to_json() == sni
    assert Route.from_json(path).to_json() == path
    # deletes carry no target
    d = Route.from_json({"kind": "SNI", "sni": "abc"}, with_target=False)
    assert d.target is None
    assert d.to_json() == {"kind": "SNI", "sni": "abc"}
    assert Route("PATH", "/x", "https://h").without_target().to_json() == {
        "kind": "PATH",
        "path": "/x",
    }


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        ([], "JSON object"),
        ({"kind": "TCP", "sni": "a", "target": "h:1"}, "unknown route kind"),
        ({"sni": "a", "target": "h:1"}, "unknown route kind"),
        ({"kind": "SNI", "target": "h:1"}, "missing `sni`"),
        ({"kind": "PATH", "target": "http://h"}, "missing `path`"),
        ({"kind": "SNI", "sni": "a"}, "missing `target`"),
        ({"kind": "SNI", "sni": "", "target": "h:1"}, "non-empty"),
        ({"kind": "SNI", "sni": 5, "target": "h:1"}, "must be a string"),
        ({"kind": "SNI", "sni": "a", "target": 5}, "must be a string"),
        ({"kind": "SNI", "sni": "a", "target": "h"}, "tls://host:port"),
        ({"kind": "SNI", "sni": "a", "target": "tls://h:0"}, "out of range"),
        ({"kind": "SNI", "sni": "a", "target": "tls://h:99999"}, "port"),
        ({"kind": "SNI", "sni": "a", "target": "tls://h:x"}, "port"),
        ({"kind": "SNI", "sni": "a", "target": "http://h:80"}, "tls://host:port"),
        ({"kind": "SNI", "sni": "a", "target": "::1:80"}, "bracketed"),
        ({"kind": "PATH", "path": "/a", "target": "tls://h:1"}, "http or https"),
        ({"kind": "PATH", "path": "/a", "target": "ftp://h"}, "http or https"),
        ({"kind": "PATH", "path": "/a", "target": "http://"}, "no host"),
        ({"kind": "PATH", "path": "/a", "target": "http://h:port"}, "valid URL"),
        ({"kind": "PATH", "path": "a", "target": "http://h"}, "start with '/'"),
    ],
)
def test_from_json_rejects(obj: object, fragment: str) -> None:
    with pytest.raises(RouteError) as info:
        Route.from_json(obj)
    assert fragment in str(info.value)


def test_host_port_parsing() -> None:
    assert parse_host_port("h:1") == ("h", 1)
    assert parse_host_port("[::1]:8786") == ("::1", 8786)
    for bad in ["", ":1", "h:", "[]:1", "h:65536", "h: 1", "a/b:1"]:
        with pytest.raises(RouteError):
            parse_host_port(bad)
    assert Route("SNI", "c", "tls://[::1]:9").sni_address() == ("::1", 9)
    assert Route("SNI", "c", "127.0.0.1:9").sni_address() == ("127.0.0.1", 9)
    assert Route("PATH", "/c", "http://h").sni_address() is None


def test_event_parsing() -> None:
    put = {"id": 7, "type": "PUT", "route": {"kind": "SNI", "sni": "a", "target": "h:1"}}
    assert RouteEvent.from_json(put).to_json() == put
    delete = {"id": 8, "type": "DELETE", "route": {"kind": "PATH", "path": "/a"}}
    assert RouteEvent.from_json(delete).route == Route("PATH", "/a")
    for bad in [
        {"id": "7", "type": "PUT", "route": put["route"]},
        {"id": True, "type": "PUT", "route": put["route"]},
        {"id": 1, "type": "PATCH", "route": put["route"]},
        {"id": 1, "type": "PUT", "route": {"kind": "SNI", "sni": "a"}},
        {"id": 1, "type": "PUT"},
        "nope",
    ]:
        with pytest.raises(RouteError):
            RouteEvent.from_json(bad)


def test_table_put_delete_version() -> None:
    t = RouteTable()
    assert t.version == 0
    a = Route("SNI", "a", "tls://h:1")
    assert t.put(a) is True
    assert t.version == 1
    assert t.put(Route("SNI", "a", "tls://h:1")) is False  # identical: no change
    assert t.version == 1
    assert t.sni_target("a") == ("h", 1)
    assert t.put(Route("SNI", "a", "h:2")) is True
    assert t.sni_target("a") == ("h", 2)
    assert t.version == 2
    p = Route("PATH", "/clusters/a", "http://h:3")
    t.put(p)
    assert t.get("PATH", "/clusters/a") == p
    assert t.routes("PATH") == [p]
    assert t.count("SNI") == 1 and len(t) == 2
    assert t.delete("SNI", "missing") is None
    assert t.version == 3
    assert t.delete("SNI", "a") == Route("SNI", "a", "h:2")
    assert t.sni_target("a") is None
    assert t.version == 4
    with pytest.raises(RouteError):
        t.put(Route("SNI", "x"))


def test_replace_all() -> None:
    t = RouteTable([Route("SNI", "a", "h:1")])
    v = t.version
    assert t.replace_all([Route("SNI", "a", "h:1")]) is False
    assert t.version == v
    assert t.replace_all([Route("SNI", "b", "h:2"), Route("PATH", "/", "http://api")]) is True
    assert t.sni_target("a") is None
    assert t.sni_target("b") == ("h", 2)
    assert t.version == v + 1


async def test_wait_changed() -> None:
    t = RouteTable()
    results: list[int] = []

    async def waiter() -> None:
        results.append(await t.wait_changed(0))

    with trio.fail_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            t.put(Route("SNI", "a", "h:1"))
        assert results == [1]
        # already past: returns immediately
        assert await t.wait_changed(0) == 1


_names = st.text(alphabet="abcdefghij", min_size=1, max_size=3)
_ops = st.lists(
    st.tuples(st.sampled_from(["put", "delete"]), _names, st.integers(1, 3)), max_size=30
)


@given(_ops)
def test_table_matches_dict_model(ops: list[tuple[str, str, int]]) -> None:
    t = RouteTable()
    model: dict[str, str] = {}
    for op, name, port in ops:
        before = t.version
        if op == "put":
            target = f"tls://h:{port}"
            changed = model.get(name) != target
            model[name] = target
            assert t.put(Route("SNI", name, target)) is changed
        else:
            changed = name in model
            model.pop(name, None)
            assert (t.delete("SNI", name) is not None) is changed
        assert t.version == before + (1 if changed else 0)
    assert {r.key: r.target for r in t.routes()} == model
    assert json.loads(json.dumps([r.to_json() for r in t.routes()])) == [
        {"kind": "SNI", "sni": k, "target": v} for k, v in model.items()
    ]
