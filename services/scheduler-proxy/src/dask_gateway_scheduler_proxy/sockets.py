"""Socket plumbing of the hot path: cheap outgoing connects and SO_REUSEPORT listeners.

``open_tcp_socket`` skips what ``trio.open_tcp_stream`` / ``trio.socket.connect`` spend per
call (a happy-eyeballs nursery, a second address resolution inside ``connect``): routes
hold IP literals, so numeric addresses are resolved once and remembered (bounded cache),
and the connect is one non-blocking ``connect_ex`` plus, at most, one wait for
writability. Host names (e.g. Kubernetes service names) are resolved on every connect,
in a thread, so DNS changes are honoured.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import trio

__all__ = [
    "AddrInfo",
    "bound_port",
    "numeric_addresses",
    "open_listen_sockets",
    "open_listeners",
    "open_tcp_socket",
]

_BACKLOG = 65535  # capped by the kernel (net.core.somaxconn)
_NUMERIC_CACHE_MAX = 4096

AddrInfo = tuple[int, int, int, Any]  # family, type, proto, sockaddr
_numeric_cache: dict[tuple[str, int], list[AddrInfo]] = {}


def numeric_addresses(host: str, port: int) -> list[AddrInfo] | None:
    """Resolve an IP literal without blocking (cached); None for a host name."""
    key = (host, port)
    infos = _numeric_cache.get(key)
    if infos is not None:
        return infos
    try:
        raw = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        )
    except socket.gaierror:
        return None
    infos = [(family, type_, proto, sockaddr) for family, type_, proto, _, sockaddr in raw]
    if len(_numeric_cache) >= _NUMERIC_CACHE_MAX:
        _numeric_cache.clear()
    _numeric_cache[key] = infos
    return infos


async def _resolve(host: str, port: int) -> list[AddrInfo]:
    infos = numeric_addresses(host, port)
    if infos is not None:
        return infos
    raw = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, type_, proto, sockaddr) for family, type_, proto, _, sockaddr in raw]


async def _connect_one(info: AddrInfo) -> socket.socket:
    family, type_, proto, sockaddr = info
    sock = socket.socket(family, type_, proto)
    try:
        sock.setblocking(False)
        code = sock.connect_ex(sockaddr)
        if code == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, f"connect to {sockaddr}: {errno.errorcode.get(code, code)}")
    except BaseException:
        sock.close()
        raise
    return sock


async def open_tcp_socket(host: str, port: int) -> trio.socket.SocketType:
    """A connected TCP socket to ``host:port``, trying each resolved address in turn.

    Put a deadline around it; a cancelled attempt closes its socket.
    """
    error: OSError | None = None
    for info in await _resolve(host, port):
        try:
            sock = await _connect_one(info)
        except OSError as exc:
            error = exc
            continue
        return trio.socket.from_stdlib_socket(sock)
    raise error or OSError(errno.EHOSTUNREACH, f"no address for {host!r}")


async def open_listen_sockets(
    host: str, port: int, *, reuse_port: bool = False
) -> list[socket.socket]:
    """Bound, listening, non-blocking TCP sockets on ``host:port`` (one per resolved address).

    ``reuse_port`` sets ``SO_REUSEPORT`` so several processes can share the port and the
    kernel spreads new connections across them.
    """
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, type_, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, type_, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setblocking(False)
            sock.bind(sockaddr)
            sock.listen(_BACKLOG)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(errno.EADDRNOTAVAIL, f"no address to listen on for {host!r}")
    return sockets


async def open_listeners(
    host: str, port: int, *, reuse_port: bool = False
) -> list[trio.SocketListener]:
    """``open_listen_sockets`` wrapped as trio listeners."""
    sockets = await open_listen_sockets(host, port, reuse_port=reuse_port)
    return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets]


def bound_port(listeners: list[trio.SocketListener] | list[socket.socket]) -> int:
    """The port the first listener is bound to (resolves a requested port 0)."""
    first = listeners[0]
    sock = first.socket if isinstance(first, trio.SocketListener) else first
    return int(sock.getsockname()[1])
