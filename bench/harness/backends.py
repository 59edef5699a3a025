"""Benchmark backends, each run in its own process(es) on a pre-bound listening socket.

TLS backend (stands in for a scheduler): asyncio, mutual TLS with the cluster cert. After
the handshake the client sends one opcode byte:

- ``E``: echo whatever arrives until EOF (small round trips);
- ``S`` + 8-byte length N: sink N bytes, then answer ``K`` (upload);
- ``G`` + 8-byte length N: send N bytes (download);
- ``P``: answer ``P`` and close (connection/handshake test).

HTTP backend (stands in for a dashboard): asyncio protocol answering ``GET /small`` with a
13-byte body and ``GET /big?n=N`` with an N-byte ``Content-Length`` body, keep-alive.
Several processes may share one listening socket (the kernel spreads the accepts).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
from urllib.parse import parse_qs, urlsplit

CHUNK = 256 * 1024
_ZEROS = bytes(CHUNK)


async def _tls_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        op = await reader.readexactly(1)
        if op == b"E":
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        elif op == b"S":
            remaining = int.from_bytes(await reader.readexactly(8), "big")
            while remaining > 0:
                data = await reader.read(min(remaining, 1 << 20))
                if not data:
                    return
                remaining -= len(data)
            writer.write(b"K")
            await writer.drain()
        elif op == b"G":
            remaining = int.from_bytes(await reader.readexactly(8), "big")
            while remaining > 0:
                n = min(remaining, CHUNK)
                writer.write(_ZEROS[:n] if n < CHUNK else _ZEROS)
                await writer.drain()
                remaining -= n
            await reader.read(1)  # wait for the client to close
        elif op == b"P":
            writer.write(b"P")
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


def serve_tls_backend(sock: socket.socket, ctx: ssl.SSLContext) -> None:
    """Process target: serve the TLS backend on ``sock`` until SIGTERM."""

    async def main() -> None:
        server = await asyncio.start_server(
            _tls_handle, sock=sock, ssl=ctx, ssl_handshake_timeout=30, limit=1 << 20
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())


SMALL_BODY = b"hello, world\n"
_SMALL_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n" + SMALL_BODY
)
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class _HTTPBackend(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.sending = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=4 * CHUNK)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 65536:
            assert self.transport is not None
            self.transport.close()
            return
        self._process()

    def _process(self) -> None:
        assert self.transport is not None
        while not self.sending:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            parts = head.split(b"\r\n", 1)[0].split(b" ")
            target = parts[1].decode("latin-1") if len(parts) == 3 else "/"
            url = urlsplit(target)
            if url.path == "/small":
                self.transport.write(_SMALL_RESPONSE)
            elif url.path == "/big":
                n = int(parse_qs(url.query).get("n", ["0"])[0])
                self.sending = True
                self.transport.pause_reading()
                asyncio.get_running_loop().create_task(self._send_big(n))
            else:
                self.transport.write(_NOT_FOUND)

    async def _send_big(self, n: int) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % n
        )
        view = memoryview(_ZEROS)
        while n > 0 and not self.transport.is_closing():
            await self.can_write.wait()
            k = min(n, CHUNK)
            self.transport.write(view[:k])
            n -= k
        self.sending = False
        if not self.transport.is_closing():
            self.transport.resume_reading()
            self._process()


def serve_http_backend(sock: socket.socket) -> None:
    """Process target: serve the HTTP backend on ``sock`` until SIGTERM."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_HTTPBackend, sock=sock)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(main())


def _threaded_handle(raw: socket.socket, ctx: ssl.SSLContext) -> None:
    try:
        raw.settimeout(60)
        with ctx.wrap_socket(raw, server_side=True) as s:
            op = s.recv(1)
            if op == b"E":
                buf = bytearray(65536)
                while n := s.recv_into(buf):
                    s.sendall(memoryview(buf)[:n])
            elif op in (b"S", b"G"):
                header = b""
                while len(header) < 8:
                    chunk = s.recv(8 - len(header))
                    if not chunk:
                        return
                    header += chunk
                remaining = int.from_bytes(header, "big")
                if op == b"S":
                    buf = bytearray(1 << 20)
                    while remaining > 0:
                        n = s.recv_into(buf)
                        if not n:
                            return
                        remaining -= n
                    s.sendall(b"K")
                else:
                    view = memoryview(_ZEROS)
                    while remaining > 0:
                        k = min(remaining, CHUNK)
                        s.sendall(view[:k])
                        remaining -= k
                    s.recv(1)
            elif op == b"P":
                s.sendall(b"P")
    except (OSError, ssl.SSLError):
        pass


def serve_threaded_tls_backend(sock: socket.socket, ctx: ssl.SSLContext) -> None:
    """Process target: the same TLS backend with a thread per connection (blocking
    ``ssl`` releases the GIL while it encrypts), for bulk transfers and handshakes."""
    import threading

    signal.signal(signal.SIGTERM, lambda *_: sock.close())
    while True:
        try:
            raw, _ = sock.accept()
        except OSError:
            return
        threading.Thread(target=_threaded_handle, args=(raw, ctx), daemon=True).start()
