"""A Kubernetes API server emulator for tests: real HTTP on 127.0.0.1, core/v1 only.

Theory of operation
-------------------
:class:`KubeEmulator` runs a stdlib ``ThreadingHTTPServer`` (HTTP/1.1 with keep-alive, one
thread per connection) in a background thread, so it serves the official *blocking*
``kubernetes`` client from plain code, from worker threads of a trio program, or from
``trio.to_thread``. State lives in :class:`~.store.Store`; this module only maps URLs and
query parameters onto it, like kube-apiserver's REST handlers:

* ``/api/v1/namespaces/{ns}/{plural}[/{name}[/status|/log|/binding]]`` for pods, services,
  secrets and configmaps, ``/api/v1/{plural}`` (all namespaces) and ``/api/v1/namespaces``;
* ``?watch=true`` answers ``200`` and streams one JSON event per line with chunked encoding
  until ``timeoutSeconds``, the client leaving, :meth:`KubeEmulator.close_watches`, or an
  expired position (then one ``ERROR`` event carrying a 410 ``Expired`` ``Status``);
* every failure is a ``Status`` object with the real reason and code.

Faults for tests: :meth:`KubeEmulator.fail_next` (the next N matching requests fail with
500 or another code), :meth:`~KubeEmulator.expire_history` (force 410 on resume),
:meth:`~KubeEmulator.close_watches` (every open watch ends, as when an API server restarts),
and direct store access (``kube.store.delete(...)``) to change objects behind a client's back.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import select
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import ApiError, bad_request, internal_error
from .gc import GarbageCollector
from .resources import RESOURCES
from .store import PATCH_TYPES, Store

if TYPE_CHECKING:
    import kubernetes.client

    from .kubelet import Kubelet

__all__ = ["FaultRule", "KubeEmulator", "RequestRecord"]

log = logging.getLogger(__name__)

_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FAULT_REASONS = {
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
MAX_BODY = 3 * 1024 * 1024  # kube-apiserver's request size limit


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    status: int = 0


@dataclass
class FaultRule:
    remaining: int
    status: int
    method: str | None
    path: str | None

    def matches(self, method: str, path: str) -> bool:
        if self.method and self.method.upper() != method:
            return False
        return not self.path or self.path in path


@dataclass
class _Route:
    plural: str
    namespace: str | None
    name: str | None
    sub: str | None
    watch: bool


def _parse_route(path: str) -> _Route | None:
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if parts[:2] != ["api", "v1"] or len(parts) < 3:
        return None
    rest = parts[2:]
    watch = False
    if rest[0] == "watch":
        watch, rest = True, rest[1:]
    if not rest:
        return None
    if rest[0] == "namespaces" and len(rest) >= 4:
        ns, plural, name = rest[1], rest[2], rest[3] if len(rest) > 3 else None
        sub = rest[4] if len(rest) > 4 else None
        if len(rest) > 5:
            return None
        return _Route(plural, ns, name, sub, watch)
    if rest[0] == "namespaces" and len(rest) == 3 and rest[2] not in ("status", "finalize"):
        return _Route(rest[2], rest[1], None, None, watch)
    if len(rest) > 3:
        return None
    return _Route(
        rest[0], None, rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None, watch
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: KubeEmulator) -> None:
        self.emulator = emulator
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        with self.conn_lock:
            self.connections.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            with self.conn_lock:
                self.connections.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def drop_connections(self) -> None:
        with self.conn_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one write (flushed after each request), without Nagle:
    # otherwise every keep-alive request pays a 40 ms delayed-ACK stall.
    wbufsize = 1 << 16
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

    # --- plumbing ---------------------------------------------------------------------------

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, private")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)
        self._record.status = status

    def _send_error(self, err: ApiError, headers: dict[str, str] | None = None) -> None:
        self._send_json(err.code, err.status(), headers=headers)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise ApiError(
                411, "LengthRequired", "chunked request bodies are not supported by the emulator"
            )
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise bad_request("invalid Content-Length") from None
        if length > MAX_BODY:
            raise ApiError(
                413, "RequestEntityTooLarge", "Request entity too large: limit is 3145728"
            )
        return self.rfile.read(length) if length > 0 else b""

    def _json_body(self, raw: bytes) -> Any:
        if not raw:
            return None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad_request(f"couldn't get version/kind; json parse error: {exc}") from None

    # --- dispatch ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        emulator = self.server.emulator
        split = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self._record = RequestRecord(self.command, split.path, query)
        emulator._record(self._record)
        try:
            raw = self._read_body()
            if not emulator._authorized(self.headers.get("Authorization")):
                self._send_error(ApiError(401, "Unauthorized", "Unauthorized"))
                return
            fault = emulator._take_fault(self.command, split.path)
            if fault is not None:
                extra = {"Retry-After": "1"} if fault in (429, 503) else None
                reason = _FAULT_REASONS.get(fault, "InternalError")
                message = (
                    "Internal error occurred: injected fault" if fault == 500 else "injected fault"
                )
                self._send_error(ApiError(fault, reason, message), headers=extra)
                return
            self._route(split.path, query, raw)
        except ApiError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the emulator: answer like the real server would
            log.exception("emulator failed on %s %s", self.command, split.path)
            self._send_error(internal_error(f"emulator error: {type(exc).__name__}: {exc}"))

    def _route(self, path: str, query: dict[str, str], raw: bytes) -> None:
        emulator = self.server.emulator
        store = emulator.store
        if path in ("/healthz", "/livez", "/readyz"):
            self._send(200, b"ok", "text/plain; charset=utf-8")
            return
        if path.rstrip("/") == "/version":
            self._send_json(200, emulator.version_info())
            return
        if path == "/api":
            self._send_json(
                200,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": emulator.url.split("//", 1)[1]}
                    ],
                },
            )
            return
        if path in ("/api/v1", "/api/v1/"):
            self._send_json(200, _resource_list())
            return
        route = _parse_route(path)
        if route is None or route.plural not in RESOURCES:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rt = RESOURCES[route.plural]
        if (route.namespace is not None and not rt.namespaced) or (
            rt.namespaced and route.namespace is None and route.name is not None
        ):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if route.sub not in (None, "status", "log", "binding") or (
            route.sub == "log" and route.plural != "pods"
        ):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        dry_run = _dry_run(query)
        method = self.command
        if route.name is None:
            self._collection(route, query, raw, dry_run)
            return
        if route.sub == "log":
            if method != "GET":
                raise _method_not_allowed(method)
            self._pod_log(route, query)
            return
        if route.sub == "binding":
            if method != "POST":
                raise _method_not_allowed(method)
            body = self._json_body(raw) or {}
            target = (body.get("target") or {}).get("name") if isinstance(body, dict) else None
            if not target:
                raise bad_request("binding: target.name is required")
            store.bind(route.namespace or "", route.name, target)
            self._send_json(
                201,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "code": 201,
                },
            )
            return
        if method == "GET":
            self._send_json(200, store.get(route.plural, route.namespace, route.name))
        elif method == "PUT":
            obj = store.replace(
                route.plural,
                route.namespace,
                route.name,
                self._json_body(raw),
                subresource=route.sub,
                dry_run=dry_run,
            )
            self._send_json(200, obj)
        elif method == "PATCH":
            content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if content_type not in PATCH_TYPES:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown format - accepted media types include: {', '.join(PATCH_TYPES)}",
                )
            patch = self._json_body(raw)
            obj = store.patch(
                route.plural,
                route.namespace,
                route.name,
                patch,
                content_type,
                subresource=route.sub,
                dry_run=dry_run,
            )
            self._send_json(200, obj)
        elif method == "DELETE" and route.sub is None:
            grace, propagation, preconditions = _delete_options(query, self._json_body(raw))
            status, obj = store.delete(
                route.plural,
                route.namespace,
                route.name,
                grace_period=grace,
                propagation=propagation,
                preconditions=preconditions,
                dry_run=dry_run,
            )
            self._send_json(status, obj)
        else:
            raise _method_not_allowed(method)

    def _collection(self, route: _Route, query: dict[str, str], raw: bytes, dry_run: bool) -> None:
        store = self.server.emulator.store
        rt = RESOURCES[route.plural]
        method = self.command
        all_namespaces = rt.namespaced and route.namespace is None
        if route.sub is not None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if method == "GET" and (route.watch or query.get("watch") in _TRUE):
            self._watch(route, query)
        elif method == "GET":
            limit = _int_param(query, "limit")
            items, rv, token = store.list(
                route.plural,
                route.namespace,
                label_selector=query.get("labelSelector"),
                field_selector=query.get("fieldSelector"),
                limit=limit,
                continue_token=query.get("continue") or None,
            )
            meta: dict[str, Any] = {"resourceVersion": rv}
            if token:
                meta["continue"] = token
            self._send_json(
                200, {"kind": rt.list_kind, "apiVersion": "v1", "metadata": meta, "items": items}
            )
        elif method == "POST" and not all_namespaces:
            obj = store.create(route.plural, route.namespace, self._json_body(raw), dry_run=dry_run)
            self._send_json(201, obj)
        elif method == "DELETE" and not all_namespaces:
            grace, propagation, _ = _delete_options(query, self._json_body(raw))
            status = store.delete_collection(
                route.plural,
                route.namespace,
                label_selector=query.get("labelSelector"),
                field_selector=query.get("fieldSelector"),
                grace_period=grace,
                propagation=propagation,
                dry_run=dry_run,
            )
            self._send_json(200, status)
        else:
            raise _method_not_allowed(method)

    def _pod_log(self, route: _Route, query: dict[str, str]) -> None:
        emulator = self.server.emulator
        pod = emulator.store.get("pods", route.namespace, route.name or "")
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        container = query.get("container") or (containers[0] if len(containers) == 1 else None)
        if container is None:
            raise bad_request(
                f"a container name must be specified for pod {route.name}, choose one of: {containers}"
            )
        if container not in containers:
            raise bad_request(f"container {container} is not valid for pod {route.name}")
        text = (
            emulator.log_source(route.namespace or "", route.name or "", container)
            if emulator.log_source
            else None
        )
        if text is None:
            raise bad_request(
                f'container "{container}" in pod "{route.name}" is waiting to start: ContainerCreating'
            )
        tail = _int_param(query, "tailLines")
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail:]) if tail > 0 else ""
        self._send(200, text.encode(), "text/plain")
        self._record.status = 200

    # --- watch ------------------------------------------------------------------------------

    def _watch(self, route: _Route, query: dict[str, str]) -> None:
        emulator = self.server.emulator
        timeout = _int_param(query, "timeoutSeconds")
        bookmarks = query.get("allowWatchBookmarks") in _TRUE
        send_initial = query.get("sendInitialEvents")
        if send_initial in _TRUE and not bookmarks:
            raise ApiError(422, "Invalid", "sendInitialEvents requires allowWatchBookmarks=true")
        watcher = None
        try:
            watcher = emulator.store.watch(
                route.plural,
                route.namespace,
                label_selector=query.get("labelSelector"),
                field_selector=query.get("fieldSelector"),
                resource_version=query.get("resourceVersion"),
                send_initial_events=(send_initial in _TRUE) if send_initial is not None else None,
            )
        except ApiError as err:
            if err.code != 410:
                raise
            expired_at_start = err
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()
        self._record.status = 200
        limit = timeout if timeout is not None else emulator.default_watch_timeout
        deadline = time.monotonic() + max(limit, 0)
        generation = emulator._watch_generation
        last_bookmark = time.monotonic()
        try:
            if watcher is None:
                self._chunk({"type": "ERROR", "object": expired_at_start.status()})
            while (
                watcher is not None
                and not emulator._closing
                and generation == emulator._watch_generation
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    events = watcher.next_events(min(remaining, 0.25))
                except ApiError as err:
                    self._chunk({"type": "ERROR", "object": err.status()})
                    break
                for kind, obj in events:
                    if kind == "BOOKMARK" and not bookmarks:
                        continue
                    self._chunk({"type": kind, "object": obj})
                if bookmarks and time.monotonic() - last_bookmark >= emulator.bookmark_interval:
                    last_bookmark = time.monotonic()
                    self._chunk({"type": "BOOKMARK", "object": watcher.bookmark_object()})
                if not events and self._client_gone():
                    self.close_connection = True
                    return
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def _method_not_allowed(method: str) -> ApiError:
    return ApiError(
        405,
        "MethodNotAllowed",
        f"the server does not allow this method on the requested resource ({method})",
    )


def _int_param(query: dict[str, str], name: str) -> int | None:
    value = query.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise bad_request(f"invalid {name}: {value!r} is not an integer") from None


def _dry_run(query: dict[str, str]) -> bool:
    value = query.get("dryRun")
    if value in (None, ""):
        return False
    if value != "All":
        raise bad_request(f'Unsupported value: "{value}": supported values: "All"')
    return True


def _delete_options(
    query: dict[str, str], body: Any
) -> tuple[int | None, str | None, dict[str, Any] | None]:
    opts = body if isinstance(body, dict) else {}
    if body is not None and not isinstance(body, dict):
        raise bad_request("DeleteOptions must be a JSON object")
    grace = opts.get("gracePeriodSeconds")
    if grace is None:
        grace = _int_param(query, "gracePeriodSeconds")
    if grace is not None and not isinstance(grace, int):
        raise bad_request("gracePeriodSeconds must be an integer")
    propagation = opts.get("propagationPolicy") or query.get("propagationPolicy") or None
    orphan = opts.get("orphanDependents")
    if orphan is None and query.get("orphanDependents"):
        orphan = query["orphanDependents"] in _TRUE
    if propagation is None and orphan is not None:
        propagation = "Orphan" if orphan else "Background"
    preconditions = opts.get("preconditions")
    if preconditions is not None and not isinstance(preconditions, dict):
        raise bad_request("preconditions must be an object")
    return grace, propagation, preconditions


def _resource_list() -> dict[str, Any]:
    resources = []
    for rt in RESOURCES.values():
        verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
        resources.append(
            {
                "name": rt.plural,
                "singularName": rt.kind.lower(),
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": verbs,
            }
        )
        if rt.has_status:
            resources.append(
                {
                    "name": f"{rt.plural}/status",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    resources.append(
        {
            "name": "pods/log",
            "singularName": "",
            "namespaced": True,
            "kind": "Pod",
            "verbs": ["get"],
        }
    )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": "v1",
        "resources": resources,
    }


class KubeEmulator:
    """An emulated kube-apiserver (core/v1) on ``127.0.0.1``, with an optional kubelet.

    Use as a context manager (``with KubeEmulator() as kube: ...``) or call
    :meth:`start` / :meth:`close`. ``kube.url`` is the server URL, ``kube.kubeconfig_path``
    a kubeconfig for ``kubernetes.config.load_kube_config(config_file=...)``, and
    :meth:`api_client` a ready ``kubernetes.client.ApiClient``.

    ``token``: when set, requests must carry ``Authorization: Bearer <token>`` (401
    otherwise; the kubeconfig carries it). ``kubelet=True`` also starts a
    :class:`~.kubelet.Kubelet` (``kubelet_options`` are passed to it) as ``kube.kubelet``.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        namespaces: tuple[str, ...] = ("default", "kube-system"),
        history_size: int = 1000,
        bookmark_interval: float = 1.0,
        default_watch_timeout: float = 1800.0,
        kubelet: bool = False,
        kubelet_options: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.store = Store(history_size=history_size, namespaces=namespaces)
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.requests: deque[RequestRecord] = deque(maxlen=2000)
        self.log_source: Callable[[str, str, str], str | None] | None = None
        self.kubelet: Kubelet | None = None
        self._want_kubelet = kubelet
        self._kubelet_options = dict(kubelet_options or {})
        self._address = (host, port)
        self._faults: list[FaultRule] = []
        self._lock = threading.Lock()
        self._watch_generation = 0
        self._closing = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._gc: GarbageCollector | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.url = ""
        self.kubeconfig_path = Path()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> KubeEmulator:
        self._gc = GarbageCollector(self.store)
        self._server = _Server(self._address, self)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="k8s-emulator-http",
            daemon=True,
        )
        self._thread.start()
        self._tmp = tempfile.TemporaryDirectory(prefix="k8s-emulator-")
        self.kubeconfig_path = Path(self._tmp.name) / "kubeconfig"
        self.kubeconfig_path.write_text(json.dumps(self.kubeconfig(), indent=2))
        if self._want_kubelet:
            from .kubelet import Kubelet

            self.kubelet = Kubelet(self, **self._kubelet_options)
        return self

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.kubelet is not None:
            self.kubelet.close()
        self.store.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.drop_connections()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._gc is not None:
            self._gc.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- clients ----------------------------------------------------------------------------

    def kubeconfig(self, namespace: str = "default") -> dict[str, Any]:
        """The kubeconfig document (also written to :attr:`kubeconfig_path`)."""
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": user}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
                }
            ],
            "current-context": "emulator",
        }

    def api_client(self) -> kubernetes.client.ApiClient:
        """A new official ``ApiClient`` configured from the kubeconfig (close it when done)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig_path))

    def version_info(self) -> dict[str, str]:
        return {
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0-emulator",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.24",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    # --- request hooks ----------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        self.requests.append(record)

    def _authorized(self, header: str | None) -> bool:
        if not self.token:
            return True
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.token.encode())

    def _take_fault(self, method: str, path: str) -> int | None:
        with self._lock:
            for rule in self._faults:
                if rule.remaining > 0 and rule.matches(method, path):
                    rule.remaining -= 1
                    status = rule.status
                    self._faults = [r for r in self._faults if r.remaining > 0]
                    return status
        return None

    # --- faults -----------------------------------------------------------------------------

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int = 500,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests matching ``method`` / a ``path`` substring with
        ``status`` (500 InternalError by default; 429 and 503 carry ``Retry-After: 1``)."""
        with self._lock:
            self._faults.append(FaultRule(count, status, method, path))

    def expire_history(self) -> None:
        """Drop the watch history: resuming any watch from an older rv gets 410 Expired."""
        self.store.expire_history()

    def close_watches(self) -> None:
        """End every open watch stream cleanly (the client sees the stream finish)."""
        with self.store.lock:
            self._watch_generation += 1
            self.store.changed.notify_all()

    # --- conveniences for tests -------------------------------------------------------------

    def wait_for(
        self,
        plural: str,
        namespace: str | None,
        name: str,
        predicate: Callable[[dict[str, Any] | None], bool],
        *,
        timeout: float = 10.0,
    ) -> dict[str, Any] | None:
        """Block until ``predicate(object or None)`` holds; ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.store.lock:
            while True:
                try:
                    obj: dict[str, Any] | None = self.store.get(plural, namespace, name)
                except ApiError:
                    obj = None
                if predicate(obj):
                    return obj
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{plural} {namespace}/{name}: condition not met in {timeout}s; last seen: {_summary(obj)}"
                    )
                self.store.changed.wait(min(remaining, 0.5))

    async def await_for(
        self,
        plural: str,
        namespace: str | None,
        name: str,
        predicate: Callable[[dict[str, Any] | None], bool],
        *,
        timeout: float = 10.0,
    ) -> dict[str, Any] | None:
        """:meth:`wait_for` for trio code (polls; raises ``trio.TooSlowError``)."""
        import trio

        with trio.fail_after(timeout):
            while True:
                try:
                    obj: dict[str, Any] | None = self.store.get(plural, namespace, name)
                except ApiError:
                    obj = None
                if predicate(obj):
                    return obj
                await trio.sleep(0.01)


def _summary(obj: dict[str, Any] | None) -> str:
    if obj is None:
        return "absent"
    status = obj.get("status") or {}
    return json.dumps(
        {
            "phase": status.get("phase"),
            "conditions": status.get("conditions"),
            "containerStatuses": status.get("containerStatuses"),
        }
    )
