"""Route model and route table (pure: no I/O).

A route maps a key to a target. There are two kinds, exactly as on the wire (spec §8.1):

- ``SNI``: key = bare cluster name, target = ``tls://host:port`` (or ``host:port``) of the
  cluster's scheduler; used by the scheduler proxy.
- ``PATH``: key = ``<prefix>/clusters/<name>`` (or ``<prefix>/``), target = an ``http(s)``
  URL; used by the web proxy.

Route identity is ``(kind, key)``; a PUT replaces, a DELETE removes. DELETE events carry
routes without a target, so ``Route.target`` is ``None`` there.

:class:`RouteTable` holds the current routes and a ``version`` that increases on every
real change (an identical PUT, an absent DELETE or a no-op ``replace_all`` do not count),
so consumers can cache derived structures (the web proxy's path trie) and rebuild them only
when the version moves. ``await table.wait_changed(v)`` returns once the version is past
``v``; it is meant for tests and for consumers that react to changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import trio

__all__ = [
    "KINDS",
    "EventType",
    "Route",
    "RouteError",
    "RouteEvent",
    "RouteKind",
    "RouteTable",
    "parse_host_port",
]

RouteKind = Literal["SNI", "PATH"]
KINDS: tuple[RouteKind, ...] = ("SNI", "PATH")
_KEY_FIELD: dict[str, str] = {"SNI": "sni", "PATH": "path"}
_MAX_KEY = 4096
_MAX_TARGET = 4096


class RouteError(ValueError):
    """A route or route event that does not follow the wire contract."""


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_host_port(value: str) -> tuple[str, int]:
    """Parse ``host:port`` or ``[v6]:port`` into ``(host, port)``; RouteError if malformed."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise RouteError(f"expected host:port, got {_short(value)}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise RouteError(f"expected host:port, got {_short(value)}")
    elif ":" in host or "[" in host or "]" in host:
        raise RouteError(f"IPv6 hosts must be bracketed, got {_short(value)}")
    if any(c.isspace() or c in "/?#@" for c in host):
        raise RouteError(f"invalid host in {_short(value)}")
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise RouteError(f"invalid port in {_short(value)}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise RouteError(f"port out of range in {_short(value)}")
    return host, port


def _sni_address(target: str) -> tuple[str, int]:
    rest = target[len("tls://") :] if target.startswith("tls://") else target
    try:
        return parse_host_port(rest)
    except RouteError as exc:
        raise RouteError(f"SNI target must be tls://host:port or host:port: {exc}") from None


def _check_http_target(target: str) -> None:
    try:
        parts = urlsplit(target)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        raise RouteError(f"PATH target is not a valid URL: {_short(target)}") from None
    if parts.scheme not in ("http", "https"):
        raise RouteError(f"PATH target scheme must be http or https: {_short(target)}")
    if not parts.hostname:
        raise RouteError(f"PATH target has no host: {_short(target)}")


@dataclass(frozen=True, slots=True)
class Route:
    """One route. Constructing it validates it; ``target`` is ``None`` only for deletes."""

    kind: RouteKind
    key: str
    target: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RouteError(f"unknown route kind {_short(self.kind)} (expected SNI or PATH)")
        field = _KEY_FIELD[self.kind]
        if not isinstance(self.key, str) or not self.key:
            raise RouteError(f"{self.kind} route needs a non-empty string `{field}`")
        if len(self.key) > _MAX_KEY:
            raise RouteError(f"{self.kind} route `{field}` is too long")
        if self.kind == "PATH" and not self.key.startswith("/"):
            raise RouteError(f"PATH route `path` must start with '/': {_short(self.key)}")
        if self.target is None:
            return
        if not isinstance(self.target, str) or not self.target:
            raise RouteError(f"{self.kind} route `target` must be a non-empty string")
        if len(self.target) > _MAX_TARGET:
            raise RouteError(f"{self.kind} route `target` is too long")
        if self.kind == "SNI":
            _sni_address(self.target)
        else:
            _check_http_target(self.target)

    @property
    def identity(self) -> tuple[RouteKind, str]:
        return (self.kind, self.key)

    def sni_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of an SNI route's target (``tls://`` stripped), else ``None``."""
        if self.kind != "SNI" or self.target is None:
            return None
        return _sni_address(self.target)

    @classmethod
    def from_json(cls, obj: Any, *, with_target: bool = True) -> Route:
        """Validate a wire route object. ``with_target=False`` reads a DELETE's route.

        Unknown extra keys are ignored (forward compatibility); wrong types, a missing
        key field, an unknown kind or a bad target raise :class:`RouteError`.
        """
        if not isinstance(obj, Mapping):
            raise RouteError(f"route must be a JSON object, got {type(obj).__name__}")
        kind = obj.get("kind")
        if kind not in KINDS:
            raise RouteError(f"unknown route kind {_short(kind)} (expected SNI or PATH)")
        field = _KEY_FIELD[kind]
        if field not in obj:
            raise RouteError(f"{kind} route is missing `{field}`")
        key = obj[field]
        if not isinstance(key, str):
            raise RouteError(f"{kind} route `{field}` must be a string")
        target: str | None = None
        if with_target:
            if "target" not in obj:
                raise RouteError(f"{kind} route is missing `target`")
            target = obj["target"]
            if not isinstance(target, str):
                raise RouteError(f"{kind} route `target` must be a string")
        return cls(cast(RouteKind, kind), key, target)

    def to_json(self) -> dict[str, str]:
        """Exactly the wire shape; a route without target (a delete) has no ``target``."""
        out = {"kind": self.kind, _KEY_FIELD[self.kind]: self.key}
        if self.target is not None:
            out["target"] = self.target
        return out

    def without_target(self) -> Route:
        return Route(self.kind, self.key, None)


EventType = Literal["PUT", "DELETE"]


@dataclass(frozen=True, slots=True)
class RouteEvent:
    """One entry of the feed's event log: ``{"id": int, "type": "PUT"|"DELETE", "route": ...}``."""

    id: int
    type: EventType
    route: Route

    @classmethod
    def from_json(cls, obj: Any) -> RouteEvent:
        if not isinstance(obj, Mapping):
            raise RouteError(f"event must be a JSON object, got {type(obj).__name__}")
        event_id = obj.get("id")
        if not isinstance(event_id, int) or isinstance(event_id, bool):
            raise RouteError(f"event `id` must be an integer, got {_short(event_id)}")
        event_type = obj.get("type")
        if event_type == "PUT":
            route = Route.from_json(obj.get("route"), with_target=True)
        elif event_type == "DELETE":
            route = Route.from_json(obj.get("route"), with_target=False)
        else:
            raise RouteError(f"unknown event type {_short(event_type)} (expected PUT or DELETE)")
        return cls(event_id, event_type, route)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "route": self.route.to_json()}


