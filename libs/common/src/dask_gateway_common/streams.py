"""Stream wrappers.

``PrefixedStream`` puts bytes that were already read from a stream (a peeked TLS
ClientHello, the bytes h11 read past an HTTP upgrade) back in front of it: ``receive_some``
returns them first, then reads from the wrapped stream. Everything else delegates.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager

import trio

__all__ = ["PrefixedStream"]


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A stream whose first received bytes are ``prefix``, then those of ``stream``.

    ``send_eof`` needs a half-closeable wrapped stream; on any other stream it raises
    ``NotImplementedError`` (``relay`` then falls back to closing). ``prefix`` is exposed
    as the bytes not yet received, and ``stream`` as the wrapped stream, so a caller may
    unwrap it (e.g. to reach a ``SocketStream``'s socket).
    """

    def __init__(self, stream: trio.abc.Stream, prefix: bytes | bytearray | memoryview) -> None:
        self.stream = stream
        self._prefix = memoryview(bytes(prefix))
        self._receiving = False
        self._sending = False
        self._closed = False

    @property
    def prefix(self) -> bytes:
        """The replayed bytes not received yet."""
        return bytes(self._prefix)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if not self._prefix:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            return await self.stream.receive_some(max_bytes)
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            n = len(self._prefix) if max_bytes is None else max_bytes
            chunk = bytes(self._prefix[:n])
            self._prefix = self._prefix[n:]
            return chunk
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_guard():
            await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_guard():
            await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if not isinstance(self.stream, trio.abc.HalfCloseableStream):
            raise NotImplementedError(f"{type(self.stream).__name__} cannot half-close")
        with self._send_guard():
            await self.stream.send_eof()

    @contextmanager
    def _send_guard(self) -> Iterator[None]:
        # Our own detector: not every wrapped stream (e.g. StapledStream) notices a
        # send_eof racing a send_all.
        if self._sending:
            raise trio.BusyResourceError("another task is using this stream for sending")
        self._sending = True
        try:
            yield
        finally:
            self._sending = False

    async def aclose(self) -> None:
        self._closed = True
        self._prefix = memoryview(b"")
        await self.stream.aclose()
