"""Route feed client: pure helpers, then end to end against our feed server on real sockets."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.feed_client import (
    Backoff,
    FeedProtocolError,
    LineSplitter,
    RouteFeedClient,
    parse_events_message,
    parse_list_message,
)
from dask_gateway_common.http import Request, Response, serve_http
from dask_gateway_common.routes import Route, RouteTable
from dask_gateway_common.tls import generate_cluster_credentials

TOKEN = "feed-client-test-token"
FAST = {"backoff_min": 0.01, "backoff_max": 0.05}


def sni(name: str, port: int = 1) -> Route:
    return Route("SNI", name, f"tls://10.0.0.1:{port}")


def path(name: str) -> Route:
    return Route("PATH", f"/clusters/{name}", "http://10.0.0.1:8787")


def as_set(routes: list[Route]) -> set[Route]:
    return set(routes)


# ---------------------------------------------------------------------------- pure parts


def test_backoff_doubles_caps_and_resets() -> None:
    b = Backoff(0.5, 15.0, rand=lambda: 0.0)
    assert [b.next_delay() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
    b.reset()
    assert b.next_delay() == 0.5
    jittered = Backoff(1.0, 15.0, jitter=0.25, rand=lambda: 0.999)
    assert 1.0 < jittered.next_delay() < 1.25
    assert Backoff(15.0, 15.0, rand=lambda: 0.999).next_delay() == 15.0  # never past max
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_line_splitter() -> None:
    s = LineSplitter(max_line_bytes=20)
    assert list(s.feed(b'{"a"')) == []
    assert list(s.feed(b':1}\n\n  \n{"b":2}\n{')) == [b'{"a":1}', b'{"b":2}']
    assert list(s.feed(b"}\n")) == [b"{}"]
    with pytest.raises(FeedProtocolError):
        list(s.feed(b"x" * 21))  # an unterminated line past the limit
    with pytest.raises(FeedProtocolError):
        list(LineSplitter(max_line_bytes=5).feed(b"123456\n"))


def test_parse_list_message() -> None:
    body = (
        b'{"routes": [{"kind": "SNI", "sni": "a", "target": "tls://h:1"},'
        b' {"kind": "PATH", "path": "/x", "target": "ftp://bad"},'
        b' {"kind": "PATH", "path": "/", "target": "http://api"}], "id": 42}'
    )
    routes, last_id, invalid = parse_list_message(body)
    assert routes == [Route("SNI", "a", "tls://h:1"), Route("PATH", "/", "http://api")]
    assert (last_id, invalid) == (42, 1)
    routes, _, _ = parse_list_message(body, frozenset({"SNI"}))
    assert routes == [Route("SNI", "a", "tls://h:1")]
    for bad in [
        b"nope",
        b"[]",
        b'{"routes": {}, "id": 1}',
        b'{"routes": []}',
        b'{"routes": [], "id": "1"}',
    ]:
        with pytest.raises(FeedProtocolError):
            parse_list_message(bad)


def test_parse_events_message() -> None:
    assert parse_events_message(b'{"events": []}') == ([], None, 0)
    line = (
        b'{"events": [{"id": 5, "type": "PUT", "route": {"kind": "SNI", "sni": "a", "target": "h:1"}},'
        b' {"id": 6, "type": "PUT", "route": {"kind": "SNI", "sni": "b", "target": "nope"}},'
        b' {"id": 7, "type": "DELETE", "route": {"kind": "SNI", "sni": "a"}}]}'
    )
    events, last, invalid = parse_events_message(line, after=4)
    assert [e.id for e in events] == [5, 7] and last == 7 and invalid == 1
    with pytest.raises(FeedProtocolError, match="increasing"):
        parse_events_message(line, after=5)
    for bad in [
        b"{",
        b'{"events": 1}',
        b'{"events": [{"type": "PUT"}]}',
        b'{"events": [{"id": "5"}]}',
        b'{"events": [{"id": 2, "type": "DELETE", "route": {"kind": "SNI", "sni": "a"}},'
        b' {"id": 1, "type": "DELETE", "route": {"kind": "SNI", "sni": "a"}}]}',
    ]:
        with pytest.raises(FeedProtocolError):
            parse_events_message(bad)


def test_client_rejects_bad_url() -> None:
    with pytest.raises(ValueError):
        RouteFeedClient("ftp://x/api", TOKEN, RouteTable())


# ---------------------------------------------------------------------------- end to end


async def start_server(
    nursery: trio.Nursery, handler, port: int = 0, ssl_context: ssl.SSLContext | None = None
) -> tuple[int, trio.CancelScope]:
    scope = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await serve_http(
                handler, "127.0.0.1", port, ssl_context=ssl_context, task_status=task_status
            )

    bound = await nursery.start(serve)
    return bound[1], scope


async def start_client(nursery: trio.Nursery, port: int, **kwargs) -> RouteFeedClient:
    table = RouteTable()
    options = {**FAST, **kwargs}
    token = options.pop("token", TOKEN)
    scheme = options.pop("scheme", "http")
    client = RouteFeedClient(f"{scheme}://127.0.0.1:{port}/api/v1/routes", token, table, **options)
    await nursery.start(client.run)
    return client


async def converge(client: RouteFeedClient, feed: RouteFeed) -> None:
    """Wait until the client's table equals the feed's (version waits, no sleeps)."""
    while as_set(client.table.routes()) != as_set(feed.table.routes()):
        await client.table.wait_changed(client.table.version)


async def test_put_and_delete_propagate(nursery: trio.Nursery) -> None:
    feed = RouteFeed(heartbeat=30)
    feed.put(sni("a"))
    feed.put(path("a"))
    port, _ = await start_server(nursery, make_feed_handler(feed, TOKEN))
    with trio.fail_after(5):
        client = await start_client(nursery, port)
        await client.synced.wait()
        assert as_set(client.table.routes()) == {sni("a"), path("a")}
        assert client.last_sync is not None and client.last_id == feed.last_id
        await client.wait_until(lambda c: c.state == "watching")

        feed.put(sni("b", 2))
        await converge(client, feed)
        assert client.table.sni_target("b") == ("10.0.0.1", 2)
        feed.put(sni("a", 3))  # replace
        await converge(client, feed)
        feed.delete("PATH", "/clusters/a")
        await converge(client, feed)
        assert client.table.get("PATH", "/clusters/a") is None
        assert (client.lists, client.resyncs, client.errors) == (1, 0, 0)
        assert client.last_id == feed.last_id


async def test_kinds_filter(nursery: trio.Nursery) -> None:
    feed = RouteFeed(heartbeat=30)
    feed.put(sni("a"))
    feed.put(path("a"))
    port, _ = await start_server(nursery, make_feed_handler(feed, TOKEN))
    with trio.fail_after(5):
        client = await start_client(nursery, port, kinds={"SNI"})
        await client.synced.wait()
        assert client.table.routes() == [sni("a")]
        await client.wait_until(lambda c: c.state == "watching")
        feed.put(path("b"))
        feed.put(sni("b"))
        await client.wait_until(lambda c: c.last_id == feed.last_id)
        assert as_set(client.table.routes()) == {sni("a"), sni("b")}


async def test_silent_watch_is_reopened(nursery: trio.Nursery) -> None:
    feed = RouteFeed(heartbeat=60)  # never heartbeats during the test
    port, _ = await start_server(nursery, make_feed_handler(feed, TOKEN))
    with trio.fail_after(5):
        client = await start_client(nursery, port, watch_timeout=0.1)
        await client.synced.wait()
        await client.wait_until(lambda c: c.watch_reopens >= 2)
        feed.put(sni("late"))  # still delivered by the reopened watch
        await converge(client, feed)
        assert (client.lists, client.errors) == (1, 0)


async def test_heartbeats_keep_a_watch_open(nursery: trio.Nursery) -> None:
    feed = RouteFeed(heartbeat=0.02)
    port, _ = await start_server(nursery, make_feed_handler(feed, TOKEN))
    with trio.fail_after(5):
        client = await start_client(nursery, port, watch_timeout=0.15)
        await client.wait_until(lambda c: c.state == "watching")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.4):  # observe: no reopen while heartbeats flow
            await client.wait_until(lambda c: c.watch_reopens > 0)
        assert client.watch_reopens == 0


async def test_410_triggers_full_resync(nursery: trio.Nursery) -> None:
    feed = RouteFeed(retention=4, heartbeat=60)
    feed.put(sni("a"))
    real = make_feed_handler(feed, TOKEN)
    held: list[int] = []

    async def handler(request: Request) -> Response:
        if request.query_params.get("watch") and not held:
            # First watch: answer 200 and then stay silent, so the client falls behind.
            held.append(1)

            async def silent() -> AsyncIterator[bytes]:
                await trio.sleep_forever()
                yield b""

            return Response(200, [("Content-Type", "application/json")], silent())
        return await real(request)

    port, _ = await start_server(nursery, handler)
    with trio.fail_after(5):
        client = await start_client(nursery, port, watch_timeout=0.2)
        await client.synced.wait()
        for i in range(10):  # far more than the retained log
            feed.put(sni(f"c{i}"))
        feed.delete("SNI", "a")
        await client.wait_until(lambda c: c.resyncs >= 1)  # reopen → 410 → list
        await converge(client, feed)
        assert client.errors == 0 and client.watch_reopens == 1


async def test_server_restart_with_a_different_table(nursery: trio.Nursery) -> None:
    feed1 = RouteFeed(heartbeat=30)
    feed1.put(sni("old"))
    port, scope = await start_server(nursery, make_feed_handler(feed1, TOKEN))
    with trio.fail_after(5):
        client = await start_client(nursery, port)
        await converge(client, feed1)
        await client.wait_until(lambda c: c.state == "watching")
        scope.cancel()
        await client.wait_until(lambda c: c.errors >= 1)
        assert client.state in ("backoff", "connecting", "listing")
        assert client.table.routes() == [sni("old")]  # kept while disconnected

        feed2 = RouteFeed(heartbeat=30)  # new log, new ids, new routes
        feed2.put(sni("new"))
        feed2.put(path("new"))
        await start_server(nursery, make_feed_handler(feed2, TOKEN), port=port)
        await converge(client, feed2)
        await client.wait_until(lambda c: c.state == "watching")
        feed2.put(sni("newer"))
        await converge(client, feed2)
        assert client.resyncs >= 1 and client.last_id == feed2.last_id


async def test_slow_subscriber_is_cut_off_and_resyncs(nursery: trio.Nursery) -> None:
    feed = RouteFeed(heartbeat=30, subscriber_queue=2)
    port, _ = await start_server(nursery, make_feed_handler(feed, TOKEN))
    with trio.fail_after(5):
        client = await start_client(nursery, port)
        await client.wait_until(lambda c: c.state == "watching")
        await trio.testing.wait_all_tasks_blocked()
        assert feed.subscriber_count == 1
        for i in range(20):  # one synchronous burst: the subscriber cannot keep up
            feed.put(sni(f"c{i}"))
        assert feed.dropped_subscribers == 1
        await client.wait_until(lambda c: c.resyncs >= 1)
        await converge(client, feed)
        assert "ended" in (client.last_error or "")


async def test_wrong_token_never_syncs_and_is_not_logged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    feed = RouteFeed()
    feed.put(sni("a"))
    port, _ = await start_server(nursery, make_feed_handler(feed, TOKEN))
    wrong = "wrong-token-value-123"
    with trio.fail_after(5):
        client = await start_client(nursery, port, token=wrong)
        await client.wait_until(lambda c: c.errors >= 3)
    assert not client.synced.is_set()
    assert len(client.table) == 0
    assert "401" in (client.last_error or "")
    assert wrong not in caplog.text and TOKEN not in caplog.text
    assert wrong not in repr(client)


async def test_connection_refused_backs_off(nursery: trio.Nursery) -> None:
    port, scope = await start_server(nursery, make_feed_handler(RouteFeed(), TOKEN))
    scope.cancel()  # nothing listens there any more
    with trio.fail_after(5):
        client = await start_client(nursery, port)
        await client.wait_until(lambda c: c.errors >= 2)
    assert client.state in ("backoff", "connecting", "listing")
    assert not client.synced.is_set()


async def test_malformed_line_keeps_table_and_resyncs(nursery: trio.Nursery) -> None:
    feed = RouteFeed(heartbeat=30)
    feed.put(sni("a"))
    real = make_feed_handler(feed, TOKEN)
    bad_watches: list[int] = []

    async def handler(request: Request) -> Response:
        if request.query_params.get("watch") and not bad_watches:
            bad_watches.append(1)

            async def garbage() -> AsyncIterator[bytes]:
                yield b'{"events": [}\n'
                await trio.sleep_forever()

            return Response(200, [("Content-Type", "application/json")], garbage())
        return await real(request)

    port, _ = await start_server(nursery, handler)
    with trio.fail_after(5):
        client = await start_client(nursery, port)
        await client.wait_until(lambda c: c.errors >= 1)
        assert "malformed" in (client.last_error or "")
        assert client.table.routes() == [sni("a")]
        await client.wait_until(lambda c: c.resyncs >= 1 and c.state == "watching")
        feed.put(sni("b"))
        await converge(client, feed)


async def test_https_api_url(nursery: trio.Nursery, tmp_path: Path) -> None:
    cert, key = generate_cluster_credentials("localhost")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_ctx = ssl.create_default_context(cadata=cert.decode())
    client_ctx.check_hostname = False  # we dial 127.0.0.1; the cert names "localhost"

    feed = RouteFeed(heartbeat=30)
    feed.put(sni("secure"))
    port, _ = await start_server(nursery, make_feed_handler(feed, TOKEN), ssl_context=server_ctx)
    with trio.fail_after(5):
        client = await start_client(nursery, port, scheme="https", ssl_context=client_ctx)
        await converge(client, feed)
        await client.wait_until(lambda c: c.state == "watching")
        feed.put(sni("secure2"))
        await converge(client, feed)
