"""One small HTTP/1.1 server and client, shared by every service.

Theory of operation
-------------------
Parsing and encoding are sans-IO, in :mod:`.http1` (request and response heads, body
framing, chunked bodies); this module is the I/O shell around it. (It used to drive h11;
h11's exception types are kept so callers that catch ``h11.ProtocolError`` still work.)

Server: ``serve_http`` accepts connections with ``trio.serve_listeners`` and runs one
``_ServerConnection`` per socket. The connection reads request heads under deadlines (a
keep-alive deadline while idle between requests, a header deadline once a request has
started, a body deadline per read), builds a ``Request`` whose body is *pulled lazily* by
the handler (``read_body`` buffers with a limit, ``iter_body`` streams), calls the handler,
and writes its ``Response`` (bytes with Content-Length, or an async iterable sent chunked,
or with the Content-Length the handler gave). A handler may instead return ``Upgrade``:
the server sends the ``101`` and hands the raw stream plus any bytes already read to
``Upgrade.relay`` (websocket passthrough). After a response the rest of the request body
is drained (bounded), and the next request is read from the same buffer (pipelining).

Errors are translated here and only here: malformed requests become 400 (431 for heads
that are too large, 501 for an unsupported transfer coding, 505 for a version other than
HTTP/1.x), an oversized body 413, a slow request 408, a ``GatewayError`` its own status,
anything else a logged 500 with a request id. All of them are ``{"error": message}`` JSON
bodies.

Client: ``open_http_connection`` gives an ``HTTPConnection`` (one request at a time,
keep-alive when both sides allow it: HTTP/1.1 and no ``Connection: close``).
``HTTPClient`` pools idle connections per origin and retries once when a pooled
connection turns out to have been closed by the peer.

Fast paths (the web proxy moves every byte of a dashboard through here)
-------------------------------------------------------------------------
* Byte I/O goes through :class:`.http_wire.Wire`: the syscall first, a deadline (and a
  trip through trio's scheduler) only when it must wait.
* A message with a small bytes body goes out in one write, head and body together.
* A Content-Length body is read straight from the socket once the buffered bytes are used
  up, at most the bytes still due (never past the end of the message, so nothing is
  copied through the buffer) and at most ``BODY_CHUNK`` per read; a streamed body of a
  declared length is written chunk by chunk as it comes, counted against that length (too
  much or too little is a ``h11.LocalProtocolError`` and the connection is not reused).
* A ``Passthrough`` body (a proxy forwarding an upstream response of known length) goes
  socket to socket with ``os.splice`` when both are plain sockets: no Python work per
  byte (about half the Go proxy's CPU per GiB, bench/proxies.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from .errors import GatewayError
from .http1 import (
    ChunkedReader,
    RequestHead,
    ResponseHead,
    asks_to_close,
    encode_chunk,
    encode_request_head,
    encode_response_head,
    expects_continue,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
)
from .http_wire import SPLICE_AVAILABLE, YIELD_EVERY, UpstreamBroke, Wire, splice_exactly

log = logging.getLogger("dask_gateway.http")

__all__ = [
    "BODY_CHUNK",
    "ClientResponse",
    "HTTPClient",
    "HTTPConnection",
    "HTTPLimits",
    "Handler",
    "Headers",
    "Passthrough",
    "Request",
    "Response",
    "Upgrade",
    "open_http_connection",
    "serve_http",
    "serve_http_stream",
]

#: Bytes asked of the socket while reading message heads (and chunked bodies).
READ_CHUNK = 65536
#: Bytes asked of the socket per read of a Content-Length body (the raw path).
BODY_CHUNK = 256 * 1024
# A bytes body up to this size is copied behind its head and sent in the same write.
_COALESCE_MAX = 64 * 1024


async def _read_length_framed(buf: bytearray, wire: Wire, left: int, timeout: float) -> bytes:
    """Up to ``left`` bytes of a Content-Length body: what ``buf`` already holds first,
    else straight from the socket, never past the end of the body. ``b""`` = peer gone."""
    if buf:
        if len(buf) <= left:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:left])
            del buf[:left]
        return data
    return await wire.receive(min(left, BODY_CHUNK), timeout)


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

    __slots__ = ("_items", "_lower")

    def __init__(self, items: Iterable[tuple[str | bytes, str | bytes]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(_text(k), _text(v)) for k, v in items]
        self._lower = False  # whether every name is known to be lower-case already

    @classmethod
    def _from_parsed(cls, items: Iterable[tuple[bytes, bytes]]) -> Headers:
        """From parsed (lower-cased) names and values."""
        headers = cls.__new__(cls)
        headers._items = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in items]
        headers._lower = True
        return headers

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        if self._lower:
            for k, v in self._items:
                if k == name:
                    return v
            return default
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


def _asks_to_close_text(headers: Iterable[tuple[str, str]]) -> bool:
    for name, value in headers:
        if name.lower() == "connection" and "close" in (
            t.strip().lower() for t in value.split(",")
        ):
            return True
    return False


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
    (sent chunked, streamed until it ends or the client goes away; sent as is when the
    headers give its Content-Length)."""

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


