"""Path routing and request/response rewriting for the web proxy (pure: no I/O).

Theory of operation
-------------------
The route table holds PATH routes: a path prefix such as ``/clusters/abc`` mapped to a
target URL such as ``http://10.0.0.5:8787``. :class:`Router` stores the prefixes in a trie
keyed by path *segments* (the pieces between ``/``), so ``/clusters/ab`` never matches the
request path ``/clusters/abc``. Empty segments are ignored, which means a trailing slash
(or a doubled slash) never changes which route matches. The root route ``/`` lives on the
trie's root node and therefore matches every path that nothing longer matches.

``Router.match(path)`` walks the request path one segment at a time and remembers the
deepest node carrying a route: that is the longest segment prefix. It returns the route
and the *remainder*: the raw request path after the last matched segment (``""`` or a
string starting with ``/``), never percent-decoded, so the upstream sees the bytes the
client sent.

:func:`upstream_target` builds the request-target for the upstream: the matched prefix is
stripped, the remainder is joined to the target's path with exactly one ``/``, and the
target's own query string goes in front of the request's query.

:func:`rewrite_request_headers` / :func:`rewrite_response_headers` implement the usual
reverse-proxy header rules: hop-by-hop headers are dropped (``Connection``, ``Keep-Alive``,
``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade`` and every header named
in ``Connection``; ``Content-Length`` too when ``Transfer-Encoding`` frames the message),
except that a websocket upgrade keeps ``Upgrade`` and
``Connection: Upgrade``; ``Host`` becomes the target's ``host:port``; ``X-Forwarded-For``
gets the client address appended; ``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "ProxyRoute",
    "Router",
    "Target",
    "connection_tokens",
    "is_hop_by_hop",
    "is_upgrade_request",
    "merge_query",
    "join_path",
    "origin_form",
    "parse_target",
    "rewrite_request_headers",
    "rewrite_response_headers",
    "upstream_target",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}

# Headers that describe one hop, never the message; lower-case. "proxy-*" is matched by
# prefix in is_hop_by_hop. "expect" is handled by our own server side (100-continue), so
# forwarding it would only make the upstream wait for a handshake we do not relay.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed PATH-route target URL (``http://host:port[/path][?query]``)."""

    scheme: str
    host: str
    port: int
    path: str = ""
    query: str = ""

    @property
    def authority(self) -> str:
        """``host:port`` as sent in ``Host`` (IPv6 literals in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def origin(self) -> tuple[str, str, int]:
        """The connection identity: (scheme, host, port)."""
        return (self.scheme, self.host, self.port)


def parse_target(url: str) -> Target:
    """Parse a PATH-route target; raise ``ValueError`` with a clear message if unusable."""
    if not isinstance(url, str) or not url:
        raise ValueError("target must be a non-empty URL string")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid target URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"target URL {url!r} must be http:// or https://")
    host = parts.hostname
    if not host:
        raise ValueError(f"target URL {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"target URL {url!r} must not carry credentials")
    return Target(
        scheme=scheme,
        host=host,
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        path=parts.path,
        query=parts.query,
    )


def _segments(path: str) -> list[str]:
    return [s for s in path.split("/") if s]


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """One PATH route as the proxy uses it: the registered prefix and its parsed target."""

    path: str
    target: Target


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    route: ProxyRoute | None = None


class Router:
    """Immutable segment trie over PATH routes; longest segment-prefix match.

    Build it with ``Router(pairs)`` from ``(path, target_url)`` pairs or with
    :meth:`from_routes` from route-table entries. Routes whose target cannot be parsed are
    left out and listed in :attr:`rejected` as ``(path, reason)`` for the caller to log.
    When two paths normalise to the same segments (``/a`` and ``/a/``), the last one wins.
    """

    def __init__(self, routes: Iterable[tuple[str, str]] = ()) -> None:
        self._root = _Node()
        self.rejected: list[tuple[str, str]] = []
        self._count = 0
        for path, target in routes:
            self._add(path, target)

    @classmethod
    def from_routes(cls, routes: Iterable[Any]) -> Router:
        """Build from objects with ``kind``, ``key`` and ``target`` (``Route``); PATH only."""
        return cls((r.key, r.target) for r in routes if r.kind == "PATH" and r.target is not None)

    def __len__(self) -> int:
        return self._count

    def _add(self, path: str, target: str) -> None:
        if not isinstance(path, str) or not path.startswith("/"):
            self.rejected.append((str(path), "path must start with '/'"))
            return
        try:
            parsed = parse_target(target)
        except ValueError as exc:
            self.rejected.append((path, str(exc)))
            return
        node = self._root
        for seg in _segments(path):
            node = node.children.setdefault(seg, _Node())
        if node.route is None:
            self._count += 1
        node.route = ProxyRoute(path=path, target=parsed)

    def match(self, path: str) -> tuple[ProxyRoute, str] | None:
        """Return ``(route, remainder)`` for the longest segment prefix of ``path``.

        ``path`` is the raw request path (no query). The remainder is the part of ``path``
        after the matched prefix: ``""`` or a string that starts with ``/``.
        """
        node = self._root
        best: tuple[ProxyRoute, int] | None = (node.route, 0) if node.route else None
        n = len(path)
        pos = 0
        while True:
            while pos < n and path[pos] == "/":
                pos += 1
            if pos >= n:
                break
            end = path.find("/", pos)
            if end < 0:
                end = n
            child = node.children.get(path[pos:end])
            if child is None:
                break
            node, pos = child, end
            if node.route is not None:
                best = (node.route, pos)
        if best is None:
            return None
        route, end = best
        return route, path[end:]


def join_path(base: str, remainder: str) -> str:
    """Join a target path and a request remainder with exactly one ``/``."""
    if not remainder:
        return base or "/"
    return base.rstrip("/") + "/" + remainder.lstrip("/")


def merge_query(target_query: str, request_query: str) -> str:
    """The target's query first, then the request's, joined by ``&`` when both exist."""
    if target_query and request_query:
        return f"{target_query}&{request_query}"
    return target_query or request_query


def upstream_target(target: Target, remainder: str, query: str) -> str:
    """The origin-form request-target to send upstream."""
    path = join_path(target.path, remainder)
    q = merge_query(target.query, query)
    return f"{path}?{q}" if q else path


def origin_form(request_target: str) -> tuple[str, str] | None:
    """Split a request-target into ``(path, query)``.

    Accepts origin-form (``/p?q``) and absolute-form (``http://host/p?q``); anything else
    (``*``, authority-form) gives ``None``.
    """
    if request_target.startswith("/"):
        path, _, query = request_target.partition("?")
        return path, query
    lowered = request_target[:8].lower()
    if lowered.startswith(("http://", "https://")):
        rest = request_target.split("://", 1)[1]
        slash = rest.find("/")
        question = rest.find("?")
        if slash < 0 or (0 <= question < slash):
            path_and_query = "/" + (rest[question:] if question >= 0 else "")
        else:
            path_and_query = rest[slash:]
        path, _, query = path_and_query.partition("?")
        return path or "/", query
    return None


def is_hop_by_hop(name: str) -> bool:
    """True for headers that belong to one connection hop (``name`` in any case)."""
    lname = name.lower()
    return lname in _HOP_BY_HOP or lname.startswith("proxy-")


def connection_tokens(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The lower-cased tokens listed in every ``Connection`` header."""
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def _get(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    lname = name.lower()
    for k, v in headers:
        if k.lower() == lname:
            return v
    return None


def is_upgrade_request(headers: Sequence[tuple[str, str]]) -> bool:
    """True when the request asks to switch protocols (``Connection: upgrade`` + ``Upgrade``)."""
    upgrade = _get(headers, "upgrade")
    return bool(upgrade and upgrade.strip()) and "upgrade" in connection_tokens(headers)


def _scan(headers: Sequence[tuple[str, str]]) -> tuple[list[str], set[str]]:
    """Lower-cased names (in order) and the names to drop besides the hop-by-hop ones:
    those listed in ``Connection``, and ``content-length`` beside ``Transfer-Encoding``
    (a message with Transfer-Encoding is framed by it; a Content-Length beside it is
    meaningless and, forwarded alone, would misframe the body: request smuggling)."""
    lowered = []
    named: set[str] = set()
    for name, value in headers:
        lname = name.lower()
        lowered.append(lname)
        if lname == "connection":
            named.update(t.strip().lower() for t in value.split(",") if t.strip())
        elif lname == "transfer-encoding":
            named.add("content-length")
    return lowered, named


def _strip_hop_by_hop(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    lowered, named = _scan(headers)
    return [
        item
        for lname, item in zip(lowered, headers, strict=True)
        if lname not in _HOP_BY_HOP and lname not in named and not lname.startswith("proxy-")
    ]


# Request headers we drop and set ourselves.
_REPLACED = frozenset({"host", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
_REQUEST_DROP = _HOP_BY_HOP | _REPLACED


def rewrite_request_headers(
    headers: Sequence[tuple[str, str]],
    *,
    authority: str,
    client_ip: str | None,
    proto: str,
    upgrade: bool = False,
) -> list[tuple[str, str]]:
    """Headers to send upstream for a client request.

    ``authority`` is the target's ``host:port``; ``client_ip`` the peer address (``None``
    when unknown); ``proto`` the public scheme (``http`` / ``https``); ``upgrade`` whether
    this request is a protocol upgrade to pass through (keeps ``Upgrade`` and sends
    ``Connection: Upgrade``).
    """
    lowered, named = _scan(headers)
    incoming_host = None
    upgrade_value = None
    chain: list[str] = []
    out: list[tuple[str, str]] = [("Host", authority)]
    for lname, item in zip(lowered, headers, strict=True):
        if lname in _REQUEST_DROP or lname in named or lname.startswith("proxy-"):
            if lname == "host":
                if incoming_host is None:
                    incoming_host = item[1]
            elif lname == "x-forwarded-for":
                value = item[1].strip()
                if value:
                    chain.append(value)
            elif lname == "upgrade" and upgrade_value is None:
                upgrade_value = item[1]
            continue
        out.append(item)
    if client_ip:
        chain.append(client_ip)
    if chain:
        out.append(("X-Forwarded-For", ", ".join(chain)))
    out.append(("X-Forwarded-Proto", proto))
    if incoming_host:
        out.append(("X-Forwarded-Host", incoming_host))
    if upgrade and upgrade_value:
        out.append(("Connection", "Upgrade"))
        out.append(("Upgrade", upgrade_value))
    return out


def rewrite_response_headers(
    headers: Sequence[tuple[str, str]], *, upgrade: bool = False
) -> list[tuple[str, str]]:
    """Headers to send the client for an upstream response.

    Hop-by-hop headers are dropped; for a ``101`` passthrough (``upgrade=True``) the
    upstream's ``Upgrade`` is kept and ``Connection: Upgrade`` is sent.
    """
    out = _strip_hop_by_hop(headers)
    if upgrade:
        value = _get(headers, "upgrade")
        out.append(("Connection", "Upgrade"))
        if value:
            out.append(("Upgrade", value))
    return out
