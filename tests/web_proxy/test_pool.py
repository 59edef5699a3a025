"""The upstream keep-alive pool: pure idle bookkeeping and the socket liveness probe."""

from __future__ import annotations

import pytest
import trio

from dask_gateway_web_proxy.pool import IdleSet, UpstreamPool, connection_is_open
from dask_gateway_web_proxy.routing import parse_target


def test_idle_set_lifo_per_key() -> None:
    s: IdleSet[str, str] = IdleSet(max_per_key=4, max_total=10, lifetime=10)
    assert s.put("a", "a1", 0) == []
    assert s.put("a", "a2", 1) == []
    assert s.put("b", "b1", 1) == []
    assert len(s) == 3
    assert s.take("a", 2) == ("a2", [])
    assert s.take("a", 2) == ("a1", [])
    assert s.take("a", 2) == (None, [])
    assert s.count("b") == 1 and len(s) == 1


def test_idle_set_bounds() -> None:
    s: IdleSet[str, str] = IdleSet(max_per_key=2, max_total=3, lifetime=10)
    s.put("a", "a1", 0)
    s.put("a", "a2", 1)
    assert s.put("a", "a3", 2) == ["a1"]  # per-key bound evicts that key's oldest
    s.put("b", "b1", 3)
    assert s.put("c", "c1", 4) == ["a2"]  # overall bound evicts the overall oldest
    assert len(s) == 3
    assert IdleSet(max_per_key=0, max_total=3, lifetime=1).put("a", "x", 0) == ["x"]
    with pytest.raises(ValueError):
        IdleSet(max_per_key=1, max_total=1, lifetime=0)


def test_idle_set_expiry_and_sweep() -> None:
    s: IdleSet[str, str] = IdleSet(max_per_key=5, max_total=5, lifetime=10)
    s.put("a", "old", 0)
    s.put("a", "mid", 5)
    s.put("a", "new", 9)
    found, expired = s.take("a", 12)
    assert found == "new"
    assert expired == ["old"]
    assert s.count("a") == 1
    s.put("b", "dead", 11)
    s.put("b", "alive", 11)
    removed = s.sweep(16, keep=lambda item: item != "dead")
    assert sorted(removed) == ["dead", "mid"]
    assert len(s) == 1
    found, expired = s.take("b", 30)
    assert found is None and expired == ["alive"]
    assert len(s) == 0
    s.put("c", "x", 0)
    assert s.drain() == ["x"] and len(s) == 0


async def _serve_keepalive(
    listener: trio.SocketListener, accepted: list[trio.SocketStream], close_after: trio.Event
) -> None:
    """Answer one request per accepted connection, then close it when told to."""
    stream = await listener.accept()
    accepted.append(stream)
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(4096)
    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await close_after.wait()
    await stream.aclose()


async def test_pool_reuses_and_drops_connections_the_upstream_closed() -> None:
    with trio.fail_after(10):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        listener = listeners[0]
        port = listener.socket.getsockname()[1]
        target = parse_target(f"http://127.0.0.1:{port}")
        pool = UpstreamPool(connect_timeout=5)
        accepted: list[trio.SocketStream] = []
        close_now = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_keepalive, listener, accepted, close_now)
            conn, reused = await pool.acquire(target)
            assert not reused
            resp = await conn.request("GET", "/", [], b"")
            assert await resp.read() == b"ok"
            assert connection_is_open(conn)
            await pool.release(target.origin, conn)
            assert pool.idle_count == 1

            again, reused = await pool.acquire(target)
            assert reused and again is conn
            await pool.release(target.origin, again)

            # the upstream closes the idle connection: the probe notices it
            close_now.set()
            await trio.lowlevel.wait_readable(conn.stream.socket)
            assert not connection_is_open(conn)
            nursery.start_soon(_serve_keepalive, listener, accepted, trio.Event())
            fresh, reused = await pool.acquire(target)
            assert not reused and fresh is not conn
            assert pool.connections_opened == 2
            await fresh.aclose()
            nursery.cancel_scope.cancel()
        await pool.aclose()
        for s in accepted:
            await s.aclose()
        await listener.aclose()


async def test_sweep_closes_dead_idle_connections() -> None:
    with trio.fail_after(10):
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        port = listener.socket.getsockname()[1]
        target = parse_target(f"http://127.0.0.1:{port}")
        pool = UpstreamPool(connect_timeout=5)
        accepted: list[trio.SocketStream] = []
        close_now = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_serve_keepalive, listener, accepted, close_now)
            conn, _ = await pool.acquire(target)
            await (await conn.request("GET", "/", [], b"")).read()
            await pool.release(target.origin, conn)
            assert await pool.sweep() == 0
            close_now.set()
            await trio.lowlevel.wait_readable(conn.stream.socket)
            assert not connection_is_open(conn)
            assert await pool.sweep() == 1
            assert pool.idle_count == 0
        await listener.aclose()


async def test_connect_refused_raises_oserror() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    pool = UpstreamPool(connect_timeout=5)
    with trio.fail_after(10), pytest.raises(OSError):
        await pool.acquire(parse_target(f"http://127.0.0.1:{port}"))
