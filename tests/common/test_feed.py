"""Route feed server: the event log (pure) and the list + watch handler over real sockets."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from dask_gateway_common.feed import (
    MAX_LINE_BYTES,
    FeedGone,
    RouteFeed,
    encode_event_lines,
    make_feed_handler,
)
from dask_gateway_common.http import (
    ClientResponse,
    HTTPConnection,
    open_http_connection,
    serve_http,
)
from dask_gateway_common.routes import Route, RouteEvent, RouteTable

TOKEN = "s3cret-token"
AUTH = [("Authorization", f"token {TOKEN}")]


def sni(name: str, port: int = 1) -> Route:
    return Route("SNI", name, f"tls://10.0.0.1:{port}")


# ---------------------------------------------------------------------------- the log


def test_ids_start_at_current_time_in_microseconds() -> None:
    before = time.time_ns() // 1000
    feed = RouteFeed()
    after = time.time_ns() // 1000
    assert before - 1 <= feed.last_id <= after - 1
    event = feed.put(sni("a"))
    assert event is not None and event.id == feed.last_id
    assert before <= event.id <= after


def test_put_delete_and_no_op_changes() -> None:
    feed = RouteFeed(first_id=1)
    assert feed.snapshot() == {"routes": [], "id": 0}
    e1 = feed.put(sni("a"))
    assert e1 == RouteEvent(1, "PUT", sni("a"))
    assert feed.put(sni("a")) is None  # identical PUT: no event
    e2 = feed.put(sni("a", 2))
    assert e2 is not None and e2.id == 2
    assert feed.delete("SNI", "nope") is None  # absent DELETE: no event
    e3 = feed.delete("SNI", "a")
    assert e3 is not None
    assert e3.to_json() == {"id": 3, "type": "DELETE", "route": {"kind": "SNI", "sni": "a"}}
    feed.put(Route("PATH", "/", "http://api:8000"))
    assert feed.snapshot() == {
        "routes": [{"kind": "PATH", "path": "/", "target": "http://api:8000"}],
        "id": 4,
    }
    assert [e.id for e in feed.events_after(1)] == [2, 3, 4]
    assert feed.events_after(4) == []
    assert [e.id for e in feed.events_after(0)] == [1, 2, 3, 4]


def test_events_after_rejects_unknown_ids() -> None:
    feed = RouteFeed(first_id=100)
    assert feed.events_after(99) == []  # the snapshot id before any event
    with pytest.raises(FeedGone):
        feed.events_after(98)
    with pytest.raises(FeedGone):
        feed.events_after(100)  # never issued (e.g. from before an API restart)
    feed.put(sni("a"))
    assert len(feed.events_after(99)) == 1
    with pytest.raises(FeedGone) as info:
        feed.events_after(101)
    assert info.value.status == 410
    assert info.value.message == "`last_id` is too old, full refresh required"


def test_retention_drops_oldest_half() -> None:
    feed = RouteFeed(retention=4, first_id=1)
    for i in range(4):
        feed.put(sni(f"c{i}"))
    assert len(feed.events_after(0)) == 4
    feed.put(sni("c4"))  # log full: drop 2 oldest, keep 3..5
    assert feed.first_retained_id == 3
    assert [e.id for e in feed.events_after(2)] == [3, 4, 5]
    with pytest.raises(FeedGone):
        feed.events_after(1)
    for i in range(5, 100):
        feed.put(sni(f"c{i}"))
        assert len(feed.events_after(feed.first_retained_id - 1)) <= 4
    # retention=1 still bounded
    tiny = RouteFeed(retention=1, first_id=1)
    for i in range(10):
        tiny.put(sni(f"c{i}"))
    assert [e.id for e in tiny.events_after(9)] == [10]


def test_event_lines_stay_below_go_scanner_limit() -> None:
    events = [
        RouteEvent(i, "PUT", Route("PATH", "/clusters/" + "x" * 500 + str(i), "http://h:1"))
        for i in range(1000)
    ]
    lines = list(encode_event_lines(events))
    assert len(lines) > 1
    decoded = []
    for line in lines:
        assert line.endswith(b"\n") and len(line) <= MAX_LINE_BYTES
        decoded.extend(json.loads(line)["events"])
    assert [RouteEvent.from_json(e) for e in decoded] == events


async def test_slow_subscriber_is_cut_off_not_buffered() -> None:
    feed = RouteFeed(subscriber_queue=2, heartbeat=60, first_id=1)
    feed.put(sni("a"))
    lines = feed.watch(0)
    with trio.fail_after(2):
        first = await lines.__anext__()  # backlog line; now subscribed
        assert [e["id"] for e in json.loads(first)["events"]] == [1]
        assert feed.subscriber_count == 1
        for name in "bcd":  # three events into a queue of two
            feed.put(sni(name))
        assert feed.subscriber_count == 0
        assert feed.dropped_subscribers == 1
        rest = [line async for line in lines]  # what it had queued, then the end
    assert [e["id"] for line in rest for e in json.loads(line)["events"]] == [2, 3]


async def test_watch_heartbeats_and_batches() -> None:
    feed = RouteFeed(heartbeat=0.05, first_id=1)
    lines = feed.watch(feed.last_id)
    with trio.fail_after(2):
        assert await lines.__anext__() == b'{"events":[]}\n'
        assert feed.subscriber_count == 1
        feed.put(sni("a"))
        feed.put(sni("b"))
        batch = json.loads(await lines.__anext__())["events"]
        assert [e["id"] for e in batch] == [1, 2]
        await lines.aclose()
    assert feed.subscriber_count == 0


def test_constructor_validation() -> None:
    for kwargs in ({"retention": 0}, {"subscriber_queue": 0}, {"heartbeat": 0}):
        with pytest.raises(ValueError):
            RouteFeed(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- over HTTP


async def start_feed(nursery: trio.Nursery, feed: RouteFeed) -> int:
    _host, port = await nursery.start(serve_http, make_feed_handler(feed, TOKEN), "127.0.0.1", 0)
    return port


async def get(
    port: int, target: str, headers: list[tuple[str, str]] | None = None, method: str = "GET"
) -> tuple[ClientResponse, HTTPConnection]:
    conn = await open_http_connection("127.0.0.1", port)
    resp = await conn.request(method, target, AUTH if headers is None else headers)
    return resp, conn


async def read_lines(resp: ClientResponse) -> AsyncIterator[dict]:
    buf = b""
    async for chunk in resp.iter_body():
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


async def test_auth_required(nursery: trio.Nursery) -> None:
    feed = RouteFeed()
    port = await start_feed(nursery, feed)
    bad_headers = [
        [],
        [("Authorization", "token wrong")],
        [("Authorization", "token")],
        [("Authorization", "")],
        [("Authorization", "tokens3cret-token")],
        [("Authorization", f"Basic {TOKEN}")],
        [("Authorization", f"token {TOKEN}x")],
    ]
    with trio.fail_after(5):
        for headers in bad_headers:
            resp, conn = await get(port, "/api/v1/routes", headers)
            body = await resp.read()
            await conn.aclose()
            assert resp.status == 401, headers
            assert resp.headers.get("WWW-Authenticate") == "token"
            assert TOKEN.encode() not in body
        for good in (f"token {TOKEN}", f"Bearer {TOKEN}", f"TOKEN   {TOKEN}"):
            resp, conn = await get(port, "/api/v1/routes", [("Authorization", good)])
            await resp.read()
            await conn.aclose()
            assert resp.status == 200, good


async def test_list_and_errors(nursery: trio.Nursery) -> None:
    feed = RouteFeed(first_id=10)
    feed.put(sni("a"))
    port = await start_feed(nursery, feed)
    with trio.fail_after(5):
        resp, conn = await get(port, "/api/v1/routes")
        await resp.read()
        assert resp.status == 200
        assert resp.headers.get("Content-Type") == "application/json"
        assert resp.json() == {
            "routes": [{"kind": "SNI", "sni": "a", "target": "tls://10.0.0.1:1"}],
            "id": 10,
        }
        # the same connection stays usable (keep-alive)
        resp = await conn.request("GET", "/api/v1/routes?watch=1&last_id=abc", AUTH)
        await resp.read()
        assert (resp.status, resp.json()) == (422, {"error": "invalid `last_id`: abc"})
        resp = await conn.request("GET", "/api/v1/routes?watch=1&last_id=1.5", AUTH)
        await resp.read()
        assert resp.status == 422
        resp = await conn.request("GET", "/api/v1/routes?watch=1&last_id=" + "9" * 500, AUTH)
        await resp.read()
        assert resp.status == 422 and len(resp.body) < 200
        for stale in ("3", "11", "-1"):
            resp = await conn.request("GET", f"/api/v1/routes?watch=1&last_id={stale}", AUTH)
            await resp.read()
            assert resp.status == 410
            assert resp.json() == {"error": "`last_id` is too old, full refresh required"}
        resp = await conn.request("GET", "/api/v1/routes?watch=1", AUTH)  # no last_id: 0
        await resp.read()
        assert resp.status == 410
        resp = await conn.request("POST", "/api/v1/routes", AUTH)
        await resp.read()
        assert resp.status == 405
        await conn.aclose()


async def test_watch_streams_backlog_then_changes(nursery: trio.Nursery) -> None:
    feed = RouteFeed(first_id=1, heartbeat=30)
    feed.put(sni("a"))
    feed.put(sni("b"))
    port = await start_feed(nursery, feed)
    with trio.fail_after(5):
        resp, conn = await get(port, "/api/v1/routes?watch=1&last_id=1")
        assert resp.status == 200
        assert resp.headers.get("Content-Type") == "application/json"
        lines = read_lines(resp)
        first = await lines.__anext__()
        assert first == {
            "events": [
                {
                    "id": 2,
                    "type": "PUT",
                    "route": {"kind": "SNI", "sni": "b", "target": "tls://10.0.0.1:1"},
                }
            ]
        }
        feed.delete("SNI", "a")
        assert await lines.__anext__() == {
            "events": [{"id": 3, "type": "DELETE", "route": {"kind": "SNI", "sni": "a"}}]
        }
        await conn.aclose()
        # the server notices the client left at its next write and drops the subscriber
        while feed.subscriber_count:
            feed.put(sni("c", feed.last_id % 60000 + 1))
            await trio.testing.wait_all_tasks_blocked()


async def test_watch_heartbeat_over_http(nursery: trio.Nursery) -> None:
    feed = RouteFeed(first_id=1, heartbeat=0.05)
    port = await start_feed(nursery, feed)
    with trio.fail_after(5):
        resp, conn = await get(port, f"/api/v1/routes?watch=true&last_id={feed.last_id}")
        lines = read_lines(resp)
        assert await lines.__anext__() == {"events": []}
        assert await lines.__anext__() == {"events": []}
        await conn.aclose()


async def test_slow_subscriber_stream_ends(nursery: trio.Nursery) -> None:
    feed = RouteFeed(first_id=1, heartbeat=30, subscriber_queue=3)
    port = await start_feed(nursery, feed)
    with trio.fail_after(5):
        resp, conn = await get(port, "/api/v1/routes?watch=1&last_id=0")
        await trio.testing.wait_all_tasks_blocked()  # the body has started: subscribed
        assert feed.subscriber_count == 1
        for i in range(10):  # synchronous burst: nothing can be sent in between
            feed.put(sni(f"c{i}"))
        assert feed.dropped_subscribers == 1
        ids = [e["id"] async for line in read_lines(resp) for e in line["events"]]
        # what was queued (the queue of 3, plus one handed straight to the waiting reader),
        # then the stream ends cleanly: the subscriber must resync
        assert ids in ([1, 2, 3], [1, 2, 3, 4])
        await conn.aclose()


async def test_watch_from_unretained_id_raises_gone_before_subscribing() -> None:
    feed = RouteFeed(first_id=1)
    lines = feed.watch(5)
    with pytest.raises(FeedGone):
        await lines.__anext__()
    assert feed.subscriber_count == 0


_ops = st.lists(st.tuples(st.booleans(), st.sampled_from("abcde"), st.integers(1, 3)), max_size=60)


@given(_ops, st.integers(0, 60), st.integers(1, 12))
def test_snapshot_plus_events_reproduces_the_table(
    ops: list[tuple[bool, str, int]], cut: int, retention: int
) -> None:
    """A proxy that listed at any point and then applied the events after the listed id
    (when they are still retained) ends with exactly the server's table."""
    feed = RouteFeed(retention=retention, first_id=1000)
    snapshot = feed.snapshot()
    for i, (is_put, name, port) in enumerate(ops):
        if i == cut:
            snapshot = feed.snapshot()
        if is_put:
            feed.put(sni(name, port))
        else:
            feed.delete("SNI", name)
    listed_id = snapshot["id"]
    assert isinstance(listed_id, int)
    try:
        events = feed.events_after(listed_id)
    except FeedGone:
        assert listed_id < feed.first_retained_id - 1  # only ever because it was dropped
        return
    table = RouteTable(Route.from_json(r) for r in snapshot["routes"])  # type: ignore[union-attr]
    for event in events:
        if event.type == "PUT":
            table.put(event.route)
        else:
            table.delete(event.route.kind, event.route.key)
    assert set(table.routes()) == set(feed.table.routes())
    assert len(feed.events_after(feed.first_retained_id - 1)) <= retention
