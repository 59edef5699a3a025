"""One small h11-based HTTP/1.1 server and client, shared by every service.

Theory of operation
-------------------
Server: ``serve_http`` accepts connections with ``trio.serve_listeners`` and runs one
``_ServerConnection`` per socket. The connection pulls h11 events under deadlines (a
keep-alive deadline while idle between requests, a header deadline once a request has
started, a body deadline per read), builds a ``Request`` whose body is *pulled lazily* by
the handler (``read_body`` buffers with a limit, ``iter_body`` streams), calls the handler,
and writes its ``Response`` (bytes with Content-Length, or an async iterable sent chunked).
A handler may instead return ``Upgrade``: the server sends the ``101`` and hands the raw
stream plus any bytes already read to ``Upgrade.relay`` (websocket passthrough).

Errors are translated here and only here: h11 protocol errors become 400/431, an oversized
body 413, a slow request 408, a ``GatewayError`` its own status, anything else a logged 500
with a request id. All of them are ``{"error": message}`` JSON bodies.

Client: ``open_http_connection`` gives an ``HTTPConnection`` (one request at a time,
keep-alive when both sides allow it). ``HTTPClient`` pools idle connections per origin and
retries once when a pooled connection turns out to have been closed by the peer.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from .errors import GatewayError

log = logging.getLogger("dask_gateway.http")

__all__ = [
    "ClientResponse",
    "HTTPClient",
    "HTTPConnection",
    "HTTPLimits",
    "Handler",
    "Headers",
    "Request",
    "Response",
    "Upgrade",
    "open_http_connection",
    "serve_http",
    "serve_http_stream",
]

READ_CHUNK = 65536


@dataclass(frozen=True)
class HTTPLimits:
    """Everything an HTTP peer controls is bounded by one of these."""

    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    send_timeout: float = 60.0


class Headers:
    """Case-insensitive multi-map of header names to values, order kept."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str | bytes, str | bytes]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(_text(k), _text(v)) for k, v in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for k, v in self._items:
            if k.lower() == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self._items if k.lower() == name]

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else value


class _BodyTooLarge(Exception):
    pass


_request_ids = itertools.count(1)
_request_id_prefix = os.urandom(3).hex()