class _PeerGone(Exception):
    pass


# --------------------------------------------------------------------------- server


class _ServerConnection:
    """One client connection: requests parsed by :mod:`.http1`, one at a time."""

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
        self.wire = Wire(stream)
        self._buf = bytearray()  # received, not yet consumed (pipelined bytes included)
        self._new_cycle_state()

    def _new_cycle_state(self) -> None:
        self._framing = "length"  # of the request body: "length" or "chunked"
        self._left = 0  # request body bytes still due ("length" framing)
        self._chunks: ChunkedReader | None = None
        self._body_done = True  # the request body has been read to its end
        self._expect_continue = False  # the client waits for "100 Continue"
        self._response_started = False
        self._responded = False  # the whole response has been sent
        self._keep_alive = True
        self._http11 = True

    async def _read_head(self) -> RequestHead | None:
        """The next request head; None when the connection ends (or idles out) between
        requests. Raises ``_Timeout`` (slow head) and ``h11.RemoteProtocolError``."""
        buf = self._buf
        wire = self.wire
        limits = self.limits
        if not buf:
            try:
                data = await wire.receive(READ_CHUNK, limits.keepalive_timeout)
            except trio.TooSlowError:
                return None  # idle keep-alive connection: just close
            if not data:
                return None
            buf += data
        deadline = trio.current_time() + limits.header_timeout
        searched = 0
        while True:
            parsed = parse_request_head(buf, searched - 3, limits.max_header_bytes)
            if parsed is not None:
                head, size = parsed
                del buf[:size]
                return head
            searched = len(buf)
            try:
                data = await wire.receive(READ_CHUNK, deadline - trio.current_time())
            except trio.TooSlowError:
                raise _Timeout from None
            if not data:
                return None  # the client gave up mid-head
            buf += data

    async def run(self) -> None:
        while True:
            try:
                head = await self._read_head()
                if head is None:
                    return
                self._start_cycle(head)
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
            if not await self._handle(head):
                return

    def _start_cycle(self, head: RequestHead) -> None:
        self._new_cycle_state()
        self._http11 = head.http_version >= b"1.1"
        self._keep_alive = not asks_to_close(head.http_version, head.headers)
        framing, length = request_framing(head)
        self._framing = framing
        self._left = length
        if framing == "chunked":
            self._chunks = ChunkedReader()
            self._body_done = False
        else:
            self._body_done = length == 0
        self._expect_continue = not self._body_done and expects_continue(head)

    async def _receive_body_chunk(self) -> bytes | None:
        """The next piece of the request body (never empty); None at its end."""
        if self._body_done:
            return None
        if self._expect_continue:
            self._expect_continue = False
            if not self._response_started:
                await self.wire.send_all(b"HTTP/1.1 100 Continue\r\n\r\n", self.limits.send_timeout)
        buf = self._buf
        timeout = self.limits.body_timeout
        try:
            if self._framing == "length":
                left = self._left
                data = await _read_length_framed(buf, self.wire, left, timeout)
                if not data:
                    raise _PeerGone
                self._left = left = left - len(data)
                self._body_done = left == 0
                return data
            chunks = self._chunks
            assert chunks is not None
            while True:
                data = chunks.read(buf, BODY_CHUNK)
                if data is None:
                    more = await self.wire.receive(BODY_CHUNK, timeout)
                    if not more:
                        raise _PeerGone
                    buf += more
                    continue
                if not data:
                    self._body_done = True
                    return None
                return data
        except trio.TooSlowError:
            self._keep_alive = False  # where the next request starts is unknown now
            raise GatewayError("Timed out reading the request body", status=408) from None
        except h11.RemoteProtocolError as exc:
            self._keep_alive = False
            self._body_done = True  # framing is lost: nothing more to read (or linger on)
            raise GatewayError(f"Malformed request body: {exc}", status=400) from None
        except _PeerGone:
            self._keep_alive = False
            self._body_done = True
            raise GatewayError(
                "Connection closed while reading the request body", status=400
            ) from None

    async def _handle(self, head: RequestHead) -> bool:
        request = Request(
            method=head.method.decode("ascii"),
            target=head.target.decode("ascii"),
            headers=Headers._from_parsed(head.headers),
            client=self.client,
            http_version=head.http_version.decode("ascii"),
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
        body = response.body
        streaming = not isinstance(body, bytes | bytearray)
        try:
            head, length, chunked = self._response_head(request, response)
        except h11.LocalProtocolError as exc:
            # A handler bug (a bad status or a header that would break the message):
            # nothing is sent yet, so the client gets a 500 instead.
            log.error("Invalid response to %s: %s", request.request_id, exc)
            if streaming and hasattr(body, "aclose"):
                await body.aclose()  # type: ignore[union-attr]
            await self._send_error_and_close(
                500, f"Internal server error (request id {request.request_id})"
            )
            return
        self._response_started = True
        wire = self.wire
        timeout = self.limits.send_timeout
        if request.method == "HEAD" or response.status in (204, 304):
            if streaming and hasattr(body, "aclose"):
                await body.aclose()  # type: ignore[union-attr]
            await wire.send_all(head, timeout)
        elif not streaming:
            if len(body) <= _COALESCE_MAX:  # type: ignore[arg-type]
                await wire.send_all(head + body, timeout)  # type: ignore[operator]
            else:
                await wire.send_all(head, timeout)
                await wire.send_all(body, timeout)  # type: ignore[arg-type]
        else:
            await wire.send_all(head, timeout)
            if isinstance(body, Passthrough) and length is not None and not chunked:
                await body._send(wire, length, timeout)
            else:
                await self._send_streamed_body(body, length, chunked)  # type: ignore[arg-type]
        self._responded = True

    def _response_head(
        self, request: Request, response: Response
    ) -> tuple[bytes, int | None, bool]:
        """The encoded head, the body length it announces (None: none) and whether the
        body is chunked; decides keep-alive. Raises ``h11.LocalProtocolError``."""
        status = response.status
        if not 200 <= status <= 999:
            raise h11.LocalProtocolError(f"Handler answered with status {status}")
        given_length = None
        headers = []
        for name, value in response.headers:
            if name.lower() == "content-length":
                given_length = value.strip()
            else:
                headers.append((name, value))
        body = response.body
        streaming = not isinstance(body, bytes | bytearray)
        head_only = request.method == "HEAD"
        length: int | None = None
        if not streaming and not head_only and status != 204:
            length = len(body)  # type: ignore[arg-type]
        elif given_length is not None and status != 204:
            # A streamed body (or a HEAD answer) of a size the handler knows, e.g. a
            # proxied response: keep it; its body must match it.
            if not given_length.isdigit():
                raise h11.LocalProtocolError("Bad Content-Length from the handler")
            length = int(given_length)
        elif not streaming and head_only:
            length = len(body)  # type: ignore[arg-type]
        if length is not None:
            headers.append(("Content-Length", str(length)))
        chunked = streaming and length is None and not (head_only or status in (204, 304))
        keep_alive = self._keep_alive
        if chunked and not self._http11:
            # an HTTP/1.0 client knows no chunked encoding: the body ends with the
            # connection
            chunked = False
            keep_alive = False
        if chunked:
            headers.append(("Transfer-Encoding", "chunked"))
        if _asks_to_close_text(headers):
            keep_alive = False
        elif not keep_alive:
            headers.append(("Connection", "close"))
        head = encode_response_head(status, headers)
        self._keep_alive = keep_alive
        return head, length, chunked

    async def _send_streamed_body(
        self, body: AsyncIterable[bytes], length: int | None, chunked: bool
    ) -> None:
        """Send chunks as they come: counted against ``length`` when given (too much or
        too little is a ``h11.LocalProtocolError``), chunk-encoded when ``chunked``,
        else as is (an HTTP/1.0 client: the end of the connection ends the body)."""
        sent = 0
        count = 0
        wire = self.wire
        timeout = self.limits.send_timeout
        chunks = aiter(body)
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                sent += len(chunk)
                if length is not None and sent > length:
                    raise h11.LocalProtocolError("Too much data for declared Content-Length")
                if not chunked:
                    await wire.send_all(chunk, timeout)
                else:
                    before, after = encode_chunk(chunk)
                    if len(chunk) <= _COALESCE_MAX:
                        await wire.send_all(before + chunk + after, timeout)
                    else:
                        await wire.send_all(before, timeout)
                        await wire.send_all(chunk, timeout)
                        await wire.send_all(after, timeout)
                count += 1
                if count % YIELD_EVERY == 0:
                    await trio.lowlevel.checkpoint()
        finally:
            with trio.CancelScope(shield=True):
                if hasattr(chunks, "aclose"):
                    await chunks.aclose()
                if chunks is not body and hasattr(body, "aclose"):
                    await body.aclose()
        if length is not None and sent != length:
            raise h11.LocalProtocolError("Too little data for declared Content-Length")
        if chunked:
            await wire.send_all(b"0\r\n\r\n", timeout)

    async def _finish_cycle(self) -> bool:
        """Drain what is left of the request body, then get ready for the next request."""
        if not (self._responded and self._keep_alive):
            return False
        if self._expect_continue:
            return False  # we answered without asking for the body: it is not coming
        drained = 0
        while not self._body_done:
            try:
                chunk = await self._receive_body_chunk()
            except GatewayError:
                return False
            if chunk is None:
                break
            drained += len(chunk)
            if drained > self.limits.max_body_bytes:
                return False
        return True  # pipelined bytes, if any, wait in the buffer

    async def _upgrade(self, upgrade: Upgrade) -> bool:
        try:
            # The upgrade request has no body we care about.
            while await self._receive_body_chunk() is not None:
                pass
            self._response_started = True
            await self.wire.send_all(
                encode_response_head(upgrade.status, upgrade.headers), self.limits.send_timeout
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
        trailing = bytes(self._buf)
        self._buf.clear()
        await upgrade.relay(self.stream, trailing)
        return False

    async def linger(self, timeout: float = 2.0, max_bytes: int = 64 * 1024 * 1024) -> None:
        """Closing with a request body still unread would make the kernel reset the
        connection, and the client (or a proxy in front of us) could lose the answer we
        just sent. So half-close, and read and discard for a bounded while first."""
        if self._body_done or not self._response_started:
            return
        with trio.move_on_after(timeout):
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
            drained = 0
            while drained < max_bytes:
                data = await self.stream.receive_some(BODY_CHUNK)
                if not data:
                    break
                drained += len(data)

    async def _send_error_and_close(self, status: int, message: str) -> None:
        if self._response_started:
            return
        self._response_started = True
        response = Response.error(status, message, [("Connection", "close")])
        body = response.body
        assert isinstance(body, bytes)
        head = encode_response_head(status, [*response.headers, ("Content-Length", str(len(body)))])
        try:
            await self.wire.send_all(head + body, self.limits.send_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
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

    def __init__(self, connection: HTTPConnection, head: ResponseHead) -> None:
        self._connection = connection
        self.status: int = head.status
        self.reason: str = head.reason.decode("latin-1")
        self.headers = Headers._from_parsed(head.headers)
        self.http_version = head.http_version.decode("ascii", "replace")
        self.body: bytes = b""
        self.upgraded_stream: trio.abc.Stream | None = None
        self.trailing: bytes = b""
        self._finished = False
        #: The body's size when Content-Length frames it (None: chunked, read to the
        #: close, or an upgrade).
        self.content_length: int | None = None

    async def iter_body(self, timeout: float | None = None) -> AsyncIterator[bytes]:
        """Stream the body; ``timeout`` bounds each read (not the whole body)."""
        if self._finished:
            return
        connection = self._connection
        limit = math.inf if timeout is None else timeout
        while True:
            chunk = await connection._receive_body_chunk(limit)
            if chunk is None:
                self._finished = True
                return
            yield chunk

    async def read(self, limit: int | None = None, timeout: float | None = None) -> bytes:
        """The whole body (``limit``: at most that many bytes, else a 502 GatewayError)."""
        parts: list[bytes] = []
        size = 0
        if not self._finished:
            receive = self._connection._receive_body_chunk
            wait = math.inf if timeout is None else timeout
            while (chunk := await receive(wait)) is not None:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise GatewayError(f"Response body exceeds {limit} bytes", status=502)
                parts.append(chunk)
            self._finished = True
        self.body = parts[0] if len(parts) == 1 else b"".join(parts)
        return self.body

    def json(self) -> Any:
        return json.loads(self.body)


class Passthrough:
    """A response body forwarded from an upstream response (a proxy's answer).

    ``Response(status, headers, Passthrough(upstream))`` sends the body of ``upstream`` (a
    ``ClientResponse`` whose body is still unread). When both connections are plain
    sockets and the body has a Content-Length that the response's headers repeat, the
    bytes go socket to socket with ``os.splice`` and never enter Python; otherwise it is
    an ordinary async iterable of chunks. ``idle_timeout`` bounds each wait for upstream
    bytes; ``on_bytes(n)`` is called as bytes go out; ``on_end(complete)`` is awaited once,
    when the body has gone through completely (True) or not (False: the upstream
    connection must then be closed). If the *upstream* fails mid-body, ``upstream_error``
    is set and the server aborts the client connection rather than end the response as if
    it were complete.
    """

    def __init__(
        self,
        source: ClientResponse,
        *,
        idle_timeout: float = math.inf,
        on_bytes: Callable[[int], None] | None = None,
        on_end: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.source = source
        self.idle_timeout = idle_timeout
        self.on_bytes = on_bytes
        self.on_end = on_end
        self.upstream_error: BaseException | None = None
        self._ended = False

    async def _end(self, complete: bool) -> None:
        if self._ended:
            return
        self._ended = True
        if self.on_end is not None:
            with trio.CancelScope(shield=True):
                await self.on_end(complete)

    async def aclose(self) -> None:
        """Give up on the body (if it has not gone through): ``on_end(False)``."""
        await self._end(False)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        on_bytes = self.on_bytes
        complete = False
        try:
            try:
                async for chunk in self.source.iter_body(self.idle_timeout):
                    if on_bytes is not None:
                        on_bytes(len(chunk))
                    yield chunk
                complete = True
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError) as exc:
                self.upstream_error = exc
                raise trio.BrokenResourceError("the upstream broke off the response") from exc
        finally:
            await self._end(complete)

    async def _send(self, wire: Wire, length: int, timeout: float) -> None:
        """Send the body on the server's ``wire``; spliced when possible."""
        source = self.source
        upstream = source._connection
        src = upstream._wire.fileno()
        dst = wire.fileno()
        if (
            not SPLICE_AVAILABLE
            or src is None
            or dst is None
            or source._finished
            or upstream._framing != "length"
            or upstream._left != length
        ):
            await self._send_chunks(wire, length, timeout)
            return
        complete = False
        try:
            buffered = upstream._buf  # body bytes that came in with the head
            if buffered:
                data = bytes(buffered[: upstream._left])
                del buffered[: len(data)]  # anything past the body stays (and is refused)
                upstream._left -= len(data)
                await wire.send_all(data, timeout)
                if self.on_bytes is not None:
                    self.on_bytes(len(data))
            await splice_exactly(
                src,
                dst,
                upstream._left,
                read_timeout=self.idle_timeout,
                write_timeout=timeout,
                on_bytes=self.on_bytes,
            )
            upstream._left = 0
            upstream._response_done()
            source._finished = True
            complete = True
        except UpstreamBroke as exc:
            self.upstream_error = exc
            raise
        finally:
            await self._end(complete)

    async def _send_chunks(self, wire: Wire, length: int, timeout: float) -> None:
        sent = 0
        try:
            async with aclosing(self.__aiter__()) as chunks:
                async for chunk in chunks:
                    sent += len(chunk)
                    if sent > length:
                        raise h11.LocalProtocolError("Too much data for declared Content-Length")
                    await wire.send_all(chunk, timeout)
        finally:
            await self.aclose()
        if sent != length:
            raise h11.LocalProtocolError("Too little data for declared Content-Length")


# HTTPConnection states
_IDLE = "idle"  # ready for a request
_BUSY = "busy"  # a request/response exchange is under way
_CLOSED = "closed"  # cannot carry another request (closed, upgraded, or broken mid-way)


class HTTPConnection:
    """A client connection carrying one request at a time (keep-alive when possible).

    Messages are encoded and parsed by :mod:`.http1` (not h11); see "Fast paths" in the
    module docstring for how bodies move.
    """

    def __init__(self, stream: trio.abc.Stream, host_header: str) -> None:
        self.stream = stream
        self.host_header = host_header
        self.requests_sent = 0
        self._wire = Wire(stream)
        self._buf = bytearray()  # received, not yet consumed
        self._state = _IDLE
        self._method = "GET"
        self._request_sent = False
        self._keep_alive = True
        self._framing: str = "length"
        self._left = 0  # body bytes still due ("length" framing)
        self._chunks: ChunkedReader | None = None

    @property
    def reusable(self) -> bool:
        return self._state is _IDLE

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | AsyncIterable[bytes] = b"",
        *,
        response_timeout: float | None = None,
        send_timeout: float | None = None,
    ) -> ClientResponse:
        """Send a request and return once the response head has arrived.

        A streamed ``body`` is sent as is when ``headers`` give its Content-Length (it
        must match), chunked otherwise. ``send_timeout`` bounds each write (an upstream
        that stops reading), ``response_timeout`` each read of the response head; both
        raise ``trio.TooSlowError``.
        """
        if self._state is not _IDLE:
            raise h11.LocalProtocolError(f"Connection cannot send a request ({self._state})")
        headers = list(headers)
        length: str | None = None
        chunked = False
        hosts = False
        for name, value in headers:
            lname = name.lower()
            if lname == "content-length":
                length = value.strip()
            elif lname == "transfer-encoding":
                if value.strip().lower() != "chunked":
                    raise h11.LocalProtocolError("Only Transfer-Encoding: chunked is supported")
                chunked = True
            elif lname == "host":
                hosts = True
        if not hosts:
            headers.insert(0, ("Host", self.host_header))
        streaming = not isinstance(body, bytes | bytearray)
        if chunked:
            length = None
        elif length is not None:
            if not length.isdigit():
                raise h11.LocalProtocolError("Bad Content-Length")
            if not streaming and int(length) != len(body):  # type: ignore[arg-type]
                raise h11.LocalProtocolError("Content-Length does not match the body")
        elif not streaming:
            if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                headers.append(("Content-Length", str(len(body))))  # type: ignore[arg-type]
        else:
            headers.append(("Transfer-Encoding", "chunked"))
            chunked = True
        head = encode_request_head(method, target, headers)
        self._state = _BUSY
        self._method = method
        self._request_sent = False
        self._keep_alive = not _asks_to_close_text(headers)
        self.requests_sent += 1
        wire = self._wire
        limit = math.inf if send_timeout is None else send_timeout
        try:
            if not streaming:
                if len(body) <= _COALESCE_MAX:  # type: ignore[arg-type]
                    await wire.send_all(head + body, limit)  # type: ignore[operator]
                else:
                    await wire.send_all(head, limit)
                    await wire.send_all(body, limit)  # type: ignore[arg-type]
            elif chunked:
                await wire.send_all(head, limit)
                await self._send_chunked_body(body, limit)  # type: ignore[arg-type]
            else:
                await wire.send_all(head, limit)
                await self._send_sized_body(body, int(length), limit)  # type: ignore[arg-type]
            self._request_sent = True
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

    async def _send_sized_body(
        self, body: AsyncIterable[bytes], length: int, timeout: float
    ) -> None:
        sent = 0
        wire = self._wire
        async for chunk in body:
            if not chunk:
                continue
            sent += len(chunk)
            if sent > length:
                raise h11.LocalProtocolError("Too much data for declared Content-Length")
            await wire.send_all(chunk, timeout)
        if sent != length:
            raise h11.LocalProtocolError("Too little data for declared Content-Length")

    async def _send_chunked_body(self, body: AsyncIterable[bytes], timeout: float) -> None:
        wire = self._wire
        async for chunk in body:
            if not chunk:
                continue
            before, after = encode_chunk(chunk)
            if len(chunk) <= _COALESCE_MAX:
                await wire.send_all(before + chunk + after, timeout)
            else:
                await wire.send_all(before, timeout)
                await wire.send_all(chunk, timeout)
                await wire.send_all(after, timeout)
        await wire.send_all(b"0\r\n\r\n", timeout)

    async def _receive_response_head(self, response_timeout: float | None) -> ClientResponse:
        buf = self._buf
        limit = math.inf if response_timeout is None else response_timeout
        searched = 0
        while True:
            parsed = parse_response_head(buf, searched - 3)
            if parsed is None:
                searched = len(buf)
                data = await self._wire.receive(READ_CHUNK, limit)
                if not data:
                    self._state = _CLOSED
                    raise trio.BrokenResourceError("Connection closed before a response")
                buf += data
                continue
            head, size = parsed
            del buf[:size]
            searched = 0
            if head.status >= 200:
                return self._start_response(head)
            if head.status == 101:
                response = ClientResponse(self, head)
                response.upgraded_stream = self.stream
                response.trailing = bytes(buf)
                buf.clear()
                self._state = _CLOSED  # the stream now belongs to whoever upgraded it
                return response
            # 100 Continue and other interim answers: wait for the final one

    def _start_response(self, head: ResponseHead) -> ClientResponse:
        if asks_to_close(head.http_version, head.headers):
            self._keep_alive = False
        framing, length = response_framing(self._method, head)
        self._framing = framing
        self._left = length
        self._chunks = ChunkedReader() if framing == "chunked" else None
        response = ClientResponse(self, head)
        if framing == "length" and head.status not in (204, 304) and self._method != "HEAD":
            response.content_length = length
        return response

    async def _receive_body_chunk(self, timeout: float) -> bytes | None:
        """The next piece of the response body; None at its end."""
        buf = self._buf
        framing = self._framing
        if framing == "length":
            left = self._left
            if not left:
                self._response_done()
                return None
            data = await _read_length_framed(buf, self._wire, left, timeout)
            if not data:
                self._state = _CLOSED
                raise trio.BrokenResourceError("Connection ended mid-body")
            self._left = left - len(data)
            return data
        if framing == "chunked":
            chunks = self._chunks
            assert chunks is not None
            while True:
                data = chunks.read(buf, BODY_CHUNK)
                if data is None:
                    more = await self._wire.receive(BODY_CHUNK, timeout)
                    if not more:
                        self._state = _CLOSED
                        raise trio.BrokenResourceError("Connection ended mid-body")
                    buf += more
                    continue
                if not data:
                    self._response_done()
                    return None
                return data
        # framing == "close": the body ends when the connection does
        if buf:
            data = bytes(buf)
            buf.clear()
            return data
        data = await self._wire.receive(BODY_CHUNK, timeout)
        if data:
            return data
        self._keep_alive = False
        self._response_done()
        return None

    def _response_done(self) -> None:
        if self._request_sent and self._keep_alive and not self._buf:
            self._state = _IDLE
        else:
            self._state = _CLOSED

    async def aclose(self) -> None:
        self._state = _CLOSED
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
