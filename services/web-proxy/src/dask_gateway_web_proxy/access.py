"""Owner-only dashboards at the web proxy: ask the API before forwarding into a dashboard.

Theory of operation
-------------------
The proxy holds no user secrets and knows no users. A request whose route is a dashboard
route, ``<prefix>/clusters/<name>`` (:func:`dashboard_cluster`; the prefix comes from the
route feed URL, ``<api><prefix>/api/v1/routes``, see :func:`split_routes_url`), is first
checked with the API:

    GET <api><prefix>/api/v1/clusters/<name>/access
    Authorization: token <proxy token>
    X-Dask-Gateway-Authorization: <the browser's Authorization>
    X-Dask-Gateway-Cookie: <the browser's dask-gateway-* cookies>
    X-Dask-Gateway-Next: <path?query>            (GET/HEAD navigations only)

and the answer decides (:func:`interpret`): 204 → forward, adding the API's
``Set-Cookie`` / ``WWW-Authenticate`` (login cookie, Kerberos mutual auth) to the
dashboard's response; 302 (hub OAuth login), 401 (with the challenge), 403, 404 → that
answer goes to the browser; anything else, or an API that cannot be reached in time → 502.

Positive answers are kept for ``ttl`` seconds (default 30) in a bounded LRU keyed by
``(cluster, SHA-256 of the forwarded credentials)``; refusals and failures never are, so
a new login or a restarted API takes effect at once, and a revoked credential keeps its
dashboard access for at most ``ttl``. Concurrent checks with the same key (a dashboard page
loading its scripts) share one API request. Only the gateway's own cookies are forwarded
and cache-keyed, so unrelated cookies neither reach the API nor defeat the cache.

Before forwarding to the dashboard the proxy removes ``Authorization`` and the
``dask-gateway-*`` cookies: the dashboard runs the user's code and needs neither. Websocket
upgrades are checked the same way (never redirected). Other routes (``<prefix>/api/...``)
are not touched. Credentials never appear in logs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import h11
import trio

from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import Headers, HTTPClient, Request, Response, Upgrade

from .routing import ProxyRoute, is_upgrade_request, origin_form

__all__ = [
    "FORWARDED_AUTHORIZATION",
    "FORWARDED_COOKIE",
    "FORWARDED_NEXT",
    "AccessAnswer",
    "AccessCache",
    "DashboardAccess",
    "cache_key",
    "carries_credentials",
    "check_headers",
    "dashboard_cluster",
    "gateway_cookies",
    "interpret",
    "split_routes_url",
    "strip_credentials",
]

log = logging.getLogger("dask_gateway.web_proxy.access")

# Wire contract with the API (dask_gateway_api.dashboard_auth).
FORWARDED_AUTHORIZATION = "X-Dask-Gateway-Authorization"
FORWARDED_COOKIE = "X-Dask-Gateway-Cookie"
FORWARDED_NEXT = "X-Dask-Gateway-Next"
#: The API's login cookie is ``dask-gateway-<hex>``, its OAuth state cookie
#: ``dask-gateway-oauth-state``.
GATEWAY_COOKIE_PREFIX = "dask-gateway-"
ROUTES_SUFFIX = "/api/v1/routes"

DEFAULT_TTL = 30.0
DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_TIMEOUT = 10.0
MAX_ANSWER_BYTES = 64 * 1024

Handler = Callable[[Request], Awaitable[Response | Upgrade]]
RouteOf = Callable[[str], "tuple[ProxyRoute, str] | None"]

# --- pure parts -------------------------------------------------------------------------


def _segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


def split_routes_url(routes_url: str) -> tuple[str, str]:
    """``(access base URL, prefix)`` from the route feed URL ``<api><prefix>/api/v1/routes``.

    The access URL of cluster ``n`` is ``<base><n>/access``. Raises ``ValueError`` when
    the URL does not end in ``/api/v1/routes`` (it always does with our API).
    """
    parts = urlsplit(routes_url)
    path = parts.path.rstrip("/")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {routes_url!r}")
    if not path.endswith(ROUTES_SUFFIX):
        raise ValueError(
            f"the route feed URL must end in {ROUTES_SUFFIX} to locate the access check, "
            f"got {routes_url!r}"
        )
    prefix = path[: -len(ROUTES_SUFFIX)]
    return f"{parts.scheme}://{parts.netloc}{prefix}/api/v1/clusters/", prefix


def dashboard_cluster(route_path: str, prefix: str) -> str | None:
    """The cluster name if ``route_path`` is a dashboard route ``<prefix>/clusters/<name>``."""
    segments, head = _segments(route_path), _segments(prefix)
    n = len(head)
    if len(segments) == n + 2 and segments[:n] == head and segments[n] == "clusters":
        return segments[-1]
    return None


def _cookie_pairs(values: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        for part in value.split(";"):
            name, sep, rest = part.strip().partition("=")
            if sep and name:
                pairs.append((name.strip(), rest.strip()))
    return pairs


def gateway_cookies(values: Sequence[str]) -> str | None:
    """The ``dask-gateway-*`` cookies of these ``Cookie`` header values, as one header
    value (``None`` when there are none)."""
    values = [v for v in values if GATEWAY_COOKIE_PREFIX in v]
    if not values:
        return None
    kept = [f"{n}={v}" for n, v in _cookie_pairs(values) if n.startswith(GATEWAY_COOKIE_PREFIX)]
    return "; ".join(kept) or None


def carries_credentials(headers: Sequence[tuple[str, str]]) -> bool:
    """Whether :func:`strip_credentials` would remove anything."""
    for name, value in headers:
        lname = name.lower()
        if lname == "authorization" or (lname == "cookie" and GATEWAY_COOKIE_PREFIX in value):
            return True
    return False


def strip_credentials(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The request headers without ``Authorization`` and the ``dask-gateway-*`` cookies."""
    out = []
    for name, value in headers:
        lname = name.lower()
        if lname == "authorization":
            continue
        if lname == "cookie" and GATEWAY_COOKIE_PREFIX in value:
            kept = [
                f"{n}={v}"
                for n, v in _cookie_pairs([value])
                if not n.startswith(GATEWAY_COOKIE_PREFIX)
            ]
            if kept:
                out.append((name, "; ".join(kept)))
            continue
        out.append((name, value))
    return out


