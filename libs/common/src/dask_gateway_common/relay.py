"""Two-way byte relay with half-close propagation.

Theory of operation
-------------------
A relay copies a→b ("up") and b→a ("down") concurrently, one task per direction, until
both directions have seen end-of-file. When a receive returns end-of-file, the relay
half-closes the other side's sending direction (``send_eof`` / ``shutdown(SHUT_WR)``) and
keeps copying the other way, so protocols that half-close (a client that sends a request
then EOF and waits for the answer) work through it. Any error on either side (reset, broken
pipe, a stream closed under us) means the connection is gone: the relay stops both
directions. The relay always closes both ends before returning, and ordinary peer
disconnects never escape as exceptions; cancellation does propagate.

Two implementations:

* ``relay_sockets(sock_a, sock_b)`` — the fast path, on raw non-blocking trio sockets
  (the scheduler proxy's case). Per small message the cost is dominated by trio scheduling
  (each ``await`` that parks a task is a wakeup and an ``epoll_ctl``), not by copying, so
  the loop avoids parking whenever it can: it tries ``recv_into`` first and only waits for
  readability on ``BlockingIOError``; it sends with ``send`` and only waits for writability
  on a partial send. Reads go into ONE buffer shared by every relay of a trio run: the loop
  is single-threaded and each chunk is completely sent before the task yields, so nobody
  else can see the buffer mid-use (the unsent tail of a partial send is copied out before
  waiting). That removes the per-connection buffer (64 KiB × 2 per connection otherwise).
  A direction that stays busy yields every few chunks so it cannot starve other tasks.
  Bulk directions can move bytes with ``os.splice`` through a pipe instead (zero-copy in
  the kernel): ``use_splice=None`` (default) switches a direction to splice the first time
  one read fills the whole shared buffer, so the two pipe fds are only paid by connections
  that actually stream; ``True`` splices from the start, ``False`` never does.
* ``relay(a, b)`` — any two ``trio.abc.Stream`` (memory streams, SSL streams, a
  ``PrefixedStream``). When both are plain ``SocketStream``s (possibly behind a
  ``PrefixedStream``), it hands over to ``relay_sockets``.

Measurements (bench/relay_micro.py, 2 shared cores, loopback, proxy CPU only; see the
module-level ``MEASUREMENTS`` note at the bottom for the figures).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Final

import trio

if sys.platform == "linux":
    import fcntl

from .streams import PrefixedStream

__all__ = [
    "SHARED_BUFFER_SIZE",
    "SPLICE_AVAILABLE",
    "OnBytes",
    "relay",
    "relay_sockets",
]

OnBytes = Callable[[str, int], None]

SHARED_BUFFER_SIZE: Final = 1 << 16
# A busy direction yields to the scheduler after this many chunks without waiting.
_CHUNKS_BEFORE_YIELD: Final = 16
_SPLICE_CHUNK: Final = 1 << 18
_PIPE_SIZE: Final = 1 << 18
_F_SETPIPE_SZ: Final = 1031

SPLICE_AVAILABLE: Final = sys.platform == "linux" and hasattr(os, "splice")
_SPLICE_FLAGS: Final = (
    (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if SPLICE_AVAILABLE else 0  # type: ignore[attr-defined]
)

# What a peer going away looks like. OSError covers ECONNRESET, EPIPE, ENOTCONN, ETIMEDOUT.
_PEER_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

_shared_buffer: trio.lowlevel.RunVar[tuple[bytearray, memoryview]] = trio.lowlevel.RunVar(
    "dask_gateway_relay_buffer"
)


# ---- generic streams -----------------------------------------------------------------------


async def relay(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    buffer_size: int = 65536,
    on_bytes: OnBytes | None = None,
    use_splice: bool | None = None,
) -> None:
    """Copy a→b ("up") and b→a ("down") until both sides are done; close both.

    If both streams are ``SocketStream``s (either may be wrapped in a ``PrefixedStream``),
    this runs ``relay_sockets`` on their sockets (``buffer_size`` is then unused,
    ``use_splice`` is passed on). Otherwise it copies with ``receive_some(buffer_size)`` /
    ``send_all``.
    """
    sock_a, prefix_a = _unwrap_socket_stream(a)
    sock_b, prefix_b = _unwrap_socket_stream(b)
    if sock_a is not None and sock_b is not None:
        try:
            await relay_sockets(
                sock_a,
                sock_b,
                prefix_to_b=prefix_a,
                prefix_to_a=prefix_b,
                on_bytes=on_bytes,
                use_splice=use_splice,
            )
        finally:
            await _close_all(a, b)
        return
    try:
        async with trio.open_nursery() as nursery:
            done = nursery.cancel_scope
            nursery.start_soon(_pump_stream, a, b, "up", buffer_size, on_bytes, done)
            nursery.start_soon(_pump_stream, b, a, "down", buffer_size, on_bytes, done)
    finally:
        await _close_all(a, b)


async def _pump_stream(
    src: trio.abc.Stream,
    dst: trio.abc.Stream,
    direction: str,
    buffer_size: int,
    on_bytes: OnBytes | None,
    done: trio.CancelScope,
) -> None:
    try:
        while True:
            data = await src.receive_some(buffer_size)
            if not data:
                break
            await dst.send_all(data)
            if on_bytes is not None:
                on_bytes(direction, len(data))
        if isinstance(dst, trio.abc.HalfCloseableStream):
            try:
                await dst.send_eof()
                return
            except NotImplementedError:  # PrefixedStream over a stream that cannot
                pass
        await dst.aclose()
    except _PEER_GONE:
        done.cancel()


async def _close_all(a: trio.abc.AsyncResource, b: trio.abc.AsyncResource) -> None:
    # Under an outer cancellation the first close re-raises Cancelled: still close b.
    try:
        await trio.aclose_forcefully(a)
    finally:
        await trio.aclose_forcefully(b)


def _unwrap_socket_stream(s: trio.abc.Stream) -> tuple[trio.socket.SocketType | None, bytes]:
    prefix = b""
    if isinstance(s, PrefixedStream):
        prefix = s.prefix
        s = s.stream
    if type(s) is trio.SocketStream:
        return s.socket, prefix
    return None, b""


# ---- raw sockets ---------------------------------------------------------------------------


async def relay_sockets(
    sock_a: trio.socket.SocketType,
    sock_b: trio.socket.SocketType,
    *,
    prefix_to_b: bytes = b"",
    prefix_to_a: bytes = b"",
    on_bytes: OnBytes | None = None,
    use_splice: bool | None = None,
) -> None:
    """Relay between two connected stream sockets until both directions end; close both.

    ``prefix_to_b`` (``prefix_to_a``) is sent to b (a) before anything read from a (b):
    the bytes a proxy already consumed while peeking. ``use_splice``: None = switch a
    direction to ``os.splice`` once it streams bulk data (Linux), True = splice from the
    start (ValueError where unavailable), False = plain ``recv_into``/``send``.
    """
    if use_splice and not SPLICE_AVAILABLE:
        raise ValueError("os.splice is not available on this platform")
    mode = _MODE_NEVER if use_splice is False or not SPLICE_AVAILABLE else _MODE_AUTO
    if use_splice:
        mode = _MODE_ALWAYS
    # Plain stdlib socket objects over the same fds: no dup, no extra fd; detached (never
    # closed) at the end, the trio sockets own the fds.
    raw_a = socket.socket(fileno=sock_a.fileno())
    try:
        raw_b = socket.socket(fileno=sock_b.fileno())
    except BaseException:
        raw_a.detach()
        raise
    try:
        for raw in (raw_a, raw_b):
            raw.setblocking(False)
            _set_nodelay(raw)
        async with trio.open_nursery() as nursery:
            done = nursery.cancel_scope
            up = _Direction(raw_a, raw_b, "up", on_bytes, mode, done)
            down = _Direction(raw_b, raw_a, "down", on_bytes, mode, done)
            nursery.start_soon(up.run, prefix_to_b)
            nursery.start_soon(down.run, prefix_to_a)
    finally:
        raw_a.detach()
        raw_b.detach()
        sock_a.close()
        sock_b.close()


def _set_nodelay(raw: socket.socket) -> None:
    """A relay forwards what it got at once: no Nagle delay on TCP sockets."""
    if raw.family in (socket.AF_INET, socket.AF_INET6):
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


_MODE_NEVER: Final = 0
_MODE_AUTO: Final = 1
_MODE_ALWAYS: Final = 2


def _get_shared_buffer() -> tuple[bytearray, memoryview]:
    try:
        return _shared_buffer.get()
    except LookupError:
        buf = bytearray(SHARED_BUFFER_SIZE)
        pair = (buf, memoryview(buf))
        _shared_buffer.set(pair)
        return pair


class _Direction:
    """One direction of a socket relay: src → dst."""

    __slots__ = ("src", "dst", "direction", "on_bytes", "mode", "done", "src_fd", "dst_fd")

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        direction: str,
        on_bytes: OnBytes | None,
        mode: int,
        done: trio.CancelScope,
    ) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.direction = direction
        self.on_bytes = on_bytes
        self.mode = mode
        self.done = done

    async def run(self, prefix: bytes) -> None:
        try:
            if prefix:
                await self._send_owned(memoryview(prefix))
            if self.mode == _MODE_ALWAYS or await self._copy():
                await self._splice()
            self.dst.shutdown(socket.SHUT_WR)
        except _PEER_GONE:
            self.done.cancel()

    async def _copy(self) -> bool:
        """Copy through the shared buffer until EOF (False) or bulk is detected (True)."""
        buf, view = _get_shared_buffer()
        size = len(buf)
        recv_into = self.src.recv_into
        send = self.dst.send
        on_bytes = self.on_bytes
        direction = self.direction
        switch_to_splice = self.mode == _MODE_AUTO
        streak = 0
        while True:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                streak = 0
                await trio.lowlevel.wait_readable(self.src_fd)
                continue
            if n == 0:
                return False
            try:
                sent = send(view[:n])
            except BlockingIOError:
                sent = 0
            if sent < n:
                # Copy the tail out of the shared buffer before yielding.
                await self._send_owned(memoryview(bytes(view[sent:n])))
                streak = 0
            if on_bytes is not None:
                on_bytes(direction, n)
            if n == size and switch_to_splice:
                return True
            streak += 1
            if streak >= _CHUNKS_BEFORE_YIELD:
                streak = 0
                await trio.lowlevel.checkpoint()

    async def _send_owned(self, data: memoryview) -> None:
        """Send all of ``data`` (which we own), waiting for writability as needed."""
        send = self.dst.send
        while data:
            try:
                sent = send(data)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.dst_fd)
                continue
            data = data[sent:]

    async def _splice(self) -> None:
        """Move bytes src → pipe → dst with os.splice until EOF."""
        splice = os.splice  # type: ignore[attr-defined]
        flags = _SPLICE_FLAGS
        src_fd, dst_fd = self.src_fd, self.dst_fd
        on_bytes = self.on_bytes
        direction = self.direction
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:  # capped by /proc/sys/fs/pipe-max-size: keep the default
                pass
            streak = 0
            while True:
                try:
                    n = splice(src_fd, pipe_w, _SPLICE_CHUNK, flags=flags)
                except BlockingIOError:
                    streak = 0
                    await trio.lowlevel.wait_readable(src_fd)
                    continue
                if n == 0:
                    return
                left = n
                while left:
                    try:
                        left -= splice(pipe_r, dst_fd, left, flags=flags)
                    except BlockingIOError:
                        streak = 0
                        await trio.lowlevel.wait_writable(dst_fd)
                if on_bytes is not None:
                    on_bytes(direction, n)
                streak += 1
                if streak >= _CHUNKS_BEFORE_YIELD:
                    streak = 0
                    await trio.lowlevel.checkpoint()
        finally:
            os.close(pipe_r)
            os.close(pipe_w)
