"""Two-way byte relay with half-close propagation.

Theory of operation
-------------------
A relay copies a→b ("up") and b→a ("down") until both directions have seen end-of-file.
When a receive returns end-of-file, the relay half-closes the other side's sending
direction (``send_eof`` / ``shutdown(SHUT_WR)``) and keeps copying the other way, so
protocols that half-close (send a request, EOF, wait for the answer) work through it. Any
error on either side (reset, broken pipe, a stream closed under us) means the connection
is gone: the relay stops both directions. It always closes both ends before returning;
ordinary peer disconnects never escape as exceptions; cancellation does propagate.

``relay(a, b)`` works on any two ``trio.abc.Stream`` (memory streams, SSL streams,
``PrefixedStream``): one task per direction, ``receive_some`` / ``send_all``. When both are
plain ``SocketStream``s (either possibly behind a ``PrefixedStream``, whose unread prefix is
then sent first), it hands over to ``relay_sockets``.

``relay_sockets(sock_a, sock_b)`` is the fast path for raw sockets. On Linux the bytes are
moved by the **relay engine** (``engine.py``: one thread per process, an edge-triggered
epoll loop, splice for bulk streams; its docstring explains why). The trio task only hands
the pair over (``Engine.call_soon``) and awaits an Event that the engine sets
(``TrioToken.run_sync_soon``) when the relay is over. On cancellation the task asks the
engine to drop the pair and waits (shielded, microseconds) until it has, so an fd is
never closed while the engine still watches it. ``on_bytes(direction, n)`` then runs in
the engine thread: it must be thread-safe and quick and must not call trio. A bug inside
the engine (or an exception from ``on_bytes``) fails only the relays concerned, re-raised
from their ``relay_sockets``.

Where epoll is unavailable (or with ``engine=False``), ``relay_sockets`` runs the same
algorithm as two trio tasks on the raw sockets: try ``recv_into`` first and only
``wait_readable`` on EAGAIN, ``send`` and only ``wait_writable`` on a partial send, one shared
buffer per trio run, a checkpoint every ``_BURST`` chunks.

Measurements (``bench/relay_micro.py --bulk-mib 512 --conns 1 200 1000 --repeat 3``,
plain TCP on loopback, 2-core VM at load 1-2 (quiet for once); medians of 3; proxy CPU
summed over its threads):

========================  ====================  =====================================
path                      bulk TCP, CPU s/GiB   64-byte round trips, CPU µs/request
                          (up / down)           1 conn.   200 conns.   1000 conns.
========================  ====================  =====================================
generic ``relay()``       1.39 / 1.24           161       85           143
trio tasks, copy          0.75 / 0.63           168       68           92
trio tasks, splice        0.43 / 0.38           161       62           86
engine, copy              0.63 / 0.73           77        23           28
engine, auto (default)    0.40 / 0.42           74        22           28
engine, splice            0.32 / 0.39           80        29           42
========================  ====================  =====================================

* Bulk CPU is ~90% kernel time (the loopback TCP path, which every proxy pays); user time
  is 0.00-0.04 s/GiB on every splice path against ~0.5 for the generic relay. Through the
  scheduler proxy with TLS end to end (bench/proxies.py) the engine spends 0.27-0.32 s/GiB
  either way, upstream's Go proxy 0.43-0.82.
* Small messages: the engine needs a third of the CPU per request of trio tasks from 200
  connections on (events batch in one ``epoll_wait``, no ``epoll_ctl`` per message), and
  half with a single connection (each message is one thread wake-up).
* RSS with 1000 open connections: engine 35.6 MiB, trio tasks 41.5 MiB, generic 45 MiB
  (28.5 MiB idle).
"""

from __future__ import annotations

import os
import socket
from typing import Final

import trio

from .engine import (
    _BUFFER_SIZE,
    _BULK_BYTES,
    _BURST,
    _SPLICE_CHUNK,
    _SPLICE_FLAGS,
    ENGINE_AVAILABLE,
    MODE_ALWAYS,
    MODE_AUTO,
    MODE_NEVER,
    SPLICE_AVAILABLE,
    OnBytes,
    Relay,
    get_engine,
    lift_notsent_lowat,
    open_pipe,
)
from .streams import PrefixedStream

__all__ = [
    "ENGINE_AVAILABLE",
    "SPLICE_AVAILABLE",
    "OnBytes",
    "relay",
    "relay_sockets",
]

# What a peer going away looks like. OSError covers ECONNRESET, EPIPE, ENOTCONN, ETIMEDOUT.
_PEER_GONE: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


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
    ``send_all``, and ``use_splice`` is ignored.
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
            await _close_both(a, b)
        return
    try:
        async with trio.open_nursery() as nursery:
            done = nursery.cancel_scope
            nursery.start_soon(_pump_stream, a, b, "up", buffer_size, on_bytes, done)
            nursery.start_soon(_pump_stream, b, a, "down", buffer_size, on_bytes, done)
    finally:
        await _close_both(a, b)


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
            except NotImplementedError:  # a PrefixedStream over a stream that cannot
                pass
        await dst.aclose()
    except _PEER_GONE:
        done.cancel()