def check_headers(
    token: str, authorization: str | None, cookies: str | None, next_target: str | None
) -> list[tuple[str, str]]:
    """The headers of the access-check request."""
    headers = [("Authorization", f"token {token}"), ("Accept", "application/json")]
    if authorization:
        headers.append((FORWARDED_AUTHORIZATION, authorization))
    if cookies:
        headers.append((FORWARDED_COOKIE, cookies))
    if next_target:
        headers.append((FORWARDED_NEXT, next_target))
    return headers


def cache_key(name: str, authorization: str | None, cookies: str | None) -> tuple[str, str]:
    """``(cluster, SHA-256 of the credentials)``: the credentials themselves are not kept."""
    material = f"{authorization or ''}\0{cookies or ''}".encode("utf-8", "surrogateescape")
    return name, hashlib.sha256(material).hexdigest()


_RELAYED_ON_ALLOW = ("set-cookie", "www-authenticate")
_TEXT = {401: "Authentication required", 403: "Forbidden", 404: "Not Found"}


@dataclass(frozen=True)
class AccessAnswer:
    """What the API said: ``allowed`` (with ``relay`` headers for the dashboard's
    response), or the ``status`` and ``headers`` of the answer the browser gets."""

    allowed: bool
    status: int = 204
    headers: tuple[tuple[str, str], ...] = ()
    relay: tuple[tuple[str, str], ...] = ()

    def denial(self) -> Response:
        """A fresh response for the browser (never shared between requests)."""
        if self.status == 302:
            return Response(302, list(self.headers), b"")
        text = _TEXT.get(self.status, "Bad Gateway")
        return Response.text(self.status, text, headers=self.headers)


BAD_GATEWAY = AccessAnswer(False, 502)


def _safe_location(value: str | None) -> bool:
    return bool(value) and value.startswith("/") and not value.startswith("//")  # type: ignore[union-attr]


def interpret(status: int, headers: Sequence[tuple[str, str]]) -> AccessAnswer:
    """Map the API's answer to what the proxy does (see the module docstring)."""
    named = [(k, v) for k, v in headers if k.lower() in _RELAYED_ON_ALLOW]
    if status == 204:
        return AccessAnswer(True, relay=tuple(named))
    if status == 302:
        location = next((v for k, v in headers if k.lower() == "location"), None)
        if not _safe_location(location):
            return BAD_GATEWAY
        cookies = tuple((k, v) for k, v in named if k.lower() == "set-cookie")
        return AccessAnswer(False, 302, (("Location", location), *cookies))  # type: ignore[arg-type]
    if status == 401:
        challenges = tuple((k, v) for k, v in named if k.lower() == "www-authenticate")
        if not challenges:
            return BAD_GATEWAY  # a 401 without a challenge: the proxy token was refused
        return AccessAnswer(False, 401, challenges)
    if status in (403, 404):
        return AccessAnswer(False, status)
    return BAD_GATEWAY


