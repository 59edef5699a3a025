"""Load generators. Each runs inside a forked child process (see :func:`run_children`) so
the harness can account its CPU separately from the proxy's and the backends'.

Blocking ``ssl`` sockets are used for bulk transfers and sequential handshakes (the GIL is
released while OpenSSL works); stdlib asyncio for many concurrent connections. Every loop
is bounded by a byte count, a connection count or a deadline.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import socket
import ssl
import time
import traceback
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import Empty

CHUNK = 256 * 1024
_ZEROS = bytes(CHUNK)
PAYLOAD = bytes(range(64))

Addr = tuple[str, int]


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class ChildResult:
    """What a load child reports: its own CPU in the window and workload numbers."""

    cpu: float = 0.0
    count: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    latencies: array = field(default_factory=lambda: array("d"))
    errors: int = 0
    error: str = ""


def _child_main(fn: Callable[..., ChildResult], args: tuple, ready, go, queue) -> None:
    try:
        result = fn(*args, ready=ready, go=go)
    except BaseException as exc:  # report, never hang the parent
        result = ChildResult(error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        ready.release()
    queue.put(result)


def run_children(
    fn: Callable[..., ChildResult],
    args_list: list[tuple],
    on_go: Callable[[], None],
    on_done: Callable[[], None],
    timeout: float,
) -> list[ChildResult]:
    """Fork one child per ``args``; when all are ready call ``on_go`` and release them;
    call ``on_done`` as soon as every child has reported. Raises on a child error."""
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Semaphore(0)
    go = ctx.Event()
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_child_main, args=(fn, args, ready, go, queue), daemon=True)
        for args in args_list
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        for _ in procs:
            if not ready.acquire(timeout=max(0.1, deadline - time.monotonic())):
                raise TimeoutError("load generator did not get ready in time")
        on_go()
        go.set()
        try:
            results = [queue.get(timeout=max(0.1, deadline - time.monotonic())) for _ in procs]
        except Empty:
            raise TimeoutError(f"load generator did not finish within {timeout:g} s") from None
        on_done()
    finally:
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError("load generator failed: " + errors[0])
    return results


# -- TLS scheduler-style workloads ----------------------------------------------------------


def _tls_connect(addr: Addr, ctx: ssl.SSLContext, sni: str, timeout: float = 30) -> ssl.SSLSocket:
    raw = socket.create_connection(addr, timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(raw, server_hostname=sni)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed early")
        data += chunk
    return data


def bulk_upload(
    addr: Addr, ctx: ssl.SSLContext, sni: str, nbytes: int, *, ready, go
) -> ChildResult:
    """Send ``nbytes`` through one TLS connection to the sink; time until it confirms."""
    with _tls_connect(addr, ctx, sni) as s:
        ready.release()
        go.wait()
        cpu0, t0 = _cpu_self(), time.perf_counter()
        s.sendall(b"S" + nbytes.to_bytes(8, "big"))
        view = memoryview(_ZEROS)
        remaining = nbytes
        while remaining > 0:
            k = min(remaining, CHUNK)
            s.sendall(view[:k])
            remaining -= k
        if _recv_exact(s, 1) != b"K":
            raise ConnectionError("sink did not confirm")
        return ChildResult(cpu=_cpu_self() - cpu0, nbytes=nbytes, seconds=time.perf_counter() - t0)


def bulk_download(
    addr: Addr, ctx: ssl.SSLContext, sni: str, nbytes: int, *, ready, go
) -> ChildResult:
    """Receive ``nbytes`` from the source through one TLS connection."""
    with _tls_connect(addr, ctx, sni) as s:
        ready.release()
        go.wait()
        cpu0, t0 = _cpu_self(), time.perf_counter()
        s.sendall(b"G" + nbytes.to_bytes(8, "big"))
        buf = bytearray(1 << 20)
        got = 0
        while got < nbytes:
            n = s.recv_into(buf)
            if not n:
                raise ConnectionError(f"source closed after {got} of {nbytes} bytes")
            got += n
        return ChildResult(cpu=_cpu_self() - cpu0, nbytes=got, seconds=time.perf_counter() - t0)


def handshakes(addr: Addr, ctx: ssl.SSLContext, sni: str, count: int, *, ready, go) -> ChildResult:
    """``count`` sequential connections: TCP connect, full mutual-TLS handshake (no session
    reuse), one 1-byte round trip, close. Latency covers all of it."""
    ready.release()
    go.wait()
    lat = array("d")
    cpu0, t0 = _cpu_self(), time.perf_counter()
    for _ in range(count):
        start = time.perf_counter()
        with _tls_connect(addr, ctx, sni) as s:
            s.sendall(b"P")
            if _recv_exact(s, 1) != b"P":
                raise ConnectionError("bad ping answer")
        lat.append(time.perf_counter() - start)
    return ChildResult(
        cpu=_cpu_self() - cpu0, count=count, seconds=time.perf_counter() - t0, latencies=lat
    )


def concurrent_rtt(
    addr: Addr, ctx: ssl.SSLContext, sni: str, conns: int, duration: float, *, ready, go
) -> ChildResult:
    """Open ``conns`` TLS connections, then each does 64-byte round trips for ``duration``."""
    return asyncio.run(_concurrent_rtt(addr, ctx, sni, conns, duration, ready, go))


async def _concurrent_rtt(addr, ctx, sni, conns, duration, ready, go) -> ChildResult:
    limit = asyncio.Semaphore(32)  # handshakes in flight while ramping up

    async def connect():
        async with limit:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*addr, ssl=ctx, server_hostname=sni), 60
            )
        writer.write(b"E")
        return reader, writer

    streams = await asyncio.gather(*(connect() for _ in range(conns)))
    ready.release()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    lat = array("d")
    count = 0
    cpu0, t0 = _cpu_self(), time.perf_counter()
    end = t0 + duration
    perf = time.perf_counter

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while True:
            start = perf()
            if start >= end:
                return
            writer.write(PAYLOAD)
            await reader.readexactly(64)
            lat.append(perf() - start)
            count += 1

    await asyncio.wait_for(asyncio.gather(*(worker(r, w) for r, w in streams)), duration + 30)
    result = ChildResult(
        cpu=_cpu_self() - cpu0, count=count, seconds=time.perf_counter() - t0, latencies=lat
    )
    for _, writer in streams:
        writer.transport.abort()
    return result


# -- HTTP workloads -------------------------------------------------------------------------


class HTTPResponseError(Exception):
    pass


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response; returns the body size. Handles Content-Length and chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    if not status_line.startswith(b"HTTP/1.1 200"):
        raise HTTPResponseError(status_line.decode("latin-1"))
    length, chunked = None, False
    for line in header_block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return total
            await reader.readexactly(size + 2)
            total += size
    if length is None:
        raise HTTPResponseError("response without a length (needs keep-alive)")
    await reader.readexactly(length)
    return length


def http_gets(addr: Addr, path: str, conns: int, duration: float, *, ready, go) -> ChildResult:
    """``conns`` keep-alive connections each doing sequential small GETs for ``duration``."""
    return asyncio.run(_http_gets(addr, path, conns, duration, ready, go))


async def _http_gets(addr, path, conns, duration, ready, go) -> ChildResult:
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nUser-Agent: bench\r\n\r\n"
    ).encode()
    streams = [await asyncio.open_connection(*addr) for _ in range(conns)]
    ready.release()
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    lat = array("d")
    count = 0
    cpu0, t0 = _cpu_self(), time.perf_counter()
    end = t0 + duration
    perf = time.perf_counter

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while True:
            start = perf()
            if start >= end:
                return
            writer.write(request)
            await _read_response(reader)
            lat.append(perf() - start)
            count += 1

    await asyncio.wait_for(asyncio.gather(*(worker(r, w) for r, w in streams)), duration + 30)
    result = ChildResult(
        cpu=_cpu_self() - cpu0, count=count, seconds=time.perf_counter() - t0, latencies=lat
    )
    for _, writer in streams:
        writer.transport.abort()
    return result


class _ChunkCounter:
    """Counts the payload bytes of a chunked body fed in arbitrary pieces (sans-IO)."""

    def __init__(self) -> None:
        self.total = 0
        self.done = False
        self._need = 0  # payload bytes (+2 for CRLF) still to skip in the current chunk
        self._line = bytearray()

    def feed(self, data: memoryview) -> None:
        i, n = 0, len(data)
        while i < n and not self.done:
            if self._need:
                k = min(self._need, n - i)
                self._need -= k
                i += k
                continue
            j = bytes(data[i : min(n, i + 64)]).find(b"\n")
            if j < 0:
                self._line += data[i : min(n, i + 64)]
                i = min(n, i + 64)
                if len(self._line) > 4096:
                    raise HTTPResponseError("chunk size line too long")
                continue
            self._line += data[i : i + j + 1]
            i += j + 1
            line = bytes(self._line).strip()
            self._line.clear()
            if not line:
                continue  # blank line after trailers
            size = int(line.split(b";")[0], 16)
            if size == 0:
                self.done = True
            else:
                self.total += size
                self._need = size + 2


def http_download(addr: Addr, path: str, nbytes: int, *, ready, go) -> ChildResult:
    """GET ``path`` (an ``nbytes`` body) on one connection and count the body bytes."""
    with socket.create_connection(addr, timeout=60) as s:
        ready.release()
        go.wait()
        cpu0, t0 = _cpu_self(), time.perf_counter()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr[0]}\r\nUser-Agent: bench\r\n\r\n".encode())
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        head = bytearray()
        while (end := head.find(b"\r\n\r\n")) < 0:
            if len(head) > 65536:
                raise HTTPResponseError("response head too large")
            n = s.recv_into(buf)
            if not n:
                raise ConnectionError("closed before the response head")
            head += view[:n]
        end += 4
        header_text = bytes(head[:end]).decode("latin-1").lower()
        if not header_text.startswith("http/1.1 200"):
            raise HTTPResponseError(header_text.split("\r\n", 1)[0])
        first = memoryview(bytes(head[end:]))
        chunked = "transfer-encoding: chunked" in header_text
        got = 0
        if chunked:
            counter = _ChunkCounter()
            counter.feed(first)
            while not counter.done:
                n = s.recv_into(buf)
                if not n:
                    raise ConnectionError("closed inside a chunked body")
                counter.feed(view[:n])
            got = counter.total
        else:
            got = len(first)
            while got < nbytes:
                n = s.recv_into(buf)
                if not n:
                    raise ConnectionError(f"closed after {got} of {nbytes} body bytes")
                got += n
        if got != nbytes:
            raise HTTPResponseError(f"body was {got} bytes, expected {nbytes}")
        return ChildResult(cpu=_cpu_self() - cpu0, nbytes=got, seconds=time.perf_counter() - t0)
