"""Black-box end-to-end harness: the three real services as processes, the official client.

(Helpers shared by the e2e test modules; ``conftest.py`` holds only the pytest hooks.)

Theory of operation
-------------------
Each test module starts the gateway configurations it needs ONCE (module-scoped fixtures
built on :func:`running_gateway`), through ``tools/local_gateway.py`` -- exactly the
console scripts a user runs -- on free loopback ports, with a private work directory. Tests
then talk to it only as a user would: the official ``dask_gateway`` client (sync API, which
runs its own asyncio loop in a thread) and raw HTTP through the public web proxy.

Deadlines: the official client has none of its own (``new_cluster`` polls forever), so every
test runs under a deadline (:func:`time_limit`, applied by an autouse fixture): a watchdog
thread sends SIGALRM to the main thread, which interrupts it even while it blocks in the
client's ``future.result()`` (the client then cancels its pending coroutine). Waits inside
tests go through :func:`wait_until`, which raises with what it was waiting for and the last
value seen.

On a failure the report gets the tail of every running service log (a section per service),
so a red CI run says why. At module teardown the gateway is stopped; every config sets
``stop_clusters_on_shutdown`` so the API stops its clusters. Whatever process of that
gateway is still alive 20 s later is killed (by pid) and reported as an error, so a leak is
never silent; and the three service logs are searched for the secrets the tests handled
(proxy token, shared password, cookie values, cluster tokens).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import hashlib
import http.client
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dask_gateway import BasicAuth, Gateway

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from local_gateway import BIN, LocalGateway, Ports  # noqa: E402
from local_gateway import free_port as free_port  # noqa: E402 (re-exported)

T = TypeVar("T")

#: Where the gateway's console scripts live (the running interpreter's bin directory).
BIN_DIR: Path = BIN

#: Every e2e test must finish within this many seconds (clusters start real processes).
TEST_DEADLINE = 150.0
#: How long a cluster may take to start (scheduler process + registration) on 2 busy cores.
START_TIMEOUT = 60.0
#: How long workers may take to join after a scale request.
WORKER_TIMEOUT = 60.0

#: Gateways currently running, for the log tails of failure reports.
ACTIVE: list[LocalGateway] = []


# --- deadlines and waiting --------------------------------------------------------------


class DeadlineExceeded(Exception):
    """A :func:`time_limit` ran out."""


#: Active limits, innermost last: (monotonic deadline, description).
_LIMITS: list[tuple[float, str]] = []


def _on_alarm(signum: int, frame: object) -> None:
    now = time.monotonic()
    expired = [what for deadline, what in _LIMITS if deadline <= now]
    if expired:
        raise DeadlineExceeded(f"deadline exceeded: {expired[0]}")


@contextlib.contextmanager
def client_test_guard(name: str, deadline: float) -> Iterator[None]:
    """Run a synchronous official-client test under ``deadline``, with cyclic GC only on
    the main thread.

    The official client deadlocks if a ``Gateway`` it leaked (e.g. the one inside a
    ``GatewayCluster`` whose start failed) is finalized on the shared client loop thread:
    ``Gateway.__del__`` -> ``close()`` -> ``sync()`` waits on that very loop. Automatic
    collection is therefore off during the test and garbage is collected afterwards, on the
    main thread, where ``close()`` works.
    """
    gc.collect()
    gc.disable()
    try:
        with time_limit(deadline, f"test {name}"):
            yield
    finally:
        try:
            with time_limit(30, "collecting the test's client objects"):
                gc.collect()
        finally:
            gc.enable()


def attach_service_logs(report: pytest.TestReport, gateways: Any, lines: int) -> None:
    """Add the tail of every running gateway's three service logs to a failed report."""
    if not report.failed:
        return
    for local in gateways:
        for name in ("api", "web-proxy", "scheduler-proxy"):
            report.sections.append(
                (f"{local.workdir.name}: {name} log (tail)", local.log_tail(name, lines))
            )


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`DeadlineExceeded` in the main thread if the block runs over ``seconds``.

    A watchdog thread sends SIGALRM to the main thread itself (``pthread_kill``): a
    process-wide alarm may be delivered to one of the client's loop threads, which would
    leave the main thread blocked in ``future.result()`` forever. After the deadline the
    signal is repeated every few seconds, in case client code swallowed the first one.
    Limits nest; the earliest expired one is reported.
    """
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main, "time_limit: main thread only"
    entry = (time.monotonic() + seconds, f"{what} ({seconds:.0f} s)")
    _LIMITS.append(entry)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    done = threading.Event()

    def watchdog() -> None:
        timeout = seconds
        while not done.wait(timeout):
            signal.pthread_kill(main, signal.SIGALRM)
            timeout = 5.0

    thread = threading.Thread(target=watchdog, name=f"time_limit({what})", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        _LIMITS.remove(entry)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError naming ``what`` and the last value (or exception) seen when
    ``timeout`` seconds pass. Exceptions of the types in ``ignore`` count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def assert_stays(predicate: Callable[[], object], duration: float, what: str) -> None:
    """Check that ``predicate`` stays truthy for ``duration`` seconds (a negative check)."""
    end = time.monotonic() + duration
    while time.monotonic() < end:
        value = predicate()
        assert value, f"{what} stopped holding (got {value!r})"
        time.sleep(0.1)


# --- raw HTTP ---------------------------------------------------------------------------


def basic(user: str, password: str = "") -> str:
    """An ``Authorization`` header value for HTTP Basic."""
    raw = f"{user}:{password}".encode("latin-1")
    return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def is_json(self) -> bool:
        content_type = self.header("Content-Type") or ""
        return content_type.split(";")[0].strip().lower() == "application/json"

    def error(self) -> str:
        """The ``error`` message of a JSON error body (asserting the body's shape)."""
        assert self.is_json, f"not JSON: {self.header('Content-Type')!r} {self.body[:200]!r}"
        payload = self.json()
        assert isinstance(payload, dict) and set(payload) == {"error"}, payload
        assert isinstance(payload["error"], str) and payload["error"], payload
        return payload["error"]

    def __repr__(self) -> str:
        return f"RawResponse({self.status} {self.reason}, {self.headers!r}, {self.body[:300]!r})"


def http_request(
    url: str,
    method: str = "GET",
    *,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> RawResponse:
    """One plain HTTP/1.1 request on a fresh connection (no redirects, no retries)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return RawResponse(resp.status, resp.reason, resp.getheaders(), resp.read())
    finally:
        conn.close()


def send_oversized(
    host: str, port: int, head: bytes, body_size: int, timeout: float = 30.0
) -> RawResponse:
    """Send ``head`` then up to ``body_size`` bytes, stopping as soon as a response arrives.

    A server may answer 413 before reading the whole body (and close); this reads whatever
    answer came back without dying on the broken pipe.
    """
    chunk = b"x" * 65536
    sent = 0
    buf = b""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(head)
        try:
            while sent < body_size:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                n = min(len(chunk), body_size - sent)
                sock.sendall(chunk[:n])
                sent += n
        except (BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                if b"\r\n\r\n" in buf and _complete(buf):
                    break
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(
                f"no complete response within {timeout} s after sending {sent} of "
                f"{body_size} body bytes (got {buf[:200]!r})"
            ) from None
    return parse_response(buf)


def _head_value(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _complete(buf: bytes) -> bool:
    head, _, rest = buf.partition(b"\r\n\r\n")
    if (_head_value(head, b"transfer-encoding") or b"").lower() == b"chunked":
        return rest.endswith(b"0\r\n\r\n")
    length = _head_value(head, b"content-length")
    return length is not None and len(rest) >= int(length)


def _dechunk(data: bytes) -> bytes:
    body = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body, data = body + data[:size], data[size + 2 :]
    return body


def parse_response(buf: bytes) -> RawResponse:
    """Parse a raw HTTP/1.1 response (Content-Length or chunked body; test helper)."""
    assert buf, "no response at all (connection closed without an answer)"
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    _, status, *reason = lines[0].split(" ", 2)
    headers = []
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers.append((key.strip(), value.strip()))
    if (_head_value(head, b"transfer-encoding") or b"").lower() == b"chunked":
        rest = _dechunk(rest)
    return RawResponse(int(status), reason[0] if reason else "", headers, rest)


# --- the gateway under test -------------------------------------------------------------


class CountingBasicAuth(BasicAuth):
    """BasicAuth that counts the 401 challenges the client answered (one per 401 seen)."""

    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        super().__init__(username=username, password=password)
        self.challenges = 0

    def pre_request(self, resp: Any) -> Any:
        self.challenges += 1
        return super().pre_request(resp)


@dataclass
class GatewayUnderTest:
    """A running gateway plus the helpers tests use to talk to it."""

    local: LocalGateway
    default_password: str = ""
    #: Values that must never appear in a service log (checked when the gateway stops).
    secrets: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.local.address

    @property
    def proxy_address(self) -> str:
        return self.local.proxy_address

    @property
    def web_host_port(self) -> tuple[str, int]:
        return self.local.host, self.local.ports.web

    def client(
        self,
        user: str = "alice",
        password: str | None = None,
        *,
        auth: BasicAuth | None = None,
        **kwargs: Any,
    ) -> Gateway:
        """The official client for ``user`` (close it, or use it as a context manager)."""
        if auth is None:
            auth = BasicAuth(user, self.default_password if password is None else password)
        return Gateway(self.address, proxy_address=self.proxy_address, auth=auth, **kwargs)

    def raw(
        self,
        method: str,
        path: str,
        *,
        user: str | None = None,
        password: str | None = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        json_body: Any = None,
    ) -> RawResponse:
        """A raw request to ``<address><path>`` through the web proxy."""
        all_headers = dict(headers or {})
        if user is not None:
            pw = self.default_password if password is None else password
            all_headers["Authorization"] = basic(user, pw)
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        return http_request(self.address + path, method, headers=all_headers, body=body)

    def wire_cluster(self, name: str, user: str = "alice") -> dict[str, Any]:
        """The raw JSON of one cluster (E6), asserting 200."""
        resp = self.raw("GET", f"/api/v1/clusters/{name}", user=user)
        assert resp.status == 200, resp
        return resp.json()

    def log_tails(self, lines: int = 60) -> str:
        return "\n".join(
            f"----- {name} (last {lines} lines) -----\n{self.local.log_tail(name, lines)}"
            for name in ("api", "web-proxy", "scheduler-proxy")
        )


def _mentions(entry: Path, needle: bytes) -> bool:
    """Whether process ``entry`` (a /proc/<pid> dir) refers to ``needle``: in its argv, its
    environment, its working directory or an open file (e.g. its log file as stdout)."""
    try:
        if needle in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes():
            return True
        links = [entry / "cwd", *(entry / "fd").iterdir()]
    except OSError:
        return False
    for link in links:
        with contextlib.suppress(OSError):
            if needle in os.fsencode(os.readlink(link)) + b"/":
                return True
    return False


def _gateway_processes(workdir: Path) -> list[int]:
    """Pids of live processes that belong to the gateway in ``workdir``: its services and
    the dask schedulers and workers it started (also those forked by a helper process,
    whose environment does not show the work directory but whose log files do)."""
    needle = str(workdir).encode() + b"/"
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit()
        and int(entry.name) != os.getpid()
        and pid_alive(int(entry.name))
        and _mentions(entry, needle)
    ]


def _kill_leftovers(workdir: Path) -> list[int]:
    """SIGKILL the dask processes of a stopped gateway that are still alive; return them."""
    leftovers = _gateway_processes(workdir)
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


def base_config(**overrides: Any) -> dict[str, Any]:
    """The config every e2e gateway starts from, merged with ``overrides`` (shallowly,
    section by section)."""
    config: dict[str, Any] = {"stop_clusters_on_shutdown": True}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


#: Spec §11.5 options: Integer ``worker_cores`` 1..4 (default 1) and Select ``size``
#: (small/large), the latter mapped onto the worker memory.
DEFAULT_OPTIONS: dict[str, Any] = {
    "fields": [
        {
            "field": "worker_cores",
            "type": "integer",
            "label": "Worker cores",
            "default": 1,
            "min": 1,
            "max": 4,
        },
        {
            "field": "size",
            "type": "select",
            "label": "Worker size",
            "default": "small",
            "options": [{"key": "small", "value": "1 G"}, {"key": "large", "value": "2 G"}],
            "target": "worker_memory",
        },
    ]
}


def default_config(**overrides: Any) -> dict[str, Any]:
    """The §11.5 server: simple auth without password and the two default options."""
    return base_config(options=DEFAULT_OPTIONS, **overrides)


@contextlib.contextmanager
def running_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    config: dict[str, Any],
    *,
    default_password: str = "",
    env: dict[str, str] | None = None,
    log_level: str = "INFO",
) -> Iterator[GatewayUnderTest]:
    """Start the three services with ``config``; stop them after, checking that no cluster
    process outlives them and that no secret reached their logs."""
    workdir = tmp_path_factory.mktemp(name)
    local = LocalGateway(
        workdir=workdir, config=config, ports=Ports.free(), env=env or {}, log_level=log_level
    )
    ACTIVE.append(local)
    gateway = GatewayUnderTest(local, default_password=default_password)
    gateway.secrets.append(local.proxy_token)
    if default_password:
        gateway.secrets.append(default_password)
    leftovers: list[int] = []
    try:
        for attempt in range(3):
            try:
                local.start(timeout=60)
                break
            except RuntimeError as exc:
                # Ports.free() is check-then-use: on a busy machine another process may
                # take a port in between. Retry on fresh ports; anything else is a failure.
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                local.processes.clear()
                local.ports = Ports.free()
        yield gateway
    finally:
        try:
            local.stop()
            # The API stops its clusters on shutdown; give the processes a moment to go.
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not _gateway_processes(workdir), 20, "cluster processes to exit")
            leftovers = _kill_leftovers(workdir)
        finally:
            ACTIVE.remove(local)
    assert not leftovers, (
        f"gateway {name!r}: {len(leftovers)} cluster process(es) still alive 20 s after the "
        f"API stopped (killed now: {leftovers})\n{gateway.log_tails()}"
    )
    for service in ("api", "web-proxy", "scheduler-proxy"):
        text = (workdir / "logs" / f"{service}.log").read_text(errors="replace")
        leaked = [i for i, secret in enumerate(gateway.secrets) if secret and secret in text]
        assert not leaked, f"gateway {name!r}: secret(s) #{leaked} appear in the {service} log"


# --- cluster helpers --------------------------------------------------------------------


def worker_count(cluster: Any) -> int:
    """Workers the client's cluster object currently knows of (spec §11.6)."""
    return len(cluster.scheduler_info.get("workers", {}))


def wait_workers(cluster: Any, count: int, timeout: float = WORKER_TIMEOUT) -> None:
    wait_until(
        lambda: worker_count(cluster) == count,
        timeout,
        f"cluster {cluster.name} to have exactly {count} worker(s)",
        interval=0.2,
    )


def cluster_status(gateway: Gateway, name: str) -> str:
    return gateway.get_cluster(name).status.name


def wait_status(gateway: Gateway, name: str, *statuses: str, timeout: float = 60.0) -> str:
    return wait_until(
        lambda: (s := cluster_status(gateway, name)) in statuses and s,
        timeout,
        f"cluster {name} to reach {'/'.join(statuses)}",
        interval=0.2,
    )


def names(reports: list[Any]) -> set[str]:
    return {report.name for report in reports}


def scheduler_token(client: Any) -> str:
    """The cluster's API token, read from its scheduler's environment (spec §5.1: the
    value, or a path to a file holding it)."""

    def read_token() -> str:
        import os

        value = os.environ["DASK_GATEWAY_API_TOKEN"]
        if "/" in value:
            with open(value) as f:
                return f.read().strip()
        return value

    return client.run_on_scheduler(read_token)


# --- websockets (raw, RFC 6455 client side) ---------------------------------------------


@dataclass
class WebSocketProbe:
    key: str
    status_line: str
    headers: list[tuple[str, str]]
    received: bytes  # everything after the handshake, until the server closed

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ")[1])

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def accept_is_valid(self) -> bool:
        """``Sec-WebSocket-Accept`` is the RFC 6455 digest of our key."""
        magic = (self.key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()
        expected = base64.b64encode(hashlib.sha1(magic).digest()).decode()
        return self.header("Sec-WebSocket-Accept") == expected


def websocket_probe(
    host: str,
    port: int,
    path: str,
    *,
    protocols: list[str] | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 15.0,
) -> WebSocketProbe:
    """Open a websocket at ``path``, then send a close frame and read until EOF.

    Returns the handshake status line and headers plus every byte the server sent after
    the handshake (its messages and its closing frame), proving the relay works both ways.
    ``headers`` are added to the handshake (credentials for owner-only dashboards).
    """
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        f"Origin: http://{host}:{port}",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        head_lines = head.decode("latin-1").split("\r\n")
        headers = [
            (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in head_lines[1:])
        ]
        probe = WebSocketProbe(key, head_lines[0], headers, rest)
        if " 101 " not in head_lines[0] + " ":
            return probe
        # Let the server speak first (e.g. bokeh's ACK), then close from our side.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and b"ACK" not in probe.received:
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                data = sock.recv(65536)
                if not data:
                    return probe
                probe.received += data
        mask = os.urandom(4)
        payload = (1000).to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x88, 0x80 | len(payload)]) + mask + masked)
        with contextlib.suppress(ConnectionResetError):
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                probe.received += data
        return probe


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_process_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (a cluster process started in its own
    session); refuses to touch the test runner's own group."""
    pgid = os.getpgid(pid)
    assert pgid != os.getpgid(0), "refusing to kill the test runner's own process group"
    os.killpg(pgid, signal.SIGKILL)