class Request:
    """An incoming request whose body the handler pulls when it wants it."""

    def __init__(
        self,
        *,
        method: str,
        target: str,
        headers: Headers,
        client: tuple[str, int] | None,
        http_version: str,
        scheme: str,
        receive_body: Callable[[], Awaitable[bytes | None]],
        max_body_bytes: int,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.headers = headers
        self.client = client
        self.http_version = http_version
        self.scheme = scheme
        self.request_id = f"{_request_id_prefix}-{next(_request_ids)}"
        self._receive_body = receive_body
        self._max_body_bytes = max_body_bytes
        self._body: bytes | None = None
        self._query_params: dict[str, str] | None = None

    @property
    def query_params(self) -> dict[str, str]:
        if self._query_params is None:
            params: dict[str, str] = {}
            for key, value in parse_qsl(self.query, keep_blank_values=True):
                params.setdefault(key, value)
            self._query_params = params
        return self._query_params

    async def iter_body(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._receive_body()
            if chunk is None:
                return
            if chunk:
                yield chunk

    async def read_body(self, limit: int | None = None) -> bytes:
        if self._body is not None:
            return self._body
        limit = self._max_body_bytes if limit is None else limit
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_body():
            size += len(chunk)
            if size > limit:
                raise GatewayError(f"Request body exceeds the limit of {limit} bytes", status=413)
            parts.append(chunk)
        self._body = b"".join(parts)
        return self._body

    async def json(self) -> Any:
        body = await self.read_body()
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise GatewayError(f"Malformed JSON body: {exc}", status=400) from None


@dataclass
class Response:
    """A response: ``body`` is bytes (sent with Content-Length) or an async iterable
    (sent chunked, streamed until it ends or the client goes away)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterable[bytes] = b""

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
        body = json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, [("Content-Type", "application/json"), *headers], body)

    @classmethod
    def error(cls, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
        return cls.json({"error": message}, status=status, headers=headers)

    @classmethod
    def text(cls, status: int, text: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
        return cls(status, [("Content-Type", "text/plain; charset=utf-8"), *headers], text.encode())

    @classmethod
    def empty(cls, status: int = 204, headers: Iterable[tuple[str, str]] = ()) -> Response:
        return cls(status, list(headers), b"")


@dataclass
class Upgrade:
    """Accept an HTTP/1.1 upgrade: send ``status`` with ``headers``, then hand the raw
    stream and the bytes already read from the client to ``relay``."""

    headers: list[tuple[str, str]]
    relay: Callable[[trio.abc.Stream, bytes], Awaitable[None]]
    status: int = 101
    #: Called instead of ``relay`` when the upgrade cannot be completed (e.g. the client
    #: went away before the 101 was sent), so the handler can release what it holds.
    on_abort: Callable[[], Awaitable[None]] | None = None


Handler = Callable[[Request], Awaitable[Response | Upgrade]]


class _Timeout(Exception):
    pass


class _ServerConnection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        handler: Handler,
        limits: HTTPLimits,
        client: tuple[str, int] | None,
        scheme: str,
    ) -> None:
        self.stream = stream
        self.handler = handler
        self.limits = limits
        self.client = client
        self.scheme = scheme
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)

    async def _next_event(self, timeout: float) -> Any:
        """Next h11 event, all of it within ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while True:
                event = self.conn.next_event()
                if event is not h11.NEED_DATA:
                    return event
                self.conn.receive_data(await self.stream.receive_some(READ_CHUNK))
        raise _Timeout

    async def _wait_for_request_start(self) -> bool:
        """Wait (up to the keep-alive timeout) for the first byte of the next request."""
        if self.conn.trailing_data[0]:
            return True
        with trio.move_on_after(self.limits.keepalive_timeout):
            data = await self.stream.receive_some(READ_CHUNK)
            self.conn.receive_data(data)
            return bool(data)
        return False

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            with trio.fail_after(self.limits.send_timeout):
                await self.stream.send_all(data)

    async def run(self) -> None:
        while True:
            if not await self._wait_for_request_start():
                return  # idle keep-alive connection, or the client closed: just close
            try:
                event = await self._next_event(self.limits.header_timeout)
            except _Timeout:
                await self._send_error_and_close(408, "Timed out reading the request headers")
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                message = (
                    "Request headers too large"
                    if status == 431
                    else f"Malformed HTTP request: {exc}"
                )
                await self._send_error_and_close(status, message)
                return
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return
            if not isinstance(event, h11.Request):
                return
            # h11 bounds only *incomplete* heads; a complete one read in a single chunk
            # can still be larger than we allow.
            head_size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if head_size > self.limits.max_header_bytes:
                await self._send_error_and_close(431, "Request headers too large")
                return
            keep_going = await self._handle(event)
            if not keep_going:
                return

    async def _receive_body_chunk(self) -> bytes | None:
        if self.conn.their_state is not h11.SEND_BODY:
            return None
        if self.conn.they_are_waiting_for_100_continue:
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        try:
            event = await self._next_event(self.limits.body_timeout)
        except _Timeout:
            raise GatewayError("Timed out reading the request body", status=408) from None
        except h11.RemoteProtocolError as exc:
            raise GatewayError(f"Malformed request body: {exc}", status=400) from None
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        raise GatewayError("Connection closed while reading the request body", status=400)

    async def _handle(self, event: h11.Request) -> bool:
        request = Request(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("latin-1"),
            headers=Headers(event.headers),
            client=self.client,
            http_version=event.http_version.decode("ascii", "replace"),
            scheme=self.scheme,
            receive_body=self._receive_body_chunk,
            max_body_bytes=self.limits.max_body_bytes,
        )
        try:
            response = await self.handler(request)
        except GatewayError as exc:
            response = Response.error(exc.status, exc.message, exc.headers)
        except Exception:
            log.exception(
                "Unhandled error in %s %s (request id %s)",
                request.method,
                request.path,
                request.request_id,
            )
            response = Response.error(
                500, f"Internal server error (request id {request.request_id})"
            )
        if isinstance(response, Upgrade):
            return await self._upgrade(response)
        try:
            await self._send_response(request, response)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            return False
        except h11.LocalProtocolError:
            log.debug("Could not complete response to %s", request.request_id, exc_info=True)
            return False
        return await self._finish_cycle()

    async def _send_response(self, request: Request, response: Response) -> None:
        given_length = None
        headers = []
        for name, value in response.headers:
            if name.lower() == "content-length":
                given_length = value
            else:
                headers.append((name, value))
        streaming = not isinstance(response.body, bytes | bytearray)
        no_body = request.method == "HEAD" or response.status in (204, 304)
        if not streaming and request.method != "HEAD" and response.status != 204:
            headers.append(("Content-Length", str(len(response.body))))  # type: ignore[arg-type]
        elif given_length is not None and response.status != 204:
            # A streamed body (or a HEAD answer) of a size the handler knows, e.g. a
            # proxied response: keep it; h11 checks that the body matches it.
            headers.append(("Content-Length", given_length))
        elif not streaming and request.method == "HEAD":
            headers.append(("Content-Length", str(len(response.body))))  # type: ignore[arg-type]
        await self._send(h11.Response(status_code=response.status, headers=headers))
        if no_body:
            if streaming and hasattr(response.body, "aclose"):
                await response.body.aclose()  # type: ignore[union-attr]
        elif streaming:
            body = response.body
            try:
                async for chunk in body:  # type: ignore[union-attr]
                    if chunk:
                        await self._send(h11.Data(data=chunk))
            finally:
                if hasattr(body, "aclose"):
                    with trio.CancelScope(shield=True):
                        await body.aclose()  # type: ignore[union-attr]
        elif response.body:
            await self._send(h11.Data(data=response.body))
        await self._send(h11.EndOfMessage())

    async def _finish_cycle(self) -> bool:
        """Drain what is left of the request body, then get ready for the next request."""
        if self.conn.our_state is h11.MUST_CLOSE:
            return False
        drained = 0
        while self.conn.their_state is h11.SEND_BODY:
            try:
                chunk = await self._receive_body_chunk()
            except GatewayError:
                return False
            if chunk is None:
                break
            drained += len(chunk)
            if drained > self.limits.max_body_bytes:
                return False
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            return True
        return False

    async def _upgrade(self, upgrade: Upgrade) -> bool:
        try:
            # The upgrade request has no body we care about; h11 pauses after it.
            while self.conn.their_state is h11.SEND_BODY:
                if await self._receive_body_chunk() is None:
                    break
            await self._send(
                h11.InformationalResponse(status_code=upgrade.status, headers=upgrade.headers)
            )
        except (
            GatewayError,
            h11.LocalProtocolError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
        ):
            log.debug("Upgrade failed", exc_info=True)
            if upgrade.on_abort is not None:
                with trio.CancelScope(shield=True):
                    await upgrade.on_abort()
            return False
        trailing, _closed = self.conn.trailing_data
        await upgrade.relay(self.stream, bytes(trailing))
        return False

    async def linger(self, timeout: float = 2.0, max_bytes: int = 64 * 1024 * 1024) -> None:
        """Closing with a request body still unread would make the kernel reset the
        connection, and the client (or a proxy in front of us) could lose the answer we
        just sent. So half-close, and read and discard for a bounded while first."""
        if self.conn.their_state is not h11.SEND_BODY:
            return
        with trio.move_on_after(timeout):
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
            drained = 0
            while drained < max_bytes:
                data = await self.stream.receive_some(READ_CHUNK)
                if not data:
                    break
                drained += len(data)

    async def _send_error_and_close(self, status: int, message: str) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = Response.error(status, message, [("Connection", "close")])
        try:
            await self._send(
                h11.Response(
                    status_code=status,
                    headers=[*response.headers, ("Content-Length", str(len(response.body)))],
                )
            )
            await self._send(h11.Data(data=response.body))
            await self._send(h11.EndOfMessage())
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.TooSlowError):
            pass
        except trio.ClosedResourceError:
            pass


def _peer_of(stream: trio.abc.Stream) -> tuple[str, int] | None:
    inner = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    if sock is None:
        return None
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    return (peer[0], peer[1]) if isinstance(peer, tuple) else None


ConnectionCounter = Callable[[int], None]


async def serve_http_stream(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    limits: HTTPLimits = HTTPLimits(),
    scheme: str | None = None,
    count_connection: ConnectionCounter | None = None,
) -> None:
    """Serve HTTP/1.1 on one already-accepted stream until the connection ends.

    ``count_connection`` (optional) is called with +1 when the connection starts being
    served and -1 when it ends, for connection metrics.
    """
    if scheme is None:
        scheme = "https" if isinstance(stream, trio.SSLStream) else "http"
    connection = _ServerConnection(stream, handler, limits, _peer_of(stream), scheme)
    if count_connection is not None:
        count_connection(1)
    try:
        await connection.run()
        await connection.linger()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass
    except ssl.SSLError as exc:
        log.debug("TLS error from %s: %s", connection.client, exc)
    finally:
        if count_connection is not None:
            count_connection(-1)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: HTTPLimits = HTTPLimits(),
    ssl_context: ssl.SSLContext | None = None,
    count_connection: ConnectionCounter | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``host:port``; reports the bound ``(host, port)`` when ready."""
    listeners: list[trio.abc.Listener[Any]] = list(await trio.open_tcp_listeners(port, host=host))
    sock = listeners[0].socket  # type: ignore[attr-defined]
    bound = sock.getsockname()
    if ssl_context is not None:
        listeners = [
            trio.SSLListener(listener, ssl_context, https_compatible=True) for listener in listeners
        ]

    async def on_connection(stream: trio.abc.Stream) -> None:
        await serve_http_stream(stream, handler, limits=limits, count_connection=count_connection)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, on_connection, listeners)
        task_status.started((bound[0], bound[1]))


# --------------------------------------------------------------------------- client


class ClientResponse:
    """Response to an ``HTTPConnection.request``; read the body before the next request."""

    def __init__(
        self, connection: HTTPConnection, event: h11.Response | h11.InformationalResponse
    ) -> None:
        self._connection = connection
        self.status: int = event.status_code
        self.reason: str = event.reason.decode("latin-1")
        self.headers = Headers(event.headers)
        self.http_version = event.http_version.decode("ascii", "replace")
        self.body: bytes = b""
        self.upgraded_stream: trio.abc.Stream | None = None
        self.trailing: bytes = b""

    async def iter_body(self, timeout: float | None = None) -> AsyncIterator[bytes]:
        """Stream the body; ``timeout`` bounds each read (not the whole body)."""
        while True:
            event = await self._connection._next_event(timeout)
            if isinstance(event, h11.Data):
                if event.data:
                    yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._connection._response_done()
                return
            else:
                raise trio.BrokenResourceError(f"Connection ended mid-body ({event!r})")

    async def read(self, limit: int | None = None, timeout: float | None = None) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_body(timeout):
            size += len(chunk)
            if limit is not None and size > limit:
                raise GatewayError(f"Response body exceeds {limit} bytes", status=502)
            parts.append(chunk)
        self.body = b"".join(parts)
        return self.body

    def json(self) -> Any:
        return json.loads(self.body)


class HTTPConnection:
    """A client connection carrying one request at a time (keep-alive when possible)."""

    def __init__(self, stream: trio.abc.Stream, host_header: str) -> None:
        self.stream = stream
        self.host_header = host_header
        self.conn = h11.Connection(h11.CLIENT)
        self.requests_sent = 0

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE

    async def _next_event(self, timeout: float | None) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.fail_after(timeout if timeout is not None else float("inf")):
                data = await self.stream.receive_some(READ_CHUNK)
            self.conn.receive_data(data)

    def _response_done(self) -> None:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | AsyncIterable[bytes] = b"",
        *,
        response_timeout: float | None = None,
    ) -> ClientResponse:
        """Send a request and return once the response head has arrived."""
        headers = list(headers)
        names = {k.lower() for k, _ in headers}
        if "host" not in names:
            headers.insert(0, ("Host", self.host_header))
        streaming = not isinstance(body, bytes | bytearray)
        if (
            not streaming
            and "content-length" not in names
            and (body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"))
        ):
            headers.append(("Content-Length", str(len(body))))
        elif streaming and "content-length" not in names and "transfer-encoding" not in names:
            headers.append(("Transfer-Encoding", "chunked"))
        self.requests_sent += 1
        await self._send(h11.Request(method=method, target=target, headers=headers))
        try:
            if streaming:
                async for chunk in body:  # type: ignore[union-attr]
                    if chunk:
                        await self._send(h11.Data(data=chunk))
            elif body:
                await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The server may have answered early (413, 401...) and closed: its answer,
            # if it reached us, is worth more than the broken pipe.
            try:
                return await self._receive_response_head(
                    response_timeout if response_timeout is not None else 5.0
                )
            except (trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError):
                pass
            raise
        return await self._receive_response_head(response_timeout)

    async def _receive_response_head(self, response_timeout: float | None) -> ClientResponse:
        while True:
            event = await self._next_event(response_timeout)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    response = ClientResponse(self, event)
                    response.upgraded_stream = self.stream
                    response.trailing = bytes(self.conn.trailing_data[0])
                    return response
                continue  # 100 Continue and friends
            if isinstance(event, h11.Response):
                return ClientResponse(self, event)
            raise trio.BrokenResourceError(f"Connection closed before a response ({event!r})")

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def open_http_connection(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = 10.0,
) -> HTTPConnection:
    """Connect to ``host:port`` (TLS when ``ssl_context`` is given)."""
    with trio.fail_after(connect_timeout):
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if ssl_context is not None:
            ssl_stream = trio.SSLStream(
                stream,
                ssl_context,
                server_hostname=server_hostname or host,
                https_compatible=True,
            )
            await ssl_stream.do_handshake()
            stream = ssl_stream
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return HTTPConnection(stream, host_header)


def _origin(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.scheme, parts.hostname, port, target


class HTTPClient:
    """A small pooled HTTP client (keep-alive per origin, bounded idle pool)."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        max_idle_per_origin: int = 8,
    ) -> None:
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_per_origin
        self._idle: dict[tuple[str, str, int], list[HTTPConnection]] = {}

    async def __aenter__(self) -> HTTPClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        with trio.CancelScope(shield=True):
            for connections in idle.values():
                for connection in connections:
                    await connection.aclose()

    async def _connect(self, scheme: str, host: str, port: int) -> HTTPConnection:
        context = None
        if scheme == "https":
            context = self._ssl_context or ssl.create_default_context()
        return await open_http_connection(
            host, port, ssl_context=context, connect_timeout=self._connect_timeout
        )

    async def _release(self, key: tuple[str, str, int], connection: HTTPConnection) -> None:
        pool = self._idle.setdefault(key, [])
        if connection.reusable and len(pool) < self._max_idle:
            pool.append(connection)
        else:
            await connection.aclose()

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        response_timeout: float | None = None,
    ) -> AsyncIterator[ClientResponse]:
        """Send a request; yield the response with its body still to be read."""
        scheme, host, port, target = _origin(url)
        key = (scheme, host, port)
        headers = list(headers)
        pooled = self._idle.get(key)
        connection = pooled.pop() if pooled else None
        response = None
        if connection is not None:
            try:
                response = await connection.request(
                    method, target, headers, body, response_timeout=response_timeout
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                await connection.aclose()  # stale keep-alive connection: retry once, fresh
                connection = None
        if connection is None:
            connection = await self._connect(scheme, host, port)
            try:
                response = await connection.request(
                    method, target, headers, body, response_timeout=response_timeout
                )
            except BaseException:
                await connection.aclose()
                raise
        assert response is not None
        try:
            yield response
        except BaseException:
            await connection.aclose()
            raise
        await self._release(key, connection)

    async def fetch(
        self,
        method: str,
        url: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        timeout: float = 30.0,
        max_body_bytes: int = 16 * 1024 * 1024,
    ) -> ClientResponse:
        """Send a request and read the whole response (``.body``) within ``timeout``."""
        with trio.fail_after(timeout):
            async with self.stream(method, url, headers=headers, body=body) as response:
                await response.read(limit=max_body_bytes)
        return response
