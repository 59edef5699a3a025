"""Tests for PrefixedStream (dask_gateway_common.streams)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from dask_gateway_common.streams import PrefixedStream

DEADLINE = 20


async def prefixed_pair() -> tuple[PrefixedStream, PrefixedStream]:
    a, b = trio.testing.memory_stream_pair()
    return PrefixedStream(a, b""), PrefixedStream(b, b"")


async def drained_prefixed_pair() -> tuple[PrefixedStream, PrefixedStream]:
    """Both ends had a prefix, already received: the stream is then a plain stream."""
    a, b = trio.testing.memory_stream_pair()
    pa, pb = PrefixedStream(a, b"abc"), PrefixedStream(b, b"x")
    assert await pa.receive_some(2) == b"ab"
    assert await pa.receive_some() == b"c"
    assert await pb.receive_some(100) == b"x"
    return pa, pb


async def clogged_prefixed_pair() -> tuple[PrefixedStream, PrefixedStream]:
    a, b = trio.testing.lockstep_stream_pair()
    return PrefixedStream(a, b""), PrefixedStream(b, b"")


async def test_generic_half_closeable_contract() -> None:
    with trio.fail_after(DEADLINE):
        await trio.testing.check_half_closeable_stream(prefixed_pair, clogged_prefixed_pair)


async def test_generic_contract_after_prefix_is_drained() -> None:
    with trio.fail_after(DEADLINE):
        await trio.testing.check_half_closeable_stream(drained_prefixed_pair, None)


async def test_prefix_comes_first_then_the_stream() -> None:
    with trio.fail_after(DEADLINE):
        a, b = trio.testing.memory_stream_pair()
        p = PrefixedStream(b, bytearray(b"hello "))
        await a.send_all(b"world")
        assert p.prefix == b"hello "
        assert await p.receive_some(3) == b"hel"
        assert p.prefix == b"lo "
        assert await p.receive_some() == b"lo "
        assert p.prefix == b""
        assert await p.receive_some() == b"world"
        await p.send_all(b"back")
        assert await a.receive_some() == b"back"
        await a.send_eof()
        assert await p.receive_some() == b""


async def test_receive_some_is_a_checkpoint_and_validates_max_bytes() -> None:
    with trio.fail_after(DEADLINE):
        a, b = trio.testing.memory_stream_pair()
        p = PrefixedStream(b, b"data")
        with trio.testing.assert_checkpoints():
            assert await p.receive_some(1) == b"d"
        for bad in (0, -1):
            with pytest.raises(ValueError):
                await p.receive_some(bad)
        with pytest.raises(TypeError):
            await p.receive_some(1.5)  # type: ignore[arg-type]
        assert await p.receive_some() == b"ata"


async def test_concurrent_receive_is_busy() -> None:
    with trio.fail_after(DEADLINE):
        a, b = trio.testing.memory_stream_pair()
        p = PrefixedStream(b, b"xy")
        with pytest.RaisesGroup(trio.BusyResourceError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(p.receive_some, 1)
                nursery.start_soon(p.receive_some, 1)


async def test_closed_stream_does_not_replay() -> None:
    with trio.fail_after(DEADLINE):
        a, b = trio.testing.memory_stream_pair()
        p = PrefixedStream(b, b"unread")
        await p.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await p.receive_some()
        with pytest.raises(trio.ClosedResourceError):
            await p.send_all(b"x")
        await p.aclose()  # idempotent


async def test_close_during_prefix_receive() -> None:
    with trio.fail_after(DEADLINE):
        a, b = trio.testing.memory_stream_pair()
        p = PrefixedStream(b, b"unread")

        async def receive() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await p.receive_some()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(p.aclose)


async def test_send_eof_needs_half_closeable_stream() -> None:
    with trio.fail_after(DEADLINE):
        send, receive = trio.testing.memory_stream_one_way_pair()
        plain = trio.StapledStream(send, receive)  # half-closeable
        assert isinstance(plain, trio.abc.HalfCloseableStream)

        class NotHalfCloseable(trio.abc.Stream):
            async def send_all(self, data: bytes | bytearray | memoryview) -> None:
                await trio.lowlevel.checkpoint()

            async def wait_send_all_might_not_block(self) -> None:
                await trio.lowlevel.checkpoint()

            async def receive_some(self, max_bytes: int | None = None) -> bytes:
                await trio.lowlevel.checkpoint()
                return b""

            async def aclose(self) -> None:
                await trio.lowlevel.checkpoint()

        with pytest.raises(NotImplementedError):
            await PrefixedStream(NotHalfCloseable(), b"").send_eof()
        p = PrefixedStream(plain, b"")
        await p.send_eof()
        assert await receive.receive_some() == b""


async def test_over_a_real_socket() -> None:
    with trio.fail_after(DEADLINE):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with listeners[0]:
            client = await trio.open_tcp_stream("127.0.0.1", port)
            server = await listeners[0].accept()
            async with client, server:
                await client.send_all(b"GET /")
                head = await server.receive_some(5)
                p = PrefixedStream(server, head)
                await client.send_all(b" HTTP/1.1")
                got = b""
                while len(got) < 14:
                    got += await p.receive_some()
                assert got == b"GET / HTTP/1.1"
                await client.send_eof()
                assert await p.receive_some() == b""
                await p.send_eof()
                assert await client.receive_some() == b""
