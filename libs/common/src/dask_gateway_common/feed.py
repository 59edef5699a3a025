"""Route feed, server side: the event log and the list + watch handler (spec §8.1, E11).

Theory of operation
-------------------
:class:`RouteFeed` owns the authoritative :class:`RouteTable` and an event log. Every real
change (a PUT of a new or different route, a DELETE of a present one) appends one
:class:`RouteEvent` with the next id. Ids start at ``first_id`` (default: the current time in
microseconds since the epoch), so a ``last_id`` remembered from before an API restart is
either older than this log or newer than anything it issued: both answer 410 and the proxy
lists again. It is never misread as a position in the new log.

The log keeps at most ``retention`` events; when full the oldest half is dropped (as
upstream). A watch from ``last_id`` is valid iff ``first retained id - 1 <= last_id <= last
issued id``; the events after it are exactly the retained events with a larger id.

Watchers ("subscribers") each get a bounded trio memory channel. Appending an event pushes
it to every subscriber with ``send_nowait``; a subscriber whose queue is full is cut off (its
channel is closed, so its stream ends after what it already has) and must resync. Nothing
is ever buffered without limit.

A watch response is a chunked body of newline-delimited ``{"events": [...]}`` lines: the
first line carries the events after ``last_id`` (if any), then one line per batch of events
that arrived together, and ``{"events": []}`` as a heartbeat after ``heartbeat`` seconds of
silence. Lines are split so none exceeds ``MAX_LINE_BYTES`` (upstream's Go proxy reads
lines with a 64 KiB scanner).

The subscription is taken in the same synchronous step as reading the backlog, so no event
can fall between them.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

import trio

from .errors import GatewayError
from .http import Request, Response
from .routes import EventType, Route, RouteEvent, RouteTable
from .tokens import check_token_header

__all__ = [
    "MAX_LINE_BYTES",
    "FeedGone",
    "RouteFeed",
    "encode_event_lines",
    "make_feed_handler",
    "parse_last_id",
    "unauthorized",
]

log = logging.getLogger("dask_gateway.feed")

#: Upper bound for one streamed line (upstream's Go proxy uses a 64 KiB line scanner).
MAX_LINE_BYTES = 60_000
_LAST_ID_RE = re.compile(r"-?[0-9]{1,30}")
_JSON_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


class FeedGone(GatewayError):
    """The requested ``last_id`` is not in the retained log: a full refresh is required."""

    def __init__(self) -> None:
        super().__init__("`last_id` is too old, full refresh required", status=410)


def _shorten(value: str, limit: int = 64) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def parse_last_id(value: str) -> int:
    """Parse a ``last_id`` query value; 422 GatewayError if it is not an integer."""
    if not _LAST_ID_RE.fullmatch(value):
        raise GatewayError(f"invalid `last_id`: {_shorten(value)}", status=422)
    return int(value)


def encode_event_lines(events: Iterable[RouteEvent]) -> Iterator[bytes]:
    """Encode events as ``{"events": [...]}\\n`` lines, none longer than MAX_LINE_BYTES
    (unless a single event is larger on its own)."""
    batch: list[bytes] = []
    size = 0
    for event in events:
        item = json.dumps(event.to_json(), separators=(",", ":")).encode()
        if batch and size + len(item) + 1 > MAX_LINE_BYTES - 16:
            yield _line(batch)
            batch, size = [], 0
        batch.append(item)
        size += len(item) + 1
    if batch:
        yield _line(batch)


def _line(items: list[bytes]) -> bytes:
    return b'{"events":[' + b",".join(items) + b"]}\n"


HEARTBEAT_LINE = b'{"events":[]}\n'


@dataclass(eq=False)
class _Subscriber:
    send: trio.MemorySendChannel[RouteEvent]
    peer: str = ""
    dropped: bool = field(default=False)


class RouteFeed:
    """The authoritative route table plus its event log and live subscribers."""

    def __init__(
        self,
        retention: int = 100,
        subscriber_queue: int = 1000,
        heartbeat: float = 15.0,
        first_id: int | None = None,
    ) -> None:
        if retention < 1:
            raise ValueError("retention must be at least 1")
        if subscriber_queue < 1:
            raise ValueError("subscriber_queue must be at least 1")
        if not heartbeat > 0:
            raise ValueError("heartbeat must be positive")
        if first_id is None:
            first_id = time.time_ns() // 1000
        self.retention = retention
        self.subscriber_queue = subscriber_queue
        self.heartbeat = heartbeat
        self.table = RouteTable()
        self._events: list[RouteEvent] = []
        self._last_id = first_id - 1
        self._subscribers: set[_Subscriber] = set()
        #: subscribers cut off because they fell behind (for metrics and tests)
        self.dropped_subscribers = 0

    # -- the log ---------------------------------------------------------------------
    @property
    def last_id(self) -> int:
        """Id of the last issued event (``first_id - 1`` before any event)."""
        return self._last_id

    @property
    def first_retained_id(self) -> int:
        return self._events[0].id if self._events else self._last_id + 1

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def put(self, route: Route) -> RouteEvent | None:
        """Add or replace a route; ``None`` (no event) when nothing changed."""
        if not self.table.put(route):
            return None
        return self._append("PUT", route)

    def delete(self, kind: str, key: str) -> RouteEvent | None:
        """Remove a route; ``None`` (no event) when it was absent."""
        removed = self.table.delete(kind, key)
        if removed is None:
            return None
        return self._append("DELETE", removed.without_target())

    def snapshot(self) -> dict[str, object]:
        """The list response: every route and the id of the last event."""
        return {"routes": [r.to_json() for r in self.table.routes()], "id": self._last_id}

    def events_after(self, last_id: int) -> list[RouteEvent]:
        """The retained events with an id above ``last_id``; FeedGone (410) if not retained."""
        if not self.first_retained_id - 1 <= last_id <= self._last_id:
            raise FeedGone()
        return [e for e in self._events if e.id > last_id]

    def _append(self, type_: EventType, route: Route) -> RouteEvent:
        self._last_id += 1
        event = RouteEvent(self._last_id, type_, route)
        if len(self._events) >= self.retention:
            del self._events[: max(1, self.retention // 2)]
        self._events.append(event)
        for sub in list(self._subscribers):
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                self._drop(sub)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.discard(sub)
        return event

    # -- subscribers -----------------------------------------------------------------
    def _subscribe(self, peer: str) -> tuple[_Subscriber, trio.MemoryReceiveChannel[RouteEvent]]:
        send, receive = trio.open_memory_channel[RouteEvent](self.subscriber_queue)
        sub = _Subscriber(send, peer)
        self._subscribers.add(sub)
        return sub, receive

    def _drop(self, sub: _Subscriber) -> None:
        self._subscribers.discard(sub)
        sub.dropped = True
        sub.send.close()
        self.dropped_subscribers += 1
        log.warning(
            "Route feed subscriber %s fell behind (%d queued events); disconnecting it",
            sub.peer or "?",
            self.subscriber_queue,
        )

    def _unsubscribe(self, sub: _Subscriber) -> None:
        self._subscribers.discard(sub)
        sub.send.close()

    async def watch(self, last_id: int, peer: str = "") -> AsyncIterator[bytes]:
        """Yield the watch stream's lines. Raises FeedGone before subscribing if
        ``last_id`` is not retained; ends when the subscriber is cut off."""
        backlog = self.events_after(last_id)
        sub, receive = self._subscribe(peer)  # same synchronous step as the backlog
        try:
            for line in encode_event_lines(backlog):
                yield line
            while True:
                batch: list[RouteEvent] = []
                ended = False
                with trio.move_on_after(self.heartbeat):
                    try:
                        batch.append(await receive.receive())
                    except trio.EndOfChannel:
                        ended = True
                while not ended:
                    try:
                        batch.append(receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                    except trio.EndOfChannel:
                        ended = True
                if batch:
                    for line in encode_event_lines(batch):
                        yield line
                elif not ended:
                    yield HEARTBEAT_LINE
                if ended:
                    return
        finally:
            self._unsubscribe(sub)
            receive.close()

    # -- HTTP ------------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        """GET → list; GET ``?watch=1&last_id=N`` → streaming watch. Unauthenticated:
        wrap with :func:`make_feed_handler` to check the proxy token."""
        if request.method != "GET":
            return Response.error(405, "Method not allowed", headers=[("Allow", "GET")])
        # Like upstream, any non-empty `watch` value selects watch mode.
        if not request.query_params.get("watch"):
            return Response.json(self.snapshot(), headers=[("Cache-Control", "no-store")])
        last_id = parse_last_id(request.query_params.get("last_id", "0"))
        self.events_after(last_id)  # 410 now, while we can still send a status
        peer = f"{request.client[0]}:{request.client[1]}" if request.client else ""
        return Response(200, list(_JSON_HEADERS), _watch_body(self, last_id, peer))


async def _watch_body(feed: RouteFeed, last_id: int, peer: str) -> AsyncIterator[bytes]:
    """The watch response body. It subscribes on first iteration; if the log has moved past
    ``last_id`` since the handler checked it, the stream just ends and the proxy resyncs."""
    lines = feed.watch(last_id, peer)
    try:
        async for line in lines:
            yield line
    except FeedGone:
        return
    finally:
        await lines.aclose()


def unauthorized() -> Response:
    return Response.error(401, "Unauthorized", headers=[("WWW-Authenticate", "token")])


def make_feed_handler(feed: RouteFeed, token: str) -> Callable[[Request], Awaitable[Response]]:
    """Wrap :meth:`RouteFeed.handle` with proxy-token auth (``token``/``Bearer`` schemes,
    constant-time compare, 401 with ``WWW-Authenticate: token`` otherwise)."""

    async def handler(request: Request) -> Response:
        if not check_token_header(request.headers.get("Authorization"), token):
            return unauthorized()
        return await feed.handle(request)

    return handler
