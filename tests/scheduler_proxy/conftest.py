"""Shared helpers: a real route feed over HTTP, the proxy in-process, TLS peers, hellos.

Everything binds port 0 on 127.0.0.1 and reports readiness through ``nursery.start``.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from dask_gateway_common.feed import RouteFeed, make_feed_handler
from dask_gateway_common.feed_client import RouteFeedClient
from dask_gateway_common.http import Request, Response, serve_http
from dask_gateway_common.metrics import ProxyMetrics, new_registry
from dask_gateway_common.routes import Route, RouteTable
from dask_gateway_common.tls import generate_cluster_credentials
from dask_gateway_scheduler_proxy.config import ProxySettings
from dask_gateway_scheduler_proxy.proxy import serve_scheduler_proxy

TOKEN = "test-proxy-token-0123456789"
WAIT = 10.0  # ceiling for any single wait in these tests


# ---- TLS material and peers ---------------------------------------------------------------


@dataclass
class Credentials:
    cert_file: str
    key_file: str

    def server_context(self) -> ssl.SSLContext:
        """What a scheduler does: present the cluster cert, require the same as client."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.load_verify_locations(self.cert_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """What the official client's GatewaySecurity builds (spec §3.2)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.cert_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = False
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


@pytest.fixture(scope="session")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    directory: Path = tmp_path_factory.mktemp("certs")
    cert, key = generate_cluster_credentials("test-cluster")
    (directory / "dask.crt").write_bytes(cert)
    (directory / "dask.pem").write_bytes(key)
    return Credentials(str(directory / "dask.crt"), str(directory / "dask.pem"))


def client_hello(server_hostname: str | None) -> bytes:
    """The first flight of a real stdlib TLS client, without any network (MemoryBIO)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


async def read_until_eof(stream: trio.abc.ReceiveStream, limit: int = 1 << 20) -> bytes:
    data = bytearray()
    while len(data) <= limit:
        chunk = await stream.receive_some()
        if not chunk:
            return bytes(data)
        data += chunk
    raise AssertionError("peer kept sending")


@dataclass
class EchoBackend:
    """A TCP (optionally TLS) echo server that records what each connection received."""

    name: str
    port: int = 0
    connections: int = 0
    received: list[bytearray] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"tls://127.0.0.1:{self.port}"


async def start_echo_backend(
    nursery: trio.Nursery,
    name: str,
    ssl_context: ssl.SSLContext | None = None,
    *,
    tag: bool = True,
) -> EchoBackend:
    """Echo every chunk back, prefixed with ``<name>:`` unless ``tag`` is false."""
    backend = EchoBackend(name)
    prefix = name.encode() + b":" if tag else b""

    async def handler(stream: trio.SocketStream) -> None:
        backend.connections += 1
        record = bytearray()
        backend.received.append(record)
        peer: trio.abc.Stream = stream
        if ssl_context is not None:
            peer = trio.SSLStream(stream, ssl_context, server_side=True)
        try:
            async for chunk in peer:
                record += chunk
                # Reply with the backend's name so tests see who answered.
                await peer.send_all(prefix + chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(peer)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    backend.port = listeners[0].socket.getsockname()[1]
    return backend


async def open_tls_client(
    port: int, cluster: str, credentials: Credentials
) -> trio.SSLStream[trio.SocketStream]:
    """A TLS client like the official one: SNI ``daskgateway-<cluster>``, mutual certs."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(
        tcp, credentials.client_context(), server_hostname=f"daskgateway-{cluster}"
    )
    await stream.do_handshake()
    return stream


async def bulk_echo(stream: trio.abc.Stream, payload: bytes) -> bytes:
    """Send ``payload`` while reading the (untagged) echo concurrently."""
    got = bytearray()

    async def receive() -> None:
        while len(got) < len(payload):
            chunk = await stream.receive_some()
            assert chunk, "connection closed early"
            got.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await stream.send_all(payload)
    return bytes(got)


async def round_trip(stream: trio.abc.Stream, payload: bytes) -> bytes:
    """Send ``payload`` to an echo backend and read its tagged echo back."""
    await stream.send_all(payload)
    got = b""
    while not got.endswith(payload):
        chunk = await stream.receive_some()
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    return got


# ---- the route feed and the proxy ---------------------------------------------------------


class SwitchableFeed:
    """Serves whichever RouteFeed is current (to simulate an API restart in place)."""

    def __init__(self, feed: RouteFeed) -> None:
        self.feed = feed

    async def handle(self, request: Request) -> Response:
        return await make_feed_handler(self.feed, TOKEN)(request)


async def start_feed_server(
    nursery: trio.Nursery, handler: Callable[[Request], Awaitable[Response]], port: int = 0
) -> tuple[int, trio.CancelScope]:
    """Serve ``handler`` over real HTTP; returns the port and a scope that stops it."""

    # serve_http runs in a nursery tied to the returned scope.
    async def serve_in_scope(task_status: trio.TaskStatus[tuple[int, trio.CancelScope]]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner_nursery:
                _, bound = await inner_nursery.start(
                    functools.partial(serve_http, handler, "127.0.0.1", port)
                )
                task_status.started((bound, scope))

    return await nursery.start(serve_in_scope)


@dataclass
class ProxyHandle:
    port: int
    table: RouteTable
    metrics: ProxyMetrics
    feed_client: RouteFeedClient
    scope: trio.CancelScope

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"dask_gateway_proxy_{name}", labels)
        return value or 0.0

    def hello_errors(self, reason: str) -> float:
        return self.sample("hello_errors_total", reason=reason)


def routes_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api/v1/routes"


async def start_proxy(
    nursery: trio.Nursery,
    feed_port: int,
    *,
    watch_timeout: float = 60.0,
    **settings_overrides: object,
) -> ProxyHandle:
    """Feed client + scheduler proxy in-process; returns once routes are synced and the
    proxy listens."""
    table = RouteTable()
    metrics = ProxyMetrics(new_registry())
    feed_client = RouteFeedClient(
        routes_url(feed_port),
        TOKEN,
        table,
        kinds={"SNI"},
        backoff_min=0.02,
        backoff_max=0.1,
        watch_timeout=watch_timeout,
    )
    settings = ProxySettings(
        address=("127.0.0.1", 0),
        api_url=routes_url(feed_port),
        token=TOKEN,
        **settings_overrides,  # type: ignore[arg-type]
    )

    async def run(task_status: trio.TaskStatus[ProxyHandle]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                await inner.start(feed_client.run)
                with trio.fail_after(WAIT):
                    await feed_client.synced.wait()
                port = await inner.start(
                    functools.partial(serve_scheduler_proxy, settings, table, metrics)
                )
                task_status.started(ProxyHandle(port, table, metrics, feed_client, scope))

    return await nursery.start(run)


async def wait_for_route(handle: ProxyHandle, name: str, target: str | None) -> None:
    """Wait until the proxy's table has ``name`` → ``target`` (None: absent)."""
    with trio.fail_after(WAIT):
        while True:
            route = handle.table.get("SNI", name)
            if (route.target if route else None) == target:
                return
            await handle.table.wait_changed(handle.table.version)


def sni_route(name: str, target: str) -> Route:
    return Route("SNI", name, target)
