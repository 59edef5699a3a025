"""Route feed, client side: keep a local RouteTable in sync with the API (spec §8.1).

Theory of operation
-------------------
``RouteFeedClient.run`` loops forever:

1. **list** — ``GET <api_url>`` → ``{"routes": [...], "id": N}``; the local table is
   replaced by the listed routes (only the ``kinds`` this proxy uses), ``synced`` is set, the
   backoff is reset, and ``last_id = N``.
2. **watch** — ``GET <api_url>?watch=1&last_id=N`` → newline-delimited
   ``{"events": [...]}`` lines; each PUT replaces a route, each DELETE removes one, and
   ``last_id`` follows the last applied event. Heartbeat lines (``{"events": []}``) and
   any bytes at all count as activity.
   - a watch silent for longer than ``watch_timeout`` is reopened from ``last_id``;
   - 410 (``last_id`` no longer retained, or the API restarted) → list again at once;
   - anything else (connection refused, bad status, malformed line, the stream ending)
     is an error: the table is kept as it is (the proxy keeps serving), the client backs
     off exponentially from ``backoff_min`` to ``backoff_max`` with jitter, then lists.

The pure pieces (line splitting, message parsing, backoff arithmetic) sit beside the loop
so they can be tested without sockets. The token is sent as ``Authorization: token <t>``
and never logged.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import h11
import trio

from .errors import GatewayError
from .http import HTTPClient
from .routes import Route, RouteError, RouteEvent, RouteTable

__all__ = [
    "STATES",
    "Backoff",
    "FeedProtocolError",
    "LineSplitter",
    "RouteFeedClient",
    "apply_events",
    "parse_events_message",
    "parse_list_message",
]

log = logging.getLogger("dask_gateway.feed_client")

STATES = ("connecting", "listing", "watching", "backoff")


class FeedProtocolError(Exception):
    """The feed server sent something we cannot use (bad status, malformed JSON, ...)."""


class _Gone(Exception):
    """410 from the watch endpoint: list again."""


# ------------------------------------------------------------------------------ pure parts


class Backoff:
    """Exponential backoff with jitter: each delay is the current step times a factor in
    ``[1, 1 + jitter)``, capped at ``maximum``; the step doubles up to ``maximum``."""

    def __init__(
        self,
        minimum: float,
        maximum: float,
        *,
        jitter: float = 0.25,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError("need 0 < backoff_min <= backoff_max")
        self.minimum = minimum
        self.maximum = maximum
        self.jitter = jitter
        self._rand = rand
        self._step = minimum

    def next_delay(self) -> float:
        delay = min(self.maximum, self._step * (1 + self.jitter * self._rand()))
        self._step = min(self.maximum, self._step * 2)
        return delay

    def reset(self) -> None:
        self._step = self.minimum


class LineSplitter:
    """Split a byte stream into lines, refusing any line longer than ``max_line_bytes``."""

    def __init__(self, max_line_bytes: int = 4 * 1024 * 1024) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buffer += data
        while True:
            index = self._buffer.find(b"\n")
            if index < 0:
                break
            line = bytes(self._buffer[:index])
            del self._buffer[: index + 1]
            if len(line) > self.max_line_bytes:
                raise FeedProtocolError(f"watch line longer than {self.max_line_bytes} bytes")
            if line.strip():
                yield line
        if len(self._buffer) > self.max_line_bytes:
            raise FeedProtocolError(f"watch line longer than {self.max_line_bytes} bytes")


def _loads(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FeedProtocolError(f"malformed {what}: {exc}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_list_message(
    data: bytes, kinds: frozenset[str] | None = None
) -> tuple[list[Route], int, int]:
    """Parse a list response → ``(routes, last_id, invalid_count)``.

    A structurally wrong message raises FeedProtocolError; an individual invalid route is
    skipped (and counted), as upstream's Go proxy does, so one bad entry cannot take the
    whole table down.
    """
    msg = _loads(data, "route list")
    if not isinstance(msg, dict) or not isinstance(msg.get("routes"), list):
        raise FeedProtocolError("route list must be an object with a `routes` array")
    last_id = msg.get("id")
    if not _is_int(last_id):
        raise FeedProtocolError("route list must carry an integer `id`")
    routes: list[Route] = []
    invalid = 0
    for obj in msg["routes"]:
        try:
            route = Route.from_json(obj)
        except RouteError as exc:
            invalid += 1
            log.warning("Ignoring invalid route in list: %s", exc)
            continue
        if kinds is None or route.kind in kinds:
            routes.append(route)
    return routes, last_id, invalid


def parse_events_message(
    line: bytes, after: int | None = None
) -> tuple[list[RouteEvent], int | None, int]:
    """Parse one watch line → ``(valid events, id of the last event or None, invalid count)``.

    Every event must carry an integer ``id``, increasing and above ``after`` (the last id
    already applied); an event whose route is invalid is skipped (counted) but its id still
    advances ``last_id``.
    """
    msg = _loads(line, "watch line")
    if not isinstance(msg, dict) or not isinstance(msg.get("events"), list):
        raise FeedProtocolError("watch line must be an object with an `events` array")
    events: list[RouteEvent] = []
    last: int | None = None
    floor = after
    invalid = 0
    for obj in msg["events"]:
        if not isinstance(obj, dict) or not _is_int(obj.get("id")):
            raise FeedProtocolError("watch event without an integer `id`")
        if floor is not None and obj["id"] <= floor:
            raise FeedProtocolError("watch event ids are not increasing")
        floor = last = obj["id"]
        try:
            events.append(RouteEvent.from_json(obj))
        except RouteError as exc:
            invalid += 1
            log.warning("Ignoring invalid route event %d: %s", obj["id"], exc)
    return events, last, invalid


def apply_events(table: RouteTable, events: list[RouteEvent], kinds: frozenset[str] | None) -> None:
    """PUT replaces, DELETE removes; events of other kinds are ignored."""
    for event in events:
        route = event.route
        if kinds is not None and route.kind not in kinds:
            continue
        if event.type == "PUT":
            table.put(route)
        else:
            table.delete(route.kind, route.key)


# ------------------------------------------------------------------------------ I/O shell

_NETWORK_ERRORS = (
    OSError,  # includes ssl.SSLError and connection refused
    trio.TooSlowError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.ProtocolError,
    GatewayError,
    FeedProtocolError,
    ValueError,
)


class RouteFeedClient:
    """Keeps ``table`` in sync with the route feed at ``api_url`` (list + watch)."""

    def __init__(
        self,
        api_url: str,
        token: str,
        table: RouteTable,
        *,
        watch_timeout: float = 60.0,
        backoff_min: float = 0.5,
        backoff_max: float = 15.0,
        kinds: set[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_list_bytes: int = 64 * 1024 * 1024,
        max_line_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError("route feed URL must be http:// or https://")
        if not watch_timeout > 0:
            raise ValueError("watch_timeout must be positive")
        self.api_url = api_url
        self._headers = [("Authorization", f"token {token}"), ("Accept", "application/json")]
        self.table = table
        self.watch_timeout = watch_timeout
        self.kinds = frozenset(kinds) if kinds is not None else None
        self.request_timeout = request_timeout
        self.max_list_bytes = max_list_bytes
        self.max_line_bytes = max_line_bytes
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._backoff = Backoff(backoff_min, backoff_max)

        self.synced = trio.Event()
        self.state: str = "connecting"
        self.last_sync: float | None = None  # time.time() of the last complete list
        self.last_id: int | None = None
        self.last_error: str | None = None
        # counters (exported as metrics)
        self.lists = 0  # complete lists
        self.resyncs = 0  # complete lists after the first one
        self.errors = 0
        self.watch_reopens = 0  # watches reopened after watch_timeout of silence
        self.events_applied = 0
        self.invalid_routes = 0
        self._progress = trio.Event()

    def __repr__(self) -> str:  # never show the token
        return f"<RouteFeedClient {self.api_url} state={self.state}>"

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("Route feed %s: %s -> %s", self.api_url, self.state, state)
            self.state = state
        self._notify()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def wait_until(self, predicate: Callable[[RouteFeedClient], bool]) -> None:
        """Wait until ``predicate(self)`` holds; re-checked on every state or counter
        change (for tests and readiness logic; put a deadline around it)."""
        while not predicate(self):
            await self._progress.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run forever (until cancelled). Reports started immediately; wait on ``synced``
        for the first complete table."""
        task_status.started()
        async with HTTPClient(
            ssl_context=self._ssl_context, connect_timeout=self._connect_timeout
        ) as http:
            while True:
                try:
                    await self._list_and_watch(http)
                except _NETWORK_ERRORS as exc:
                    self._record_error(exc)
                except Exception as exc:  # a bug: keep serving the table, but say so loudly
                    log.exception("Unexpected error in the route feed client")
                    self._record_error(exc)
                else:
                    continue  # 410: list again right away
                self._set_state("backoff")
                delay = self._backoff.next_delay()
                log.warning(
                    "Route feed %s failed (%s); retrying in %.2fs",
                    self.api_url,
                    self.last_error,
                    delay,
                )
                await trio.sleep(delay)
                self._set_state("connecting")

    def _record_error(self, exc: BaseException) -> None:
        self.errors += 1
        text = str(exc) or type(exc).__name__
        self.last_error = f"{type(exc).__name__}: {text}"[:300]
        self._notify()

    def _watch_url(self, last_id: int) -> str:
        sep = "&" if "?" in self.api_url else "?"
        return f"{self.api_url}{sep}watch=1&last_id={last_id}"

    async def _list_and_watch(self, http: HTTPClient) -> None:
        """List, then watch until a 410 (returns) or an error (raises)."""
        self._set_state("listing")
        response = await http.fetch(
            "GET",
            self.api_url,
            headers=self._headers,
            timeout=self.request_timeout,
            max_body_bytes=self.max_list_bytes,
        )
        if response.status != 200:
            raise FeedProtocolError(f"list answered HTTP {response.status}")
        routes, last_id, invalid = parse_list_message(response.body, self.kinds)
        self.invalid_routes += invalid
        self.table.replace_all(routes)
        self.last_id = last_id
        self.last_sync = time.time()
        self.lists += 1
        if self.lists > 1:
            self.resyncs += 1
        self._backoff.reset()
        if not self.synced.is_set():
            log.info("Route feed synced: %d routes", len(self.table))
        self.synced.set()
        self._notify()

        first = True
        while True:
            try:
                await self._watch_once(http, last_id=self.last_id)
            except _Gone:
                if first:
                    # 410 for an id we were just given: do not spin list→410→list.
                    raise FeedProtocolError("watch answered 410 right after a list") from None
                log.info("Route feed asked for a full refresh (410)")
                return
            first = False

    async def _watch_once(self, http: HTTPClient, *, last_id: int) -> None:
        """One watch request. Returns after ``watch_timeout`` of silence (reopen)."""
        async with http.stream(
            "GET",
            self._watch_url(last_id),
            headers=self._headers,
            response_timeout=self.request_timeout,
        ) as response:
            if response.status == 410:
                raise _Gone()
            if response.status != 200:
                raise FeedProtocolError(f"watch answered HTTP {response.status}")
            self._set_state("watching")
            splitter = LineSplitter(self.max_line_bytes)
            try:
                async for chunk in response.iter_body(timeout=self.watch_timeout):
                    for line in splitter.feed(chunk):
                        self._apply_line(line)
            except trio.TooSlowError:
                self.watch_reopens += 1
                self._notify()
                log.debug("Route feed watch silent for %.1fs; reopening", self.watch_timeout)
                return
            raise FeedProtocolError("watch stream ended")

    def _apply_line(self, line: bytes) -> None:
        events, last, invalid = parse_events_message(line, after=self.last_id)
        if last is None:
            return  # heartbeat
        self.invalid_routes += invalid
        apply_events(self.table, events, self.kinds)
        self.events_applied += len(events)
        self.last_id = last
        self._notify()
