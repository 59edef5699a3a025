"""Tests for the two-way relay (dask_gateway_common.relay), over real loopback sockets and
memory streams.

Layout of every test: ``x <-> a  [relay a <-> b]  b <-> y``; x and y are the two peers.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from dask_gateway_common.relay import ENGINE_AVAILABLE, SPLICE_AVAILABLE, relay, relay_sockets
from dask_gateway_common.streams import PrefixedStream

DEADLINE = 20
# engine (Linux default) and trio-task implementations, in each splice mode
SOCKET_KINDS = ["copy", "auto", "splice", "trio-copy", "trio-auto", "trio-splice", "streams"]
ALL_KINDS = ["memory", *SOCKET_KINDS]


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        port = listener.socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    assert isinstance(server, trio.SocketStream)
    return client, server


RelayFn = Callable[[], Awaitable[None]]


async def make_setup(
    kind: str, on_bytes: Callable[[str, int], None] | None = None, prefix: bytes = b""
) -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream, RelayFn]:
    """Return (x, y, run_relay) for one relay implementation."""
    if kind == "memory":
        x, a = trio.testing.memory_stream_pair()
        b, y = trio.testing.memory_stream_pair()
        a_stream: trio.abc.Stream = PrefixedStream(a, prefix) if prefix else a
        return x, y, lambda: relay(a_stream, b, buffer_size=4096, on_bytes=on_bytes)
    x, a = await tcp_pair()
    b, y = await tcp_pair()
    if kind == "streams":
        a_stream = PrefixedStream(a, prefix) if prefix else a
        return x, y, lambda: relay(a_stream, b, on_bytes=on_bytes)
    engine = not kind.startswith("trio-")
    splice = {"copy": False, "auto": None, "splice": True}[kind.removeprefix("trio-")]
    return (
        x,
        y,
        lambda: relay_sockets(
            a.socket,
            b.socket,
            prefix_to_b=prefix,
            on_bytes=on_bytes,
            use_splice=splice,
            engine=engine,
        ),
    )


@asynccontextmanager
async def running(run_relay: RelayFn) -> AsyncIterator[trio.Event]:
    """Run the relay in the background; on exit, wait (with a deadline) for it to end."""
    finished = trio.Event()

    async def runner() -> None:
        await run_relay()
        finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner)
        yield finished
        with trio.fail_after(DEADLINE):
            await finished.wait()


async def receive_exactly(s: trio.abc.ReceiveStream, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        chunk = await s.receive_some(1 << 16)
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


async def send_in_random_chunks(s: trio.abc.SendStream, data: bytes, seed: int) -> None:
    rng = random.Random(seed)
    view = memoryview(data)
    while view:
        n = rng.randint(1, 300_000)
        await s.send_all(view[:n])
        view = view[n:]


async def transfer(src: trio.abc.SendStream, dst: trio.abc.ReceiveStream, data: bytes) -> None:
    """Send ``data`` on src while checking it arrives on dst."""

    async def check() -> None:
        assert await receive_exactly(dst, len(data)) == data

    async with trio.open_nursery() as nursery:
        nursery.start_soon(check)
        await src.send_all(data)


def skip_unless_splice(kind: str) -> None:
    if kind.endswith("splice") and not SPLICE_AVAILABLE:  # never the case on Linux
        pytest.fail("os.splice is required on this platform")
    if not kind.startswith("trio-") and kind != "memory" and not ENGINE_AVAILABLE:
        pytest.fail("the relay engine is required on this platform")


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_bytes_arrive_intact_both_ways(kind: str) -> None:
    skip_unless_splice(kind)
    counts: Counter[str] = Counter()
    up = random.randbytes(5_000_000)
    down = random.randbytes(3_000_000)
    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup(kind, lambda d, n: counts.update({d: n}))
        async with running(run_relay), x, y:

            async def x_side() -> None:
                await send_in_random_chunks(x, up, 1)
                await x.send_eof()

            async def y_side() -> None:
                await send_in_random_chunks(y, down, 2)
                await y.send_eof()

            async def check(s: trio.abc.ReceiveStream, expected: bytes) -> None:
                assert await receive_exactly(s, len(expected)) == expected
                assert await s.receive_some(10) == b""

            async with trio.open_nursery() as nursery:
                nursery.start_soon(x_side)
                nursery.start_soon(y_side)
                nursery.start_soon(check, y, up)
                nursery.start_soon(check, x, down)
    assert counts == {"up": len(up), "down": len(down)}


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("first", ["x", "y"])
async def test_half_close_keeps_the_other_direction(kind: str, first: str) -> None:
    skip_unless_splice(kind)
    answer = random.randbytes(2_000_000)
    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup(kind)
        if first == "y":
            x, y = y, x  # the same scenario started from the other end
        async with running(run_relay) as finished, x, y:
            await x.send_all(b"request")
            await x.send_eof()
            assert await receive_exactly(y, 7) == b"request"
            assert await y.receive_some(10) == b""  # the half-close went through
            assert not finished.is_set()
            # y keeps talking after x's EOF, in several rounds
            for _ in range(3):
                await transfer(y, x, answer)
            await y.send_eof()
            assert await x.receive_some(10) == b""


def reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@pytest.mark.parametrize("kind", SOCKET_KINDS)
@pytest.mark.parametrize("busy", [False, True])
async def test_reset_ends_the_relay_and_closes_the_other_side(kind: str, busy: bool) -> None:
    skip_unless_splice(kind)
    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup(kind)
        assert isinstance(x, trio.SocketStream)
        async with running(run_relay), y:
            await x.send_all(b"hello")
            assert await receive_exactly(y, 5) == b"hello"
            async with trio.open_nursery() as nursery:
                if busy:  # y is streaming towards x when x resets

                    async def stream_forever() -> None:
                        try:
                            while True:
                                await y.send_all(bytes(65536))
                        except trio.BrokenResourceError:
                            pass

                    nursery.start_soon(stream_forever)
                    assert await x.receive_some(65536)  # the stream is flowing
                reset(x)
                # the relay closes y's peer: y sees EOF (or a reset) rather than hanging
                try:
                    while await y.receive_some(65536):
                        pass
                except trio.BrokenResourceError:
                    pass
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", SOCKET_KINDS)
async def test_reset_on_the_far_side_while_idle(kind: str) -> None:
    skip_unless_splice(kind)
    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup(kind)
        assert isinstance(y, trio.SocketStream)
        async with running(run_relay), x:
            await x.send_all(b"ping")
            assert await receive_exactly(y, 4) == b"ping"
            reset(y)
            with pytest.raises(trio.BrokenResourceError):
                # EOF or reset first, then writes fail
                assert await x.receive_some(10) == b""
                while True:
                    await x.send_all(b"x" * 65536)


@pytest.mark.parametrize("kind", ALL_KINDS)
async def test_prefix_is_replayed_first(kind: str) -> None:
    skip_unless_splice(kind)
    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup(kind, prefix=b"\x16\x03\x01 peeked hello|")
        async with running(run_relay), x, y:
            await x.send_all(b"rest")
            await x.send_eof()
            expected = b"\x16\x03\x01 peeked hello|rest"
            assert await receive_exactly(y, len(expected)) == expected
            assert await y.receive_some(10) == b""
            await y.send_all(b"reply")
            await y.send_eof()
            assert await receive_exactly(x, 5) == b"reply"
            assert await x.receive_some(10) == b""


async def test_prefix_to_a() -> None:
    with trio.fail_after(DEADLINE):
        x, a = await tcp_pair()
        b, y = await tcp_pair()
        async with running(lambda: relay_sockets(a.socket, b.socket, prefix_to_a=b"hi")), x, y:
            assert await receive_exactly(x, 2) == b"hi"
            await x.send_eof()
            await y.send_eof()


async def test_memory_relay_closes_a_stream_that_cannot_half_close() -> None:
    class OneShot(trio.abc.Stream):
        """A full-duplex stream without send_eof, over a memory stream pair."""

        def __init__(self, inner: trio.StapledStream) -> None:
            self.inner = inner

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            await self.inner.send_all(data)

        async def wait_send_all_might_not_block(self) -> None:
            await self.inner.wait_send_all_might_not_block()

        async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
            return await self.inner.receive_some(max_bytes)

        async def aclose(self) -> None:
            await self.inner.aclose()

    with trio.fail_after(DEADLINE):
        x, a = trio.testing.memory_stream_pair()
        b, y = trio.testing.memory_stream_pair()
        # b wrapped in a PrefixedStream over a stream without send_eof: closing is the fallback
        b_stream = PrefixedStream(OneShot(b), b"")
        async with running(lambda: relay(a, b_stream)) as finished, x, y:
            await x.send_all(b"bye")
            await x.send_eof()
            assert await receive_exactly(y, 3) == b"bye"
            assert await y.receive_some(10) == b""
        assert finished.is_set()


@pytest.mark.parametrize("kind", ["memory", "copy", "splice", "trio-copy", "trio-splice"])
async def test_cancellation_closes_both_sides(kind: str) -> None:
    skip_unless_splice(kind)
    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup(kind)
        async with x, y:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_relay)
                    await x.send_all(b"data")
                    assert await receive_exactly(y, 4) == b"data"
                    scope.cancel()
            assert scope.cancelled_caught
            assert await x.receive_some(10) == b""
            assert await y.receive_some(10) == b""


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_no_fd_leak() -> None:
    # warm up anything lazily opened (trio's epoll, the shared buffer), then count
    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup("copy")
        async with running(run_relay), x, y:
            await x.send_eof()
            await y.send_eof()
        before = open_fds()
        for kind in SOCKET_KINDS * 3:
            x, y, run_relay = await make_setup(kind)
            async with running(run_relay), x, y:
                await transfer(x, y, bytes(300_000))  # bulk: "auto" switches to splice
                await x.send_eof()
                await y.send_eof()
            x, y, run_relay = await make_setup(kind)
            assert isinstance(x, trio.SocketStream)
            async with running(run_relay), y:
                await x.send_all(bytes(300_000))
                reset(x)
                with pytest.raises(trio.BrokenResourceError):
                    while True:
                        await y.send_all(bytes(65536))
        assert open_fds() == before


async def test_many_concurrent_small_round_trips() -> None:
    """Several relays at once, sharing the process-wide buffer, each doing ping-pong."""
    with trio.fail_after(DEADLINE):

        async def one(i: int) -> None:
            x, y, run_relay = await make_setup(SOCKET_KINDS[i % len(SOCKET_KINDS)])
            async with running(run_relay), x, y:
                for j in range(50):
                    msg = f"{i}:{j}:".encode() * 8
                    await x.send_all(msg)
                    assert await receive_exactly(y, len(msg)) == msg
                    await y.send_all(msg[::-1])
                    assert await receive_exactly(x, len(msg)) == msg[::-1]
                await x.send_eof()
                await y.send_eof()

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(one, i)


async def test_splice_needs_platform_support(monkeypatch: pytest.MonkeyPatch) -> None:
    import dask_gateway_common.relay as relay_module

    monkeypatch.setattr(relay_module, "SPLICE_AVAILABLE", False)
    monkeypatch.setattr(relay_module, "ENGINE_AVAILABLE", False)
    a, b = trio.socket.socketpair()
    with a, b:
        with pytest.raises(ValueError, match="splice"):
            await relay_module.relay_sockets(a, b, use_splice=True)
        with pytest.raises(ValueError, match="engine"):
            await relay_module.relay_sockets(a, b, engine=True)


@pytest.mark.parametrize("kind", ["copy", "splice", "trio-copy", "memory"])
async def test_on_bytes_errors_are_not_swallowed(kind: str) -> None:
    """A failing metrics callback is a bug: it surfaces, and both sides still get closed."""
    skip_unless_splice(kind)

    def broken(direction: str, n: int) -> None:
        raise KeyError(direction)

    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup(kind, on_bytes=broken)
        async with x, y:
            with pytest.RaisesGroup(KeyError, allow_unwrapped=True, flatten_subgroups=True):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_relay)
                    await x.send_all(b"boom")
            assert await y.receive_some(10) in (b"", b"boom")


async def test_engine_crash_fails_relays_and_a_new_engine_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import dask_gateway_common.engine as engine_module

    def explode(self: object) -> None:
        raise SystemError("simulated engine bug")

    with trio.fail_after(DEADLINE):
        monkeypatch.setattr(engine_module.Engine, "_run_calls", explode)
        x, y, run_relay = await make_setup("copy")
        async with x, y:
            with pytest.raises(RuntimeError, match="engine crashed"):
                await run_relay()
            assert await x.receive_some(10) == b""  # both sides closed
            assert await y.receive_some(10) == b""
        monkeypatch.undo()
        x, y, run_relay = await make_setup("copy")
        async with running(run_relay), x, y:
            await transfer(x, y, b"after the crash")
            await x.send_eof()
            await y.send_eof()


@pytest.mark.parametrize("kind", ["copy", "auto", "splice", "trio-copy", "trio-splice"])
async def test_backpressure_stops_reading(kind: str) -> None:
    """While y does not read, the relay stops reading x: x cannot push 64 MiB."""
    skip_unless_splice(kind)
    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup(kind)
        assert isinstance(x, trio.SocketStream)
        data = memoryview(random.randbytes(1 << 20))
        sent, sent_hash, received_hash = 0, hashlib.sha256(), hashlib.sha256()
        async with running(run_relay), x, y:
            with trio.move_on_after(0.5):
                while sent < 64 << 20:
                    n = await x.socket.send(data)
                    sent_hash.update(data[:n])
                    sent += n
            assert sent < 64 << 20
            await x.send_eof()
            total = 0
            while chunk := await y.receive_some(1 << 20):
                received_hash.update(chunk)
                total += len(chunk)
            assert received_hash.digest() == sent_hash.digest()
            assert total == sent
            await y.send_eof()


@pytest.mark.parametrize(
    ("kind", "payload", "pipes"),
    [
        ("auto", 64, 0),  # small messages never pay for a pipe
        ("auto", 3_000_000, 1),  # bulk upward: that direction switches to splice
        ("splice", 64, 2),  # forced: one pipe per direction from the start
        ("copy", 3_000_000, 0),
        ("trio-auto", 64, 0),
        ("trio-auto", 3_000_000, 1),
        ("trio-splice", 64, 2),
    ],
)
async def test_splice_mode_selection(
    kind: str, payload: int, pipes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    skip_unless_splice(kind)
    import dask_gateway_common.relay as relay_module

    created: list[tuple[int, int]] = []
    real_pipe2 = os.pipe2

    def spy(flags: int) -> tuple[int, int]:
        fds = real_pipe2(flags)
        created.append(fds)
        return fds

    monkeypatch.setattr(relay_module.os, "pipe2", spy)
    data = random.randbytes(payload)
    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup(kind)
        async with running(run_relay), x, y:
            await transfer(x, y, data)
            await transfer(y, x, b"ok")
            await x.send_eof()
            await y.send_eof()
    assert len(created) == pipes


@pytest.mark.parametrize("kind", ["copy", "auto", "trio-copy"])
async def test_last_data_and_eof_arriving_together(kind: str) -> None:
    """A FIN queued right behind the last bytes must still be seen (edge-triggered epoll
    reports the FIN once; a read that stops short of it must not end the reading)."""
    with trio.fail_after(DEADLINE):
        for i in range(60):
            x, y, run_relay = await make_setup(kind)
            assert isinstance(x, trio.SocketStream)
            async with running(run_relay), x, y:
                await x.send_all(b"first")
                assert await receive_exactly(y, 5) == b"first"
                # the last bytes and the FIN back to back, without yielding in between
                raw = socket.socket(fileno=x.socket.fileno())
                try:
                    assert raw.send(b"last") == 4
                    raw.shutdown(socket.SHUT_WR)
                finally:
                    raw.detach()
                assert await receive_exactly(y, 4) == b"last", i
                assert await y.receive_some(10) == b"", i
                await y.send_eof()


@pytest.mark.parametrize("kind", ["copy", "auto", "splice", "trio-copy", "trio-auto"])
async def test_bulk_lifts_trios_notsent_lowat(kind: str) -> None:
    """trio caps unsent data at 16 KiB on its SocketStreams (TCP_NOTSENT_LOWAT); a direction
    that streams bulk data lifts that cap on its destination, small messages leave it."""
    skip_unless_splice(kind)
    lowat = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
    with trio.fail_after(DEADLINE):
        x, a = await tcp_pair()
        b, y = await tcp_pair()
        engine = not kind.startswith("trio-")
        splice = {"copy": False, "auto": None, "splice": True}[kind.removeprefix("trio-")]
        assert a.socket.getsockopt(socket.IPPROTO_TCP, lowat) == 1 << 14  # trio's default
        assert b.socket.getsockopt(socket.IPPROTO_TCP, lowat) == 1 << 14

        async def run_relay() -> None:
            await relay_sockets(a.socket, b.socket, use_splice=splice, engine=engine)

        async with running(run_relay), x, y:
            await transfer(x, y, b"small")
            await transfer(y, x, b"small")
            assert b.socket.getsockopt(socket.IPPROTO_TCP, lowat) == 1 << 14
            await transfer(x, y, random.randbytes(3_000_000))  # bulk, upward: a → b
            assert b.socket.getsockopt(socket.IPPROTO_TCP, lowat) == 0
            assert a.socket.getsockopt(socket.IPPROTO_TCP, lowat) == 1 << 14
            await x.send_eof()
            await y.send_eof()


@pytest.mark.parametrize("kind", ["copy", "auto", "splice"])
async def test_a_blocked_bulk_direction_pauses_its_source(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the destination is full, a bulk direction stops taking IN edges from its
    source (each would wake the engine for nothing); it resumes when the destination
    drains, and a FIN that arrived meanwhile is still seen."""
    import dask_gateway_common.engine as engine_module

    pauses: list[str] = []
    real_pause = engine_module._Direction._pause

    def pause(self: engine_module._Direction) -> None:
        pauses.append(self.name)
        real_pause(self)

    monkeypatch.setattr(engine_module._Direction, "_pause", pause)
    with trio.fail_after(DEADLINE):
        x, y, run_relay = await make_setup(kind)
        assert isinstance(x, trio.SocketStream)
        data = random.randbytes(24 << 20)
        async with running(run_relay), x, y:
            with trio.move_on_after(0.3):  # y does not read: the relay fills up and pauses
                await x.send_all(data)
            assert "up" in pauses
            received = bytearray()

            async def drain() -> None:
                while chunk := await y.receive_some(1 << 20):
                    received.extend(chunk)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                await x.send_all(data)  # whatever was not sent yet, and all of it again
                await x.send_eof()
            assert len(received) >= len(data)
            assert bytes(received[-len(data) :]) == data
            await y.send_eof()
