"""The scheduler proxy's data path: route each TLS connection by its SNI, never decrypting.

Theory of operation
-------------------
For every accepted connection (``trio.serve_listeners`` runs the accept loop, closes each
stream when its handler returns, and backs off on EMFILE/ENFILE):

1. **Hello.** Under ``hello_timeout``, read with ``sock.recv`` into a small growing buffer
   and feed it to the sans-IO parser (``parse_client_hello``) until it answers ``NotTLS``
   or ``ClientHello``. EOF, a reset, the deadline or a malformed hello close the
   connection (counted in ``hello_errors_total{reason}``).
2. **Decide** (``dispatch.decide``, pure): SNI ``daskgateway-<name>`` → that cluster's
   scheduler from the route table, looked up *now* and never again, so route changes
   leave established connections alone. Unknown clusters get the TLS ``unrecognized_name``
   alert. Non-TLS bytes and TLS for other names go to ``http_forward`` when it is set;
   otherwise non-TLS is closed and other names get ``unrecognized_name``.
3. **Connect** to the target under ``connect_timeout``; if that fails, a TLS client gets
   the ``internal_error`` alert.
4. **Relay** with the raw-socket fast path ``relay_sockets`` of ``dask_gateway_common``,
   first replaying the bytes already read, until both directions are done (half-closes
   are propagated).

Every per-connection failure is contained in its handler: it is logged, counted, and the
listener keeps serving everyone else. Alerts are sent, then the write side is shut and the
socket drained for a moment (bounded) so the alert is not lost to a TCP reset.

Two implementations of these rules exist. On Linux, ``serve_scheduler_proxy`` runs them
inside the relay engine thread (``fastpath.py``: no trio task per connection, about half
the CPU per new connection); elsewhere (no epoll), or with ``engine=False``, the
``SchedulerProxy`` below runs one trio task per connection. The tests run both.
"""

from __future__ import annotations

import logging
import socket as _stdlib_socket
from collections.abc import Callable

import trio

from dask_gateway_common.metrics import ProxyMetrics
from dask_gateway_common.relay import ENGINE_AVAILABLE, relay_sockets
from dask_gateway_common.routes import RouteTable
from dask_gateway_common.sni import (
    DEFAULT_MAX_HELLO_BYTES,
    INTERNAL_ERROR,
    UNRECOGNIZED_NAME,
    ClientHello,
    ClientHelloError,
    NeedData,
    NotTLS,
    parse_client_hello,
    tls_alert,
)

from .config import DEFAULT_CONNECT_TIMEOUT, DEFAULT_HELLO_TIMEOUT, ProxySettings
from .dispatch import Forward, Reject, decide
from .fastpath import serve_in_engine
from .sockets import bound_port, open_listen_sockets, open_listeners, open_tcp_socket

__all__ = ["SchedulerProxy", "serve_scheduler_proxy"]

log = logging.getLogger("dask_gateway.scheduler_proxy")

Address = tuple[str, int]

#: First read size for the hello; typical hellos are 0.5-2 KiB and fit in one read.
HELLO_READ_SIZE = 4096
#: After sending an alert, wait this long (at most) for the client to close first.
ALERT_LINGER = 1.0
_ALERT_DRAIN_BYTES = 64 * 1024
_ALERTS = {code: tls_alert(code) for code in (INTERNAL_ERROR, UNRECOGNIZED_NAME)}