class AccessCache:
    """Bounded LRU of allowed keys, each for ``ttl`` seconds; ``ttl <= 0`` keeps nothing."""

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("the access cache needs room for at least one entry")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def allowed(self, key: tuple[str, str]) -> bool:
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if self._clock() >= expiry:
            del self._expiry[key]
            return False
        self._expiry.move_to_end(key)
        return True

    def allow(self, key: tuple[str, str]) -> None:
        if self.ttl <= 0:
            return
        self._expiry[key] = self._clock() + self.ttl
        self._expiry.move_to_end(key)
        while len(self._expiry) > self.max_entries:
            self._expiry.popitem(last=False)


# --- the I/O shell ----------------------------------------------------------------------


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    answer: AccessAnswer | None = None


class DashboardAccess:
    """Asks the API whether a request may enter a dashboard (see the module docstring)."""

    def __init__(
        self,
        access_base: str,
        prefix: str,
        token: str,
        *,
        ttl: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        timeout: float = DEFAULT_TIMEOUT,
        http: HTTPClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.access_base = access_base
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        self.cache = AccessCache(ttl, max_entries, clock=clock)
        self._token = token
        self._owns_http = http is None
        self._http = http if http is not None else HTTPClient(max_idle_per_origin=32)
        self._inflight: dict[tuple[str, str], _Flight] = {}
        #: Checks that went to the API (for tests and measurements).
        self.api_requests = 0

    @classmethod
    def from_routes_url(cls, routes_url: str, token: str, **kwargs: object) -> DashboardAccess:
        base, prefix = split_routes_url(routes_url)
        return cls(base, prefix, token, **kwargs)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def check(
        self, headers: Headers, name: str, *, next_target: str | None = None
    ) -> AccessAnswer:
        """The API's verdict on a request with these headers for cluster ``name``."""
        authorization = headers.get("Authorization")
        cookies = gateway_cookies(headers.get_all("Cookie"))
        key = cache_key(name, authorization, cookies)
        while True:
            if self.cache.allowed(key):
                return AccessAnswer(True)
            flight = self._inflight.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.answer is not None:
                return flight.answer
            # that check was cancelled: look again
        flight = self._inflight[key] = _Flight()
        try:
            answer = await self._ask(
                name, check_headers(self._token, authorization, cookies, next_target)
            )
            if answer.allowed:
                self.cache.allow(key)
            flight.answer = answer
            return answer
        finally:
            del self._inflight[key]
            flight.done.set()

    async def _ask(self, name: str, headers: list[tuple[str, str]]) -> AccessAnswer:
        url = f"{self.access_base}{quote(name, safe='')}/access"
        self.api_requests += 1
        try:
            response = await self._http.fetch(
                "GET", url, headers=headers, timeout=self.timeout, max_body_bytes=MAX_ANSWER_BYTES
            )
        except (
            OSError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
            GatewayError,
        ) as exc:
            reason = (
                "timed out"
                if isinstance(exc, trio.TooSlowError)
                else str(exc) or type(exc).__name__
            )
            log.warning("Dashboard access check for %s failed: %s", name, reason)
            return BAD_GATEWAY
        answer = interpret(response.status, response.headers.items())
        if answer.status == 502:
            log.warning(
                "Dashboard access check for %s: unexpected API answer %d", name, response.status
            )
        return answer

    def gate(
        self, handler: Handler, route_of: RouteOf, count: Callable[[int], None] | None = None
    ) -> Handler:
        """Wrap the proxy's handler: dashboard requests pass only with the API's consent.

        ``route_of(path)`` is the proxy's route match; ``count(status)`` records answers
        given here (the wrapped handler counts its own).
        """

        async def gated(request: Request) -> Response | Upgrade:
            split = origin_form(request.target)
            matched = route_of(split[0]) if split is not None else None
            name = dashboard_cluster(matched[0].path, self.prefix) if matched else None
            if name is None or split is None:
                return await handler(request)
            items = request.headers.items()
            navigable = request.method in ("GET", "HEAD") and not is_upgrade_request(items)
            path, query = split
            next_target = (f"{path}?{query}" if query else path) if navigable else None
            answer = await self.check(request.headers, name, next_target=next_target)
            if not answer.allowed:
                denial = answer.denial()
                if count is not None:
                    count(denial.status)
                return denial
            if carries_credentials(items):
                request.headers = Headers(strip_credentials(items))
            response = await handler(request)
            if answer.relay:
                response.headers.extend(answer.relay)
            return response

        return gated
