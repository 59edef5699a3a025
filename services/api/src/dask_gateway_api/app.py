"""HTTP routing of the public API (E1–E11, spec §1) onto the cluster manager.

Routing is a pure function (:func:`match_route`) from a request path to an endpoint and
an optional cluster name; :class:`ApiApp` checks the method (405 with ``Allow`` on a known
path), authenticates, enforces ownership, parses bodies and calls the manager. Errors are
raised as ``GatewayError`` and turned into ``{"error": message}`` JSON by the HTTP layer,
which also answers every unexpected exception with a generic 500 carrying a request id.

Order of checks on a cluster endpoint, as upstream: 401 (no user) → 404 (unknown
cluster) → 403 (owned by another user) → 422 (bad body) → the action (409 if the cluster
is not running). Unknown JSON fields in scale/adapt bodies are ignored, as upstream does
(the official client sends exactly the documented ones; ignoring extras keeps newer
clients working).
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import metadata

from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import Request, Response

from .auth import User, UserAuth, cluster_token_matches, token_required
from .dashboard_auth import DashboardAuth
from .limits import validate_adapt_body, validate_scale_body
from .manager import ClusterManager
from .models import ACTIVE_STATUSES, Cluster, parse_status_filter, to_wire

__all__ = [
    "ApiApp",
    "Endpoint",
    "WireCache",
    "match_route",
    "normalize_prefix",
    "server_version",
    "wants_wait",
]

log = logging.getLogger("dask_gateway.api.app")

Handler = Callable[[Request], Awaitable[Response]]


class Endpoint(enum.Enum):
    VERSION = "version"
    HEALTH = "health"
    OPTIONS = "options"
    CLUSTERS = "clusters"
    CLUSTER = "cluster"
    SCALE = "scale"
    ADAPT = "adapt"
    HEARTBEAT = "heartbeat"
    ROUTES = "routes"


ALLOWED_METHODS: dict[Endpoint, tuple[str, ...]] = {
    Endpoint.VERSION: ("GET",),
    Endpoint.HEALTH: ("GET",),
    Endpoint.OPTIONS: ("GET",),
    Endpoint.CLUSTERS: ("GET", "POST"),
    Endpoint.CLUSTER: ("GET", "DELETE"),
    Endpoint.SCALE: ("POST",),
    Endpoint.ADAPT: ("POST",),
    Endpoint.HEARTBEAT: ("POST",),
    Endpoint.ROUTES: ("GET",),
}

_SUBRESOURCES = {
    "scale": Endpoint.SCALE,
    "adapt": Endpoint.ADAPT,
    "heartbeat": Endpoint.HEARTBEAT,
}


def normalize_prefix(prefix: str) -> str:
    """``""`` or ``/a/b`` (leading slash, no trailing slash)."""
    prefix = prefix.strip().rstrip("/")
    if prefix and not prefix.startswith("/"):
        prefix = "/" + prefix
    return prefix


def match_route(path: str, prefix: str = "") -> tuple[Endpoint, str | None] | None:
    """The endpoint (and cluster name) of a request path, or ``None`` if unknown.

    List/create is ``/api/v1/clusters/`` (the no-slash form is accepted too); every other
    cluster path has no trailing slash. Names cannot contain ``/``.
    """
    if prefix:
        if not path.startswith(prefix + "/"):
            return None
        path = path[len(prefix) :]
    if path == "/api/version":
        return Endpoint.VERSION, None
    if path == "/api/health":
        return Endpoint.HEALTH, None
    if path == "/api/v1/options":
        return Endpoint.OPTIONS, None
    if path == "/api/v1/routes":
        return Endpoint.ROUTES, None
    if path in ("/api/v1/clusters/", "/api/v1/clusters"):
        return Endpoint.CLUSTERS, None
    rest = path.removeprefix("/api/v1/clusters/")
    if rest == path:
        return None
    parts = rest.split("/")
    if len(parts) == 1 and parts[0]:
        return Endpoint.CLUSTER, parts[0]
    if len(parts) == 2 and parts[0] and parts[1] in _SUBRESOURCES:
        return _SUBRESOURCES[parts[1]], parts[0]
    return None


def wants_wait(params: dict[str, str]) -> bool:
    """E6's ``wait`` flag: absent → no; empty → yes; else ``int(value)`` truthiness."""
    value = params.get("wait")
    if value is None:
        return False
    if value == "":
        return True
    try:
        return bool(int(value))
    except ValueError:
        return False