async def _close_both(a: trio.abc.AsyncResource, b: trio.abc.AsyncResource) -> None:
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
    engine: bool | None = None,
) -> None:
    """Relay between two connected stream sockets until both directions end; close both.

    ``prefix_to_b`` (``prefix_to_a``) is sent to b (a) before anything read from a (b):
    the bytes a proxy already consumed while peeking. ``use_splice``: None = switch a
    direction to ``os.splice`` once it streams bulk data (Linux), True = splice from the
    start, False = plain ``recv_into``/``send``. ``engine``: None = use the relay engine
    thread where available, False = two trio tasks. True/True requests that the platform
    cannot honour raise ValueError.
    """
    if use_splice and not SPLICE_AVAILABLE:
        raise ValueError("os.splice is not available on this platform")
    if engine and not ENGINE_AVAILABLE:
        raise ValueError("the relay engine needs epoll and eventfd (Linux)")
    if use_splice is None:
        mode = MODE_AUTO if SPLICE_AVAILABLE else MODE_NEVER
    else:
        mode = MODE_ALWAYS if use_splice else MODE_NEVER
    # Plain stdlib socket objects over the same fds: no dup, no extra fd. They are detached
    # (never closed) at the end: the trio sockets own the fds.
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
        if ENGINE_AVAILABLE if engine is None else engine:
            await _relay_in_engine(raw_a, raw_b, prefix_to_b, prefix_to_a, on_bytes, mode)
        else:
            async with trio.open_nursery() as nursery:
                done = nursery.cancel_scope
                up = _TrioDirection(raw_a, raw_b, "up", on_bytes, mode, done)
                down = _TrioDirection(raw_b, raw_a, "down", on_bytes, mode, done)
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


# ---- the trio-task implementation (portable fallback) -------------------------------------

_trio_buffer: trio.lowlevel.RunVar[tuple[bytearray, memoryview]] = trio.lowlevel.RunVar(
    "dask_gateway_relay_buffer"
)


def _get_trio_buffer() -> tuple[bytearray, memoryview]:
    try:
        return _trio_buffer.get()
    except LookupError:
        buf = bytearray(_BUFFER_SIZE)
        pair = (buf, memoryview(buf))
        _trio_buffer.set(pair)
        return pair


class _TrioDirection:
    """One direction src → dst of a relay run as a trio task."""

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
            if self.mode == MODE_ALWAYS or await self._copy():
                await self._splice()
            self.dst.shutdown(socket.SHUT_WR)
        except _PEER_GONE:
            self.done.cancel()

    async def _copy(self) -> bool:
        """Copy through the shared buffer until EOF (False) or bulk is detected (True)."""
        buf, view = _get_trio_buffer()
        recv_into = self.src.recv_into
        send = self.dst.send
        on_bytes = self.on_bytes
        direction = self.direction
        switch_to_splice = self.mode == MODE_AUTO
        bulk = False
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
            if n >= _BULK_BYTES and not bulk:
                bulk = True
                lift_notsent_lowat(self.dst)
                if switch_to_splice:
                    return True
            streak += 1
            if streak >= _BURST:
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
        src_fd, dst_fd = self.src_fd, self.dst_fd
        lift_notsent_lowat(self.dst)
        pipe_r, pipe_w = open_pipe()
        try:
            streak = 0
            while True:
                try:
                    n = splice(src_fd, pipe_w, _SPLICE_CHUNK, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    streak = 0
                    await trio.lowlevel.wait_readable(src_fd)
                    continue
                if n == 0:
                    return
                left = n
                while left:
                    try:
                        left -= splice(pipe_r, dst_fd, left, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        streak = 0
                        await trio.lowlevel.wait_writable(dst_fd)
                if self.on_bytes is not None:
                    self.on_bytes(self.direction, n)
                streak += 1
                if streak >= _BURST:
                    streak = 0
                    await trio.lowlevel.checkpoint()
        finally:
            os.close(pipe_r)
            os.close(pipe_w)


# ---- the relay engine (Linux) ---------------------------------------------------------------


async def _relay_in_engine(
    raw_a: socket.socket,
    raw_b: socket.socket,
    prefix_to_b: bytes,
    prefix_to_a: bytes,
    on_bytes: OnBytes | None,
    mode: int,
) -> None:
    token = trio.lowlevel.current_trio_token()
    finished = trio.Event()
    outcome: list[BaseException | None] = []
    started: list[Relay] = []

    def on_done(error: BaseException | None) -> None:  # the engine thread, usually
        outcome.append(error)
        try:
            token.run_sync_soon(finished.set)
        except trio.RunFinishedError:  # pragma: no cover - the run is gone anyway
            pass

    def start() -> None:
        started.append(
            engine.start_relay(
                raw_a,
                raw_b,
                on_done=on_done,
                prefix_to_b=prefix_to_b,
                prefix_to_a=prefix_to_a,
                on_bytes=on_bytes,
                mode=mode,
            )
        )

    def abort() -> None:  # runs after start(): the engine runs calls in order
        if started:
            started[0].abort(None)

    engine = get_engine()
    engine.call_soon(start, fail=on_done)
    try:
        await finished.wait()
    finally:
        if not finished.is_set():
            engine.call_soon(abort, fail=on_done)
            with trio.CancelScope(shield=True):
                await finished.wait()
    if outcome[0] is not None:
        raise outcome[0]
