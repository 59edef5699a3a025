"""The route feed both proxies follow, served from a child process exactly as the API
serves it: ``RouteFeed`` behind ``make_feed_handler`` (token auth) on ``serve_http``."""

from __future__ import annotations

import multiprocessing.connection
import signal

import trio

from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.http import serve_http
from dask_gateway_common.routes import Route


def serve_feed(
    routes: list[tuple[str, str, str]], token: str, conn: multiprocessing.connection.Connection
) -> None:
    """Process target: serve ``routes`` ((kind, key, target) triples) on a free loopback
    port, send the port through ``conn``, run until SIGTERM."""

    async def main() -> None:
        feed = RouteFeed()
        for kind, key, target in routes:
            feed.put(Route(kind, key, target))  # type: ignore[arg-type]
        handler = make_feed_handler(feed, token)
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                _, port = await nursery.start(serve_http, handler, "127.0.0.1", 0)
                conn.send(port)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
