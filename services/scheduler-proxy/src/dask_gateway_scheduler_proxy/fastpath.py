"""The scheduler proxy's data path run inside the relay engine thread (Linux).

Theory of operation
-------------------
``proxy.py`` describes what the proxy does with a connection; this module does the same
without a trio task per connection. Accepting, reading the hello, connecting and relaying
all run in the relay engine (``dask_gateway_common.engine``: one thread, one
edge-triggered epoll loop). Measured on the sequential mutual-TLS handshake benchmark, the
trio path spent ~0.6 ms of Python per connection before the relay even started (accept and
SocketStream set-up, a cancel scope for the hello deadline, a task switch per await, a
cross-thread hand-over to the engine and back); here a connection costs a few
``on_event`` calls. trio keeps the control plane: it opens the listening sockets, answers
the few questions the engine must not block on, and stops and drains (see ``serve_in_engine``).

Each accepted socket is a ``_Conn``, a state machine driven by its events and timers::

    HELLO ──hello parsed──► decide ──Forward──► CONNECTING ──connected──► relay (engine)
      │                       │  └── unknown ──► DECIDING (confirmed by trio) ──┘
      │                       └────Reject────► ALERTING (alert sent, drain ≤ 64 KiB / 1 s)
      └── EOF, reset, malformed, too slow ──► closed, counted

Rules that keep it correct with edge-triggered events:

* The client socket is watched from accept on, and the backend from its ``connect``; on
  hand-over both are rebound to the engine's ``Relay`` without touching epoll. Edges seen
  before the hand-over are not replayed, so the relay starts optimistic (it tries to read
  the backend once), inherits any RDHUP/HUP seen earlier (``a_hup``/``b_hup``), and reads
  the client first only if its last hello read filled the buffer or an IN edge came since.
* The hello is read until the parser decides and no further, so bytes (or a FIN) behind
  it stay in the socket for the relay.
* Route lookups read the ``RouteTable`` from this thread. A hit is always a complete route;
  a miss may be a resync (``replace_all``) caught half-way by a GIL switch, so an unknown
  cluster is confirmed in the trio thread (where the table never is half-way) before the
  alert is sent. Host names (not IP literals) are resolved by trio too; IP literals,
  which routes hold, are resolved once and cached.
* Everything a connection holds is released in ``_close``; an exception from its handlers
  reaches ``abort``, which counts it as ``internal``, logs it and closes that connection
  only.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import Final

import trio

from dask_gateway_common.engine import (
    EV_HUP,
    EV_READ,
    EV_WRITE,
    Engine,
    EngineCrashed,
    Handler,
    Relay,
    Timer,
    get_engine,
)
from dask_gateway_common.metrics import ProxyMetrics
from dask_gateway_common.routes import RouteTable
from dask_gateway_common.sni import (
    INTERNAL_ERROR,
    UNRECOGNIZED_NAME,
    ClientHello,
    ClientHelloError,
    NeedData,
    NotTLS,
    parse_client_hello,
    tls_alert,
)

from .dispatch import REJECT_UNKNOWN, Forward, Reject, decide
from .sockets import AddrInfo, numeric_addresses

__all__ = ["EngineServer", "serve_in_engine"]

log = logging.getLogger("dask_gateway.scheduler_proxy")

Address = tuple[str, int]
HelloResult = ClientHello | NotTLS

HELLO_READ_SIZE: Final = 4096
ALERT_LINGER: Final = 1.0
_ALERT_DRAIN_BYTES: Final = 64 * 1024
_ACCEPT_BATCH: Final = 64
_ACCEPT_BACKOFF: Final = 0.1
# accept() errors that mean "out of resources", not "that one connection failed"
_ACCEPT_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})

_HELLO, _DECIDING, _RESOLVING, _CONNECTING, _ALERTING, _RELAYING, _CLOSED = range(7)


class EngineServer:
    """The listeners and connections of one proxy inside the engine.

    Methods run in the engine thread, except where they say trio.
    """

    def __init__(
        self,
        engine: Engine,
        listeners: list[socket.socket],
        table: RouteTable,
        metrics: ProxyMetrics,
        *,
        hello_timeout: float,
        connect_timeout: float,
        http_forward: Address | None,
        max_hello_bytes: int,
        token: trio.lowlevel.TrioToken,
        helpers: trio.Nursery,
    ) -> None:
        self.engine = engine
        self.listeners = [_Listener(self, sock) for sock in listeners]
        self.table = table
        self.metrics = metrics
        self.hello_timeout = hello_timeout
        self.connect_timeout = connect_timeout
        self.http_forward = http_forward
        self.max_hello_bytes = max_hello_bytes
        self.token = token
        self.helpers = helpers
        self.conns: set[_Conn] = set()
        self.crash: BaseException | None = None
        self.crashed = trio.Event()  # set (in trio) if the engine died under us
        self._on_idle: Callable[[], None] | None = None
        self._errors: dict[str, Callable[[], None]] = {}
        up = metrics.bytes_total.labels(direction="up").inc
        down = metrics.bytes_total.labels(direction="down").inc
        self.on_bytes: Callable[[str, int], None] = lambda d, n: (up if d == "up" else down)(n)
        self.opened = metrics.connections_total.inc
        self.active_inc = metrics.connections_active.inc
        self.active_dec = metrics.connections_active.dec

    # -- engine thread -------------------------------------------------------------------
    def start(self) -> None:
        try:
            for listener in self.listeners:
                self.engine.watch(listener.fd, listener)
        except BaseException:
            self.stop_accepting()
            raise

    def stop_accepting(self) -> None:
        for listener in self.listeners:
            listener.close()

    def close_all(self) -> None:
        for conn in list(self.conns):
            conn.shutdown()

    def notify_when_idle(self, callback: Callable[[], None]) -> None:
        if self.conns:
            self._on_idle = callback
        else:
            callback()

    def count(self, reason: str) -> None:
        inc = self._errors.get(reason)
        if inc is None:
            inc = self._errors[reason] = self.metrics.hello_errors_total.labels(reason=reason).inc
        inc()

    def internal_error(self, message: str, error: BaseException) -> None:
        self.count("internal")
        if isinstance(error, EngineCrashed):  # logged once, by the engine
            log.debug("%s: %s", message, error)
        else:
            log.error(message, exc_info=error)

    def accepted(self, sock: socket.socket) -> None:
        self.opened()
        self.active_inc()
        conn = _Conn(self, sock)
        self.conns.add(conn)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.engine.watch(conn.cfd, conn)  # writable at once: the hello is read next turn
            conn.timer = self.engine.call_later(self.hello_timeout, conn.hello_timed_out)
        except OSError as exc:
            conn.fail("reset", "Cannot set up an accepted connection: %s", exc)
        except Exception as exc:
            conn.abort(exc)

    def closed(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        self.active_dec()
        if not self.conns and self._on_idle is not None:
            callback, self._on_idle = self._on_idle, None
            callback()

    def listener_failed(self, error: BaseException) -> None:
        if self.crash is None:
            self.crash = error
            self.to_trio(self.crashed.set)

    def to_trio(self, fn: Callable[[], None]) -> bool:
        try:
            self.token.run_sync_soon(fn)
        except trio.RunFinishedError:
            return False
        return True

    def confirm_unknown(self, conn: _Conn, result: HelloResult) -> None:
        """Ask trio to redo a decision that found no route (see the module docstring)."""

        def in_trio() -> None:
            try:
                action: Forward | Reject | BaseException = decide(
                    result, self.table.sni_target, self.http_forward
                )
            except Exception as exc:
                action = exc
            self.engine.call_soon(lambda: conn.decided_in_trio(result, action), fail=_ignore)

        if not self.to_trio(in_trio):
            conn.decided(result, REJECT_UNKNOWN)

    def resolve(self, conn: _Conn, host: str, port: int) -> None:
        """Ask trio to resolve a host name for ``conn``."""

        def in_trio() -> None:
            try:
                self.helpers.start_soon(self._resolve, conn, host, port)
            except RuntimeError as exc:  # shutting down: the helpers nursery is closed
                error = exc
                self.engine.call_soon(lambda: conn.resolved([], error), fail=_ignore)

        if not self.to_trio(in_trio):
            conn.resolved([], RuntimeError("the proxy is stopping"))

    # -- trio ----------------------------------------------------------------------------
    async def _resolve(self, conn: _Conn, host: str, port: int) -> None:
        infos: list[AddrInfo] = []
        error: BaseException | None = RuntimeError("the proxy is stopping")
        try:
            raw = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            infos = [(f, t, p, addr) for f, t, p, _, addr in raw]
            error = None
        except OSError as exc:
            error = exc
        finally:  # also when cancelled: the connection must not wait for its deadline
            self.engine.call_soon(lambda: conn.resolved(infos, error), fail=_ignore)


def _ignore(error: BaseException | None) -> None:
    """For calls whose target died with the engine: its abort already cleaned up."""


class _Listener(Handler):
    __slots__ = ("server", "sock", "fd", "closed")

    def __init__(self, server: EngineServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.closed = False

    def on_event(self, fd: int, events: int) -> None:
        self.step()

    def step(self) -> None:
        if self.closed:
            return
        accept = self.sock.accept
        server = self.server
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = accept()
            except BlockingIOError:
                return  # drained: the next connection raises a new edge
            except OSError as exc:
                if exc.errno in _ACCEPT_EXHAUSTED:
                    # The pending connections raise no new edge: retry on a timer.
                    log.error("Cannot accept connections (%s); retrying shortly", exc)
                    server.engine.call_later(_ACCEPT_BACKOFF, self.step)
                    return
                continue  # that one connection failed (e.g. ECONNABORTED)
            try:
                server.accepted(sock)
            except Exception as exc:  # a bug: lose this connection, not the listener
                server.internal_error("Unexpected error while accepting a connection", exc)
                sock.close()
        server.engine.again(self)  # there may be more: after the others had a turn

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.engine.unwatch(self.fd, self)
            self.sock.close()

    def abort(self, error: BaseException | None) -> None:
        self.close()
        if error is not None:
            self.server.listener_failed(error)


class _Conn(Handler):
    """One client connection until it is relayed (then the engine's Relay takes over)."""

    __slots__ = (
        "server",
        "client",
        "cfd",
        "backend",
        "bfd",
        "state",
        "buf",
        "want",
        "timer",
        "tls",
        "action",
        "addrs",
        "error",
        "client_hup",
        "client_more",
        "drained",
        "relay",
    )

    def __init__(self, server: EngineServer, client: socket.socket) -> None:
        self.server = server
        self.client = client
        self.cfd = client.fileno()
        self.backend: socket.socket | None = None
        self.bfd = -1
        self.state = _HELLO
        self.buf = b""
        self.want = HELLO_READ_SIZE
        self.timer: Timer | None = None
        self.tls = False
        self.action: Forward | None = None
        self.addrs: list[AddrInfo] = []
        self.error: BaseException | None = None
        self.client_hup = False
        self.client_more = False  # the client may have sent more than we read
        self.drained = 0
        self.relay: Relay | None = None

    # -- events --------------------------------------------------------------------------
    def on_event(self, fd: int, events: int) -> None:
        if fd == self.cfd:
            if events & EV_HUP:
                self.client_hup = True
            if events & EV_READ:
                self.client_more = True
            if self.state == _HELLO:
                self._read_hello()
            elif self.state == _ALERTING:
                self._drain()
            # else: whatever the client sends meanwhile is read by the relay
        elif self.state == _CONNECTING:
            self._connect_event(events)

    def abort(self, error: BaseException | None) -> None:
        if error is not None:
            self.server.internal_error("Unexpected error while proxying a connection", error)
        self.shutdown()

    def shutdown(self) -> None:
        """Close now, relay or not (drain deadline, engine crash)."""
        if self.relay is not None:
            self.relay.abort(None)  # calls relay_done, which closes
        else:
            self._close()

    # -- hello ---------------------------------------------------------------------------
    def _read_hello(self) -> None:
        recv = self.client.recv
        server = self.server
        while True:
            try:
                data = recv(self.want)
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail("reset", "Client connection failed during the hello: %s", exc)
                return
            if not data:
                self.fail("eof")
                return
            self.client_more = len(data) == self.want  # a short read drained the socket
            self.buf += data
            try:
                result = parse_client_hello(self.buf, server.max_hello_bytes)
            except ClientHelloError as exc:
                self.fail(exc.reason, "Malformed ClientHello: %s", exc)
                return
            if not isinstance(result, NeedData):
                break
            self.want = max(HELLO_READ_SIZE, result.at_least - len(self.buf))
        self._cancel_timer()
        action = decide(result, server.table.sni_target, server.http_forward)
        if action is REJECT_UNKNOWN:
            self.state = _DECIDING
            server.confirm_unknown(self, result)
            return
        self.decided(result, action)

    def hello_timed_out(self) -> None:
        self.timer = None
        if self.state == _HELLO:
            self.fail(
                "timeout",
                "Client did not finish its ClientHello in %.3gs",
                self.server.hello_timeout,
            )

    def decided_in_trio(
        self, result: HelloResult, action: Forward | Reject | BaseException
    ) -> None:
        if self.state != _DECIDING:
            return
        if isinstance(action, BaseException):
            self.abort(action)
            return
        self.decided(result, action)

    def decided(self, result: HelloResult, action: Forward | Reject) -> None:
        server = self.server
        self.tls = isinstance(result, ClientHello)
        if isinstance(action, Reject):
            server.count(action.reason)
            log.debug("Rejecting connection: %s", action.reason)
            if action.alert is None:
                self._close()
            else:
                self._alert(action.alert)
            return
        self.action = action
        self.timer = server.engine.call_later(server.connect_timeout, self._connect_timed_out)
        host, port = action.address
        infos = numeric_addresses(host, port)
        if infos is None:
            self.state = _RESOLVING
            server.resolve(self, host, port)
            return
        self.addrs = list(infos)
        self._connect_next()

    # -- connect -------------------------------------------------------------------------
    def resolved(self, infos: list[AddrInfo], error: BaseException | None) -> None:
        if self.state != _RESOLVING:
            return  # timed out or closed meanwhile
        if error is not None or not infos:
            self._connect_failed(error or OSError(errno.EHOSTUNREACH, "no address"))
            return
        self.addrs = infos
        self._connect_next()

    def _connect_next(self) -> None:
        engine = self.server.engine
        while self.addrs:
            family, type_, proto, sockaddr = self.addrs.pop(0)
            sock = None
            try:
                sock = socket.socket(family, type_ | socket.SOCK_NONBLOCK, proto)
                if family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                code = sock.connect_ex(sockaddr)
                if code not in (0, errno.EINPROGRESS):
                    raise OSError(code, f"connect to {sockaddr}: {errno.errorcode.get(code, code)}")
                engine.watch(sock.fileno(), self)  # writable (or failed) → an event
            except OSError as exc:
                self.error = exc
                if sock is not None:
                    sock.close()
                continue
            self.backend = sock
            self.bfd = sock.fileno()
            self.state = _CONNECTING
            return
        self._connect_failed(self.error or OSError(errno.EHOSTUNREACH, "no address"))

    def _connect_event(self, events: int) -> None:
        assert self.backend is not None
        code = self.backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.error = OSError(code, f"connect: {errno.errorcode.get(code, code)}")
            self._drop_backend()
            self._connect_next()
            return
        if not events & EV_WRITE:
            return  # not connected yet
        self._cancel_timer()
        self.state = _RELAYING
        server = self.server
        server.on_bytes("up", len(self.buf))  # the hello (and anything behind it), replayed
        self.relay = server.engine.start_relay(
            self.client,
            self.backend,
            on_done=self._relay_done,
            prefix_to_b=self.buf,
            on_bytes=server.on_bytes,
            a_hup=self.client_hup,
            b_hup=bool(events & EV_HUP),
            a_ready=self.client_more,
        )

    def _connect_timed_out(self) -> None:
        self.timer = None
        if self.state in (_RESOLVING, _CONNECTING):
            self._drop_backend()
            self._connect_failed(None)

    def _connect_failed(self, error: BaseException | None) -> None:
        action = self.action
        assert action is not None
        self._cancel_timer()
        host, port = action.address
        log.warning(
            "Cannot connect to %s at %s:%d: %s",
            f"cluster {action.cluster}" if action.cluster else "HTTP forward",
            host,
            port,
            "timed out" if error is None else error,
        )
        self.server.count("connect_failed")
        if self.tls:
            self._alert(INTERNAL_ERROR)
        else:
            self._close()

    def _drop_backend(self) -> None:
        if self.backend is not None:
            self.server.engine.unwatch(self.bfd, self)
            self.backend.close()
            self.backend = None
            self.bfd = -1

    def _relay_done(self, error: BaseException | None) -> None:
        self.relay = None
        if error is not None:
            self.server.internal_error("Unexpected error while relaying a connection", error)
        self._close()

    # -- alerts and closing --------------------------------------------------------------
    def _alert(self, description: int) -> None:
        try:
            self.client.send(_ALERTS.get(description) or tls_alert(description))
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            self._close()
            return
        self.state = _ALERTING
        self.timer = self.server.engine.call_later(ALERT_LINGER, self._close)
        self._drain()

    def _drain(self) -> None:
        """Read and drop what the client still sends, so our alert is not lost to a RST."""
        recv = self.client.recv
        while True:
            try:
                data = recv(HELLO_READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            self.drained += len(data)
            if not data or self.drained >= _ALERT_DRAIN_BYTES:
                self._close()
                return

    def fail(self, reason: str, message: str | None = None, *args: object) -> None:
        self.server.count(reason)
        if message is not None:
            log.debug(message, *args)
        self._close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _close(self) -> None:
        if self.state == _CLOSED:
            return
        self.state = _CLOSED
        self._cancel_timer()
        self._drop_backend()
        self.server.engine.unwatch(self.cfd, self)
        self.client.close()
        self.server.closed(self)


_ALERTS: Final = {code: tls_alert(code) for code in (INTERNAL_ERROR, UNRECOGNIZED_NAME)}


# ---- the trio side -----------------------------------------------------------------------------


async def run_in_engine(engine: Engine, fn: Callable[[], None]) -> None:
    """Run ``fn()`` in the engine thread and wait until it has run (re-raising its error)."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            fn()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)
        token.run_sync_soon(done.set)

    def fail(error: BaseException | None) -> None:
        outcome.append(error)
        token.run_sync_soon(done.set)

    engine.call_soon(call, fail=fail)
    await done.wait()
    if outcome[0] is not None:
        raise outcome[0]


async def _run_quietly(engine: Engine, fn: Callable[[], None]) -> None:
    """``run_in_engine`` for clean-ups: a dead engine has released everything already."""
    with trio.CancelScope(shield=True):
        try:
            await run_in_engine(engine, fn)
        except RuntimeError:
            if not engine.dead:
                raise


async def serve_in_engine(
    listeners: list[socket.socket],
    table: RouteTable,
    metrics: ProxyMetrics,
    *,
    hello_timeout: float,
    connect_timeout: float,
    http_forward: Address | None,
    max_hello_bytes: int,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``listeners`` (bound, listening, owned from now on) in the relay engine;
    reports the port of the first one.

    When cancelled: stop accepting, then, with ``handler_nursery``, let the open
    connections finish in a task of that nursery (closing them when it is cancelled),
    else close them at once. Raises RuntimeError if the engine crashes under it.
    """
    engine = get_engine()
    async with trio.open_nursery() as helpers:
        server = EngineServer(
            engine,
            listeners,
            table,
            metrics,
            hello_timeout=hello_timeout,
            connect_timeout=connect_timeout,
            http_forward=http_forward,
            max_hello_bytes=max_hello_bytes,
            token=trio.lowlevel.current_trio_token(),
            helpers=helpers,
        )
        try:
            await run_in_engine(engine, server.start)
        except BaseException:
            for sock in listeners:
                sock.close()
            raise
        try:
            task_status.started(int(listeners[0].getsockname()[1]))
            await server.crashed.wait()
        finally:
            await _run_quietly(engine, server.stop_accepting)
            if handler_nursery is None:
                await _run_quietly(engine, server.close_all)
            else:
                handler_nursery.start_soon(_drain, engine, server)
            helpers.cancel_scope.cancel()
    raise RuntimeError("the relay engine stopped serving the listener") from server.crash


async def _drain(engine: Engine, server: EngineServer) -> None:
    """Wait until the server's connections are gone; close the rest when cancelled."""
    token = trio.lowlevel.current_trio_token()
    idle = trio.Event()
    try:
        await run_in_engine(
            engine, lambda: server.notify_when_idle(lambda: token.run_sync_soon(idle.set))
        )
        await idle.wait()
    finally:
        await _run_quietly(engine, server.close_all)
