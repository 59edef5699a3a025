"""Keep-alive pool of upstream HTTP connections, per origin.

Theory of operation
-------------------
:class:`IdleSet` is the pure bookkeeping: idle items per key with the time they went idle,
a bound per key and a bound overall (the oldest idle item is evicted first), and an idle
lifetime. It never closes anything; it hands back what must be closed.

:class:`UpstreamPool` is the I/O shell. ``acquire(target)`` takes the most recently idle
connection for the target's origin, skipping (and closing) any the upstream has closed in
the meantime: on a plain socket a zero-timeout ``poll(2)`` (any readiness on an idle
connection, EOF or stray bytes, makes it unusable), under TLS a non-blocking ``MSG_PEEK``
(EOF closes it; records such as session tickets do not). If none is left it connects
afresh. ``release(origin, conn)`` puts a connection back when it can carry another
request (complete exchange, keep-alive on both sides), otherwise closes it.
``sweep()`` (called periodically by the proxy) drops idle connections past their lifetime
or closed by the peer, so half-dead sockets do not linger.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import trio

from dask_gateway_common.http import HTTPConnection, open_http_connection

from .routing import Target

__all__ = ["IdleSet", "Origin", "UpstreamPool", "connection_is_open"]

log = logging.getLogger("dask_gateway.web_proxy")

K = TypeVar("K")
T = TypeVar("T")
Origin = tuple[str, str, int]

_HAS_POLL = hasattr(select, "poll")
_POLL_READ = (select.POLLIN | select.POLLPRI) if _HAS_POLL else 0


@dataclass
class _Entry(Generic[T]):
    item: T
    since: float


class IdleSet(Generic[K, T]):
    """Idle items per key, newest last; bounded per key and overall; pure (no I/O)."""

    def __init__(self, *, max_per_key: int, max_total: int, lifetime: float) -> None:
        if max_per_key < 0 or max_total < 0 or lifetime <= 0:
            raise ValueError("pool bounds must be >= 0 and the lifetime > 0")
        self.max_per_key = max_per_key
        self.max_total = max_total
        self.lifetime = lifetime
        # OrderedDict of key -> list of entries; the dict order tracks nothing, the
        # overall-oldest is found by scanning heads (keys are few: one per live target).
        self._idle: OrderedDict[K, list[_Entry[T]]] = OrderedDict()
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def count(self, key: K) -> int:
        return len(self._idle.get(key, ()))

    def put(self, key: K, item: T, now: float) -> list[T]:
        """Add an idle item; returns the items evicted to respect the bounds (maybe it)."""
        if self.max_per_key == 0 or self.max_total == 0:
            return [item]
        evicted: list[T] = []
        entries = self._idle.setdefault(key, [])
        if len(entries) >= self.max_per_key:
            evicted.append(entries.pop(0).item)
            self._total -= 1
        entries.append(_Entry(item, now))
        self._total += 1
        while self._total > self.max_total:
            oldest_key = min(self._idle, key=lambda k: self._idle[k][0].since)
            evicted.append(self._pop_oldest(oldest_key))
        return evicted

    def _pop_oldest(self, key: K) -> T:
        entries = self._idle[key]
        entry = entries.pop(0)
        self._total -= 1
        if not entries:
            del self._idle[key]
        return entry.item

    def take(self, key: K, now: float) -> tuple[T | None, list[T]]:
        """The newest idle item for ``key`` still in its lifetime, plus the expired ones."""
        entries = self._idle.get(key)
        expired: list[T] = []
        found: T | None = None
        while entries:
            entry = entries.pop()
            self._total -= 1
            if now - entry.since < self.lifetime:
                found = entry.item
                break
            expired.append(entry.item)
        if entries is not None and not entries:
            del self._idle[key]
        # anything older than an expired entry is expired too
        if found is not None and entries:
            while entries and now - entries[0].since >= self.lifetime:
                expired.append(self._pop_oldest(key))
        return found, expired

    def sweep(self, now: float, keep: Callable[[T], bool] = lambda _: True) -> list[T]:
        """Remove and return the expired items and those ``keep`` rejects."""
        removed: list[T] = []
        for key in list(self._idle):
            entries = self._idle[key]
            kept = []
            for entry in entries:
                if now - entry.since < self.lifetime and keep(entry.item):
                    kept.append(entry)
                else:
                    removed.append(entry.item)
            self._total -= len(entries) - len(kept)
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        return removed

    def drain(self) -> list[T]:
        """Remove and return everything."""
        items = [e.item for entries in self._idle.values() for e in entries]
        self._idle.clear()
        self._total = 0
        return items


def connection_is_open(connection: HTTPConnection) -> bool:
    """Whether an idle connection's peer has not closed it (non-blocking socket peek).

    On a plain socket any readable byte on an idle connection is a protocol violation, so
    only "would block" counts as open. Under TLS the peer may legitimately have sent
    records (session tickets), so only EOF or an error counts as closed.
    """
    stream = connection.stream
    tls = isinstance(stream, trio.SSLStream)
    inner = stream.transport_stream if tls else stream
    sock = getattr(inner, "socket", None)
    if sock is None:
        return True  # not a socket (tests with memory streams): assume open
    fd = sock.fileno()
    if fd < 0:
        return False
    if not tls and _HAS_POLL:
        # One poll(2) with a zero timeout: any readiness (bytes, EOF, error) means the
        # connection cannot carry another request.
        poller = select.poll()
        poller.register(fd, _POLL_READ)
        return not poller.poll(0)
    # A stdlib socket object over the same fd, only to peek: detached (never closed)
    # afterwards, the trio socket owns the fd. Family and type are given so nothing is
    # asked of the kernel but the peek itself.
    probe = socket.socket(sock.family, sock.type, sock.proto, fd)
    try:
        data = probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        probe.detach()
    return bool(data) and tls


class UpstreamPool:
    """Per-origin keep-alive connections to upstream HTTP servers.

    The idle bounds are generous on purpose: a connection is held only while a request
    is in flight, so with N concurrent clients of one dashboard up to N upstream
    connections are busy at once; keeping fewer than that idle would close and reopen
    connections on every burst (measured: with 16 per origin and 64 concurrent clients,
    about every second request paid for a new upstream connection).
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        max_idle_per_origin: int = 128,
        max_idle_total: int = 1024,
        idle_lifetime: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self._idle: IdleSet[Origin, HTTPConnection] = IdleSet(
            max_per_key=max_idle_per_origin, max_total=max_idle_total, lifetime=idle_lifetime
        )
        self._ssl_context = ssl_context
        self.connections_opened = 0

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def _client_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def acquire(self, target: Target) -> tuple[HTTPConnection, bool]:
        """A connection to ``target``'s origin and whether it was reused from the pool.

        Raises ``OSError`` / ``trio.TooSlowError`` / ``ssl.SSLError`` when a new
        connection cannot be made.
        """
        origin = target.origin
        while True:
            connection, expired = self._idle.take(origin, trio.current_time())
            if expired:
                await _close_all(expired)
            if connection is None:
                break
            if connection.reusable and connection_is_open(connection):
                return connection, True
            await connection.aclose()
        context = self._client_context() if target.scheme == "https" else None
        connection = await open_http_connection(
            target.host,
            target.port,
            ssl_context=context,
            connect_timeout=self.connect_timeout,
        )
        self.connections_opened += 1
        return connection, False

    async def release(self, origin: Origin, connection: HTTPConnection) -> None:
        """Return a connection after a complete exchange (closed if it cannot be reused)."""
        if not connection.reusable:
            await connection.aclose()
            return
        evicted = self._idle.put(origin, connection, trio.current_time())
        if evicted:
            await _close_all(evicted)

    async def sweep(self) -> int:
        """Close idle connections that expired or that the upstream closed; returns how many."""
        removed = self._idle.sweep(trio.current_time(), connection_is_open)
        await _close_all(removed)
        return len(removed)

    async def run_sweeper(
        self, interval: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Sweep every ``interval`` seconds, forever."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            count = await self.sweep()
            if count:
                log.debug("Closed %d idle upstream connection(s)", count)

    async def aclose(self) -> None:
        await _close_all(self._idle.drain())


async def _close_all(connections: list[HTTPConnection]) -> None:
    if not connections:
        return
    with trio.CancelScope(shield=True):
        for connection in connections:
            await connection.aclose()