class RouteTable:
    """The current routes, keyed by ``(kind, key)``, with a change ``version``."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes: dict[tuple[str, str], Route] = {}
        self._sni: dict[str, tuple[str, int]] = {}
        self._version = 0
        self._changed = trio.Event()
        for route in routes:
            self._store(route)

    # -- reading ---------------------------------------------------------------------
    @property
    def version(self) -> int:
        return self._version

    def get(self, kind: str, key: str) -> Route | None:
        return self._routes.get((kind, key))

    def routes(self, kind: str | None = None) -> list[Route]:
        if kind is None:
            return list(self._routes.values())
        return [r for r in self._routes.values() if r.kind == kind]

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return len(self._routes)
        return sum(1 for r in self._routes.values() if r.kind == kind)

    def sni_target(self, name: str) -> tuple[str, int] | None:
        """``(host, port)`` for cluster ``name`` (parsed once, at put time), or ``None``."""
        return self._sni.get(name)

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, identity: object) -> bool:
        return identity in self._routes

    # -- changing --------------------------------------------------------------------
    def put(self, route: Route) -> bool:
        """Add or replace a route. Returns whether the table changed."""
        if route.target is None:
            raise RouteError(f"cannot put a {route.kind} route without a target")
        if self._routes.get(route.identity) == route:
            return False
        self._store(route)
        self._bump()
        return True

    def delete(self, kind: str, key: str) -> Route | None:
        """Remove a route; returns the removed route, or ``None`` if it was absent."""
        removed = self._routes.pop((kind, key), None)
        if removed is None:
            return None
        if kind == "SNI":
            self._sni.pop(key, None)
        self._bump()
        return removed

    def replace_all(self, routes: Iterable[Route]) -> bool:
        """Make the table exactly ``routes`` (later duplicates win). Returns whether it changed."""
        new: dict[tuple[str, str], Route] = {}
        for route in routes:
            if route.target is None:
                raise RouteError(f"cannot put a {route.kind} route without a target")
            new[route.identity] = route
        if new == self._routes:
            return False
        self._routes = {}
        self._sni = {}
        for route in new.values():
            self._store(route)
        self._bump()
        return True

    async def wait_changed(self, since_version: int) -> int:
        """Wait until ``version > since_version``; returns the new version."""
        while self._version <= since_version:
            await self._changed.wait()
        return self._version

    # -- internals -------------------------------------------------------------------
    def _store(self, route: Route) -> None:
        self._routes[route.identity] = route
        if route.kind == "SNI":
            address = route.sni_address()
            assert address is not None
            self._sni[route.key] = address

    def _bump(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()