class SchedulerProxy:
    """Per-connection logic of the proxy, shared by all listeners of one process."""

    def __init__(
        self,
        table: RouteTable,
        metrics: ProxyMetrics,
        *,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        http_forward: Address | None = None,
        max_hello_bytes: int = DEFAULT_MAX_HELLO_BYTES,
    ) -> None:
        self.table = table
        self.metrics = metrics
        self.hello_timeout = hello_timeout
        self.connect_timeout = connect_timeout
        self.http_forward = http_forward
        self.max_hello_bytes = max_hello_bytes
        up = metrics.bytes_total.labels(direction="up")
        down = metrics.bytes_total.labels(direction="down")
        up_inc, down_inc = up.inc, down.inc

        def on_bytes(direction: str, n: int) -> None:
            (up_inc if direction == "up" else down_inc)(n)

        self._on_bytes: Callable[[str, int], None] = on_bytes

    async def handle(self, stream: trio.SocketStream) -> None:
        """Serve one accepted connection; never raises (except cancellation)."""
        metrics = self.metrics
        metrics.connections_total.inc()
        metrics.connections_active.inc()
        try:
            await self._handle(stream.socket)
        except Exception:
            self._count("internal")
            log.exception("Unexpected error while proxying a connection")
        finally:
            metrics.connections_active.dec()

    def _count(self, reason: str) -> None:
        self.metrics.hello_errors_total.labels(reason=reason).inc()

    async def _handle(self, sock: trio.socket.SocketType) -> None:
        hello = await self._read_hello(sock)
        if hello is None:
            return
        buf, result = hello
        action = decide(result, self.table.sni_target, self.http_forward)
        if isinstance(action, Reject):
            self._count(action.reason)
            log.debug("Rejecting connection: %s", action.reason)
            if action.alert is not None:
                await _send_alert_and_close(sock, action.alert)
            return
        backend = await self._connect(action)
        if backend is None:
            self._count("connect_failed")
            if isinstance(result, ClientHello):
                await _send_alert_and_close(sock, INTERNAL_ERROR)
            return
        self._on_bytes("up", len(buf))  # the hello (and anything behind it), replayed
        await relay_sockets(sock, backend, prefix_to_b=buf, on_bytes=self._on_bytes)

    async def _read_hello(
        self, sock: trio.socket.SocketType
    ) -> tuple[bytes, ClientHello | NotTLS] | None:
        """The bytes read until the parser decided, and its answer; None (counted) if the
        client failed to send a usable hello in time."""
        buf = b""
        want = HELLO_READ_SIZE
        try:
            with trio.fail_after(self.hello_timeout):
                while True:
                    data = await sock.recv(want)
                    if not data:
                        self._count("eof")
                        return None
                    buf += data
                    result = parse_client_hello(buf, self.max_hello_bytes)
                    if not isinstance(result, NeedData):
                        return buf, result
                    want = max(HELLO_READ_SIZE, result.at_least - len(buf))
        except trio.TooSlowError:
            self._count("timeout")
            log.debug("Client did not finish its ClientHello in %.3gs", self.hello_timeout)
        except ClientHelloError as exc:
            self._count(exc.reason)
            log.debug("Malformed ClientHello: %s", exc)
        except OSError as exc:
            self._count("reset")
            log.debug("Client connection failed during the hello: %s", exc)
        return None

    async def _connect(self, action: Forward) -> trio.socket.SocketType | None:
        host, port = action.address
        try:
            with trio.fail_after(self.connect_timeout):
                return await open_tcp_socket(host, port)
        except (OSError, trio.TooSlowError) as exc:
            what = f"cluster {action.cluster}" if action.cluster else "HTTP forward"
            log.warning(
                "Cannot connect to %s at %s:%d: %s",
                what,
                host,
                port,
                "timed out" if isinstance(exc, trio.TooSlowError) else exc,
            )
            return None


async def _send_alert_and_close(sock: trio.socket.SocketType, description: int) -> None:
    """Send a fatal TLS alert, shut our side, and drain briefly so the alert arrives."""
    alert = _ALERTS.get(description) or tls_alert(description)
    try:
        await sock.send(alert)
        sock.shutdown(_stdlib_socket.SHUT_WR)
        with trio.move_on_after(ALERT_LINGER):
            drained = 0
            while drained < _ALERT_DRAIN_BYTES:
                data = await sock.recv(HELLO_READ_SIZE)
                if not data:
                    break
                drained += len(data)
    except OSError:
        pass
    finally:
        sock.close()


async def serve_scheduler_proxy(
    settings: ProxySettings,
    table: RouteTable,
    metrics: ProxyMetrics,
    *,
    reuse_port: bool | None = None,
    handler_nursery: trio.Nursery | None = None,
    engine: bool | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``settings.address`` and proxy every connection; reports the bound port.

    ``reuse_port`` defaults to ``settings.workers > 1``. Connections run in
    ``handler_nursery`` when given (so a caller can stop accepting but let connections
    drain), else in a nursery of this call. ``engine``: None = the relay engine's fast path
    (``fastpath.py``) where available (Linux), False = a trio task per connection.
    """
    if reuse_port is None:
        reuse_port = settings.workers > 1
    if engine is None:
        engine = ENGINE_AVAILABLE
    host, port = settings.address
    if engine:
        sockets = await open_listen_sockets(host, port, reuse_port=reuse_port)
        log.info("Scheduler proxy listening on %s:%d", host, bound_port(sockets))
        await serve_in_engine(
            sockets,
            table,
            metrics,
            hello_timeout=settings.hello_timeout,
            connect_timeout=settings.connect_timeout,
            http_forward=settings.http_forward,
            max_hello_bytes=DEFAULT_MAX_HELLO_BYTES,
            handler_nursery=handler_nursery,
            task_status=task_status,
        )
        return
    listeners = await open_listeners(host, port, reuse_port=reuse_port)
    proxy = SchedulerProxy(
        table,
        metrics,
        hello_timeout=settings.hello_timeout,
        connect_timeout=settings.connect_timeout,
        http_forward=settings.http_forward,
    )
    port = bound_port(listeners)
    log.info("Scheduler proxy listening on %s:%d", host, port)

    try:
        # The sockets already listen: connections queue in the backlog until accepted.
        task_status.started(port)
        await trio.serve_listeners(proxy.handle, listeners, handler_nursery=handler_nursery)
    finally:
        for listener in listeners:
            listener.socket.close()
