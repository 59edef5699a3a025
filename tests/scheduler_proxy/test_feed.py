"""The proxy follows the real route feed through server restarts and full resyncs."""

from __future__ import annotations

import trio

from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.sni import UNRECOGNIZED_NAME, tls_alert

from .conftest import (
    TOKEN,
    WAIT,
    Credentials,
    SwitchableFeed,
    client_hello,
    open_tls_client,
    read_until_eof,
    round_trip,
    sni_route,
    start_echo_backend,
    start_feed_server,
    start_proxy,
    wait_for_route,
)


async def rejected(port: int, cluster: str) -> bool:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(client_hello(f"daskgateway-{cluster}"))
        return await read_until_eof(stream) == tls_alert(UNRECOGNIZED_NAME)


async def test_feed_server_restart_keeps_table_then_resyncs(credentials: Credentials) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            one = await start_echo_backend(nursery, "one", credentials.server_context())
            two = await start_echo_backend(nursery, "two", credentials.server_context())
            feed = RouteFeed()
            feed.put(sni_route("one", one.target))
            handler = make_feed_handler(feed, TOKEN)
            feed_port, feed_scope = await start_feed_server(nursery, handler)
            proxy = await start_proxy(nursery, feed_port)
            established = await open_tls_client(proxy.port, "one", credentials)

            # The API goes away: the proxy keeps serving its last table.
            feed_scope.cancel()
            with trio.fail_after(WAIT):
                await proxy.feed_client.wait_until(lambda c: c.state == "backoff")
            fresh = await open_tls_client(proxy.port, "one", credentials)
            assert await round_trip(fresh, b"a") == b"one:a"
            await fresh.aclose()

            # It comes back (same port) with a different table, as after an API restart.
            new_feed = RouteFeed()
            new_feed.put(sni_route("two", two.target))
            await start_feed_server(nursery, make_feed_handler(new_feed, TOKEN), feed_port)
            await wait_for_route(proxy, "two", two.target)
            await wait_for_route(proxy, "one", None)
            assert proxy.feed_client.resyncs >= 1

            stream = await open_tls_client(proxy.port, "two", credentials)
            assert await round_trip(stream, b"b") == b"two:b"
            await stream.aclose()
            assert await rejected(proxy.port, "one")
            # The connection made before the outage still works.
            assert await round_trip(established, b"c") == b"one:c"
            await established.aclose()

            # And the proxy watches the new feed: a change arrives without a restart.
            new_feed.put(sni_route("one", one.target))
            await wait_for_route(proxy, "one", one.target)
            nursery.cancel_scope.cancel()


async def test_gone_last_id_triggers_full_resync(credentials: Credentials) -> None:
    """A watch reopened with a ``last_id`` the API does not know gets 410 → list again."""
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            one = await start_echo_backend(nursery, "one", credentials.server_context())
            two = await start_echo_backend(nursery, "two", credentials.server_context())
            old_feed = RouteFeed(heartbeat=3600)  # silent, so the watch times out
            old_feed.put(sni_route("one", one.target))
            switch = SwitchableFeed(old_feed)
            feed_port, _ = await start_feed_server(nursery, switch.handle)
            proxy = await start_proxy(nursery, feed_port, watch_timeout=0.3)
            client = proxy.feed_client
            assert client.lists == 1

            # The API "restarts" in place: a new log whose ids the proxy has never seen.
            new_feed = RouteFeed(first_id=old_feed.last_id + 10_000)
            new_feed.put(sni_route("two", two.target))
            switch.feed = new_feed
            await wait_for_route(proxy, "two", two.target)
            await wait_for_route(proxy, "one", None)
            assert client.lists == 2 and client.resyncs == 1
            assert client.errors == 0  # a 410 is a resync, not an error

            stream = await open_tls_client(proxy.port, "two", credentials)
            assert await round_trip(stream, b"z") == b"two:z"
            await stream.aclose()
            nursery.cancel_scope.cancel()