class WireCache:
    """Cluster objects encoded as JSON, re-encoded only when a wire-visible field changes.

    A cluster's ``options`` and PEMs never change after creation, so the status, the
    dashboard address and the two times decide the encoding. Listing 20 running clusters
    (each with a certificate and key) then costs a join instead of 20 encodings.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[object, ...], bytes]] = {}

    def encode(self, cluster: Cluster) -> bytes:
        key = (
            cluster.status,
            cluster.dashboard_address,
            cluster.start_time_ms,
            cluster.stop_time_ms,
        )
        entry = self._entries.get(cluster.name)
        if entry is not None and entry[0] == key:
            return entry[1]
        data = json.dumps(to_wire(cluster), separators=(",", ":")).encode()
        self._entries[cluster.name] = (key, data)
        return data

    def prune(self, keep: Callable[[str], bool]) -> None:
        """Forget the entries of clusters that ``keep`` rejects (expired records)."""
        self._entries = {k: v for k, v in self._entries.items() if keep(k)}

    def __len__(self) -> int:
        return len(self._entries)


def _json_response(body: bytes, status: int = 200) -> Response:
    return Response(status, [("Content-Type", "application/json")], body)


def server_version() -> str:
    try:
        return metadata.version("dask-gateway-api")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class ApiApp:
    """The API's request handler: ``await app(request) -> Response``."""

    def __init__(
        self,
        manager: ClusterManager,
        auth: UserAuth,
        *,
        prefix: str = "",
        routes_handler: Handler | None = None,
        version: str | None = None,
        dashboards: DashboardAuth | None = None,
    ) -> None:
        self.manager = manager
        self.dashboards = dashboards
        self.auth = auth
        self.prefix = normalize_prefix(prefix)
        self.routes_handler = routes_handler
        self.version = version or server_version()
        self._wire = WireCache()

    async def __call__(self, request: Request) -> Response:
        # Dashboard access check and hub OAuth login (dashboard_auth.py).
        if self.dashboards is not None:
            answer = await self.dashboards.maybe_handle(request)
            if answer is not None:
                return answer
        matched = match_route(request.path, self.prefix)
        if matched is None:
            raise GatewayError("Not Found", status=404)
        endpoint, name = matched
        allowed = ALLOWED_METHODS[endpoint]
        if request.method not in allowed:
            raise GatewayError(
                "Method Not Allowed", status=405, headers=[("Allow", ", ".join(allowed))]
            )
        if endpoint is Endpoint.VERSION:
            return Response.json({"version": self.version})
        if endpoint is Endpoint.HEALTH:
            if self.manager.running:
                return Response.json({"status": "pass"})
            return Response.json({"status": "fail"}, status=503)
        if endpoint is Endpoint.ROUTES:
            if self.routes_handler is None:
                raise GatewayError("Not Found", status=404)
            return await self.routes_handler(request)
        if not self.manager.running:
            raise GatewayError("The gateway is starting or stopping", status=503)
        if endpoint is Endpoint.HEARTBEAT:
            assert name is not None
            return await self._heartbeat(request, name)
        if endpoint is Endpoint.CLUSTER and request.method == "DELETE":
            assert name is not None
            return await self._delete(request, name)
        result = await self.auth.authenticate(request)
        response = await self._user_endpoint(request, endpoint, name, result.user)
        return self.auth.finish(request, result, response)

    # ------------------------------------------------------------------ helpers

    def _owned(self, name: str, user: User, action: str) -> Cluster:
        cluster = self.manager.get(name)
        if cluster is None:
            raise GatewayError(f"Cluster {name} not found", status=404)
        if cluster.username != user.name:
            raise GatewayError(
                f"User {user.name} lacks permissions to {action} cluster {name}", status=403
            )
        return cluster

    async def _user_endpoint(
        self, request: Request, endpoint: Endpoint, name: str | None, user: User
    ) -> Response:
        if endpoint is Endpoint.OPTIONS:
            return Response.json({"cluster_options": self.manager.options_for(user)})
        if endpoint is Endpoint.CLUSTERS:
            if request.method == "POST":
                return await self._create(request, user)
            return self._list(request, user)
        assert name is not None
        if endpoint is Endpoint.CLUSTER:
            cluster = self._owned(name, user, "view")
            if wants_wait(request.query_params):
                cluster = await self.manager.wait_ready(name) or cluster
            return _json_response(self._wire.encode(cluster))
        if endpoint is Endpoint.SCALE:
            self._owned(name, user, "scale")
            count = validate_scale_body(await request.json())
            ok, msg = await self.manager.scale(name, user, count)
            return Response.json({"ok": ok, "msg": msg})
        if endpoint is Endpoint.ADAPT:
            self._owned(name, user, "adapt")
            minimum, maximum, active = validate_adapt_body(await request.json())
            ok, msg = await self.manager.adapt(name, user, minimum, maximum, active)
            return Response.json({"ok": ok, "msg": msg})
        raise AssertionError(f"unrouted endpoint {endpoint}")  # pragma: no cover

    def _list(self, request: Request, user: User) -> Response:
        raw = request.query_params.get("status")
        if raw is None:
            statuses = set(ACTIVE_STATUSES)
        else:
            try:
                statuses = parse_status_filter(raw)
            except ValueError as exc:
                raise GatewayError(str(exc), status=422) from None
        clusters = self.manager.list(user.name, statuses)
        if len(self._wire) > 2 * self.manager.cluster_count + 64:
            self._wire.prune(lambda name: self.manager.get(name) is not None)
        items = [b"%s:%s" % (json.dumps(c.name).encode(), self._wire.encode(c)) for c in clusters]
        return _json_response(b"{" + b",".join(items) + b"}")

    async def _create(self, request: Request, user: User) -> Response:
        body = await request.json()
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise GatewayError(
                f"Request body must be a JSON object, got {type(body).__name__}", status=422
            )
        name = await self.manager.create(user, body.get("cluster_options"))
        return Response.json({"name": name}, status=201)

    async def _delete(self, request: Request, name: str) -> Response:
        cluster = self.manager.get(name)
        if cluster is not None and cluster_token_matches(request, cluster.token):
            await self.manager.stop(name)
            return Response.empty(204)
        result = await self.auth.authenticate(request)
        if cluster is not None:
            if cluster.username != result.user.name:
                raise GatewayError(
                    f"User {result.user.name} lacks permissions to stop cluster {name}",
                    status=403,
                )
            await self.manager.stop(name)
        return self.auth.finish(request, result, Response.empty(204))

    async def _heartbeat(self, request: Request, name: str) -> Response:
        cluster = self.manager.get(name)
        if cluster is None or not cluster_token_matches(request, cluster.token):
            raise token_required()
        await self.manager.heartbeat(name, await request.json())
        return Response.empty(200)
