"""JupyterHub authentication (spec §2.2): a hub API token identifies the caller.

Theory of operation
-------------------
The official client sends ``Authorization: jupyterhub <token>`` after a 401. We ask the hub
who owns that token:

* default mode (hub >= 2.0, upstream 2025.4+): ``GET {api_url}/user`` with
  ``Authorization: token <the USER's token>``; the answer also lists the token's
  ``scopes``;
* legacy mode (older hubs, upstream <= 2024.1): ``GET {api_url}/authorizations/token/<token>``
  authenticated with the gateway's own service token. The answer describes the owner, not
  the token, so the service-access scope check cannot be made in this mode.

The answer (a JSON user or service model) becomes a :class:`~dask_gateway_api.auth.User`
(:func:`user_from_hub_model`): ``name``, or ``<kind>:<name>`` when ``kind`` is not
``"user"`` or the name contains ``:`` (so a service can never pose as a user); ``groups``
and ``admin`` from the model. With a service name configured the token must carry
``access:services`` or ``access:services!service=<name>``, else the caller is refused (401).

Hub status → our answer (:func:`classify_hub_status`):

==========================  ==========================  ===================================
hub answer                  default mode (user token)   legacy mode (gateway's token)
==========================  ==========================  ===================================
2xx + valid JSON model      the user                    the user
401 / 403 / 404             401 (token not valid)       404 → 401; 401/403 → 500
                                                        "Permission failure ..."
>= 500, unreachable, slow,  502 "Upstream failure       502 "Upstream failure ..."
malformed answer            verifying user's ..."
anything else               500 "Failure verifying      500 "Failure verifying ..."
                            user's JupyterHub API
                            token"
==========================  ==========================  ===================================

Deviation from upstream, on purpose: upstream maps a hub 403 to 500 in both modes, a
leftover of the legacy flow where 403 meant the *gateway's* token lacked permission. With
the ``/user`` flow a current hub answers 403 for an unknown or expired *user* token, so
upstream turns every bad token into a 500; here it is the 401 the client expects.

Results -- users and refusals, never hub failures -- are cached for ``cache_ttl`` seconds
(default 60) in a bounded LRU keyed by the SHA-256 of the token, so a busy notebook does
not hammer the hub; concurrent requests with the same uncached token share one hub call.
A revoked token therefore keeps working for at most ``cache_ttl`` seconds (plus the cookie
cache of :class:`~dask_gateway_api.auth.UserAuth`). Tokens never appear in logs: only a
short fingerprint (the first 8 hex digits of the hash) does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import h11
import trio

from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import HTTPClient, Request
from dask_gateway_common.tokens import parse_authorization

from .auth import Authenticator, User

__all__ = [
    "FAILURE",
    "HubAnswerError",
    "HubAuthConfig",
    "JupyterHubAuthenticator",
    "PERMISSION_FAILURE",
    "TTLCache",
    "UPSTREAM_FAILURE",
    "classify_hub_status",
    "hub_token_from_header",
    "token_fingerprint",
    "usable_token",
    "user_from_hub_model",
]

log = logging.getLogger("dask_gateway.api.auth")

SCHEME = "jupyterhub"
PERMISSION_FAILURE = "Permission failure verifying user's JupyterHub API token"
UPSTREAM_FAILURE = "Upstream failure verifying user's JupyterHub API token"
FAILURE = "Failure verifying user's JupyterHub API token"

#: Longer tokens are refused without asking the hub (hub tokens are 32 hex digits).
MAX_TOKEN_LENGTH = 4096
#: The most we read of a hub answer.
MAX_ANSWER_BYTES = 1024 * 1024


# --- pure parts -------------------------------------------------------------------------


def hub_token_from_header(value: str | None) -> str | None:
    """The token of ``Authorization: jupyterhub <token>``, or ``None``. Never raises.

    The scheme is matched case-insensitively. Tokens with whitespace, control or non-ASCII
    characters, or longer than :data:`MAX_TOKEN_LENGTH`, are refused here: they cannot be
    valid and must not be copied into a header toward the hub.
    """
    parsed = parse_authorization(value)
    if parsed is None or parsed[0] != SCHEME:
        return None
    token = parsed[1]
    return token if usable_token(token) else None


def usable_token(token: str) -> bool:
    """Whether ``token`` can be a hub token: 1..MAX_TOKEN_LENGTH printable ASCII characters
    without whitespace (anything else cannot be valid, and must not be sent in a header)."""
    return (
        0 < len(token) <= MAX_TOKEN_LENGTH
        and token.isascii()
        and token.isprintable()
        and not any(c.isspace() for c in token)
    )


def token_fingerprint(token: str) -> str:
    """The cache key of a token: its SHA-256 in hex (never the token itself)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class HubAnswerError(ValueError):
    """The hub's 2xx answer is not a usable user or service model."""


def user_from_hub_model(
    model: Any, *, service_name: str = "", check_scopes: bool = False
) -> User | None:
    """The gateway user for a hub model, ``None`` when the scope check refuses it.

    Raises :class:`HubAnswerError` when the model is malformed (not an object, no string
    ``name``, a non-list ``groups``...).
    """
    if not isinstance(model, Mapping):
        raise HubAnswerError(f"expected a JSON object, got {type(model).__name__}")
    name = model.get("name")
    if not isinstance(name, str) or not name:
        raise HubAnswerError("no user name in the answer")
    kind = model.get("kind", "user")
    if not isinstance(kind, str) or not kind:
        raise HubAnswerError("'kind' is not a string")
    if kind != "user" or ":" in name:
        name = f"{kind}:{name}"
    groups = model.get("groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise HubAnswerError("'groups' is not a list of strings")
    admin = model.get("admin", False)
    if not isinstance(admin, bool):
        raise HubAnswerError("'admin' is not a boolean")
    if check_scopes:
        scopes = model.get("scopes") or []
        if not isinstance(scopes, list):
            raise HubAnswerError("'scopes' is not a list")
        wanted = {"access:services", f"access:services!service={service_name}"}
        if wanted.isdisjoint(s for s in scopes if isinstance(s, str)):
            return None
    return User(name=name, groups=frozenset(groups), admin=admin)


@dataclass(frozen=True)
class HubVerdict:
    """What a hub status means: ``ok`` (parse the body), ``refused`` (401), or an error."""

    ok: bool = False
    refused: bool = False
    error: GatewayError | None = None


def classify_hub_status(status: int, *, legacy: bool = False) -> HubVerdict:
    """Map the hub's status to our outcome (table in the module docstring)."""
    if 200 <= status < 300:
        return HubVerdict(ok=True)
    if status == 404 or (status in (401, 403) and not legacy):
        return HubVerdict(refused=True)
    if status in (401, 403):
        return HubVerdict(error=GatewayError(PERMISSION_FAILURE, status=500))
    if status >= 500:
        return HubVerdict(error=GatewayError(UPSTREAM_FAILURE, status=502))
    return HubVerdict(error=GatewayError(FAILURE, status=500))


K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """A bounded LRU whose entries expire ``ttl`` seconds after they were stored.

    Pure (the clock is injectable). ``ttl <= 0`` disables it: nothing is ever stored.
    """

    def __init__(
        self, ttl: float, max_size: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_size < 1:
            raise ValueError("cache size must be at least 1")
        self.ttl = ttl
        self.max_size = max_size
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> tuple[bool, V | None]:
        """``(True, value)`` for a live entry (marked recently used), else ``(False, None)``."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        stored, value = entry
        if self._clock() - stored >= self.ttl:
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, value

    def put(self, key: K, value: V) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (self._clock(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)


# --- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class HubAuthConfig:
    """Everything the authenticator needs (built from ``AuthSettings`` by ``main``).

    ``use_service_access_scopes=None`` means: check scopes iff a service name is set and
    the mode is not legacy (which cannot check them).
    """

    api_url: str
    service_name: str = ""
    use_service_access_scopes: bool | None = None
    legacy_api: bool = False
    api_token: str | None = field(default=None, repr=False)
    cache_ttl: float = 60.0
    cache_size: int = 1024
    timeout: float = 10.0

    @property
    def check_scopes(self) -> bool:
        if self.use_service_access_scopes is not None:
            return self.use_service_access_scopes
        return bool(self.service_name) and not self.legacy_api

    def problems(self) -> list[str]:
        """Contradictions in this configuration (empty when usable)."""
        out = []
        if self.legacy_api and not self.api_token:
            out.append(
                "auth.jupyterhub_legacy_api needs the gateway's own hub token "
                "(auth.jupyterhub_api_token or JUPYTERHUB_API_TOKEN)"
            )
        if self.legacy_api and self.use_service_access_scopes:
            out.append(
                "auth.jupyterhub_use_service_access_scopes cannot be enforced with "
                "auth.jupyterhub_legacy_api (the legacy hub API does not report token scopes)"
            )
        if self.check_scopes and not self.service_name:
            out.append(
                "auth.jupyterhub_use_service_access_scopes needs "
                "auth.jupyterhub_service_name (or JUPYTERHUB_SERVICE_NAME)"
            )
        if self.api_token is not None and not usable_token(self.api_token):
            out.append("auth.jupyterhub_api_token: must be printable ASCII without whitespace")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            out.append("auth.jupyterhub_timeout: must be > 0")
        return out


# --- the I/O shell ----------------------------------------------------------------------


class JupyterHubAuthenticator(Authenticator):
    """Asks the hub who owns the token (see the module docstring)."""

    scheme = "jupyterhub"

    def __init__(
        self,
        config: HubAuthConfig,
        *,
        ssl_context: ssl.SSLContext | None = None,
        http: HTTPClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self._api_url = config.api_url.rstrip("/")
        self._owns_http = http is None
        self._http = http if http is not None else HTTPClient(ssl_context=ssl_context)
        self.cache: TTLCache[str, User | None] = TTLCache(
            config.cache_ttl, config.cache_size, clock=clock
        )
        self._inflight: dict[str, _Flight] = {}
        #: Requests that went to the hub (for tests and measurements).
        self.hub_requests = 0
        if config.legacy_api:
            log.warning("JupyterHub auth: legacy token API, service access scopes not checked")
        elif not config.check_scopes:
            log.warning(
                "JupyterHub auth: no service name set, so any valid hub token may use the "
                "gateway; set auth.jupyterhub_service_name to require the service access scope"
            )

    async def authenticate(self, request: Request) -> User | None:
        token = hub_token_from_header(request.headers.get("Authorization"))
        if token is None:
            return None
        key = token_fingerprint(token)
        while True:
            found, user = self.cache.get(key)
            if found:
                return user
            flight = self._inflight.get(key)
            if flight is None:
                break
            # The same token is being checked right now: share that answer.
            await flight.done.wait()
            if flight.error is not None:
                raise GatewayError(flight.error.message, status=flight.error.status)
            if flight.finished:
                return flight.user
            # The checking request was cancelled: look again (maybe check it ourselves).
        flight = _Flight()
        self._inflight[key] = flight
        try:
            flight.user = await self._ask_hub(token, key[:8])
            flight.finished = True
            self.cache.put(key, flight.user)
            return flight.user
        except GatewayError as exc:
            flight.error = exc
            raise
        finally:
            del self._inflight[key]
            flight.done.set()

    async def _ask_hub(self, token: str, fingerprint: str) -> User | None:
        config = self.config
        if config.legacy_api:
            quoted = urllib.parse.quote(token, safe="")
            url = f"{self._api_url}/authorizations/token/{quoted}"
            credential = config.api_token or ""
        else:
            url = f"{self._api_url}/user"
            credential = token
        headers = [("Authorization", f"token {credential}"), ("Accept", "application/json")]
        self.hub_requests += 1
        try:
            response = await self._http.fetch(
                "GET",
                url,
                headers=headers,
                timeout=config.timeout,
                max_body_bytes=MAX_ANSWER_BYTES,
            )
        except (
            OSError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
            GatewayError,
        ) as exc:
            log.error(
                "%s (token %s): hub at %s unreachable: %s",
                UPSTREAM_FAILURE,
                fingerprint,
                self._api_url,
                _describe(exc),
            )
            raise GatewayError(UPSTREAM_FAILURE, status=502) from None
        verdict = classify_hub_status(response.status, legacy=config.legacy_api)
        if verdict.error is not None:
            log.error(
                "%s (token %s): hub answered %d %s",
                verdict.error.message,
                fingerprint,
                response.status,
                response.reason,
            )
            raise verdict.error
        if verdict.refused:
            log.debug("hub refused token %s (%d)", fingerprint, response.status)
            return None
        try:
            model = json.loads(response.body)
            user = user_from_hub_model(
                model, service_name=config.service_name, check_scopes=config.check_scopes
            )
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            log.error("%s (token %s): malformed hub answer: %s", UPSTREAM_FAILURE, fingerprint, exc)
            raise GatewayError(UPSTREAM_FAILURE, status=502) from None
        if user is None:
            log.info(
                "hub token %s lacks the access:services scope for service %r",
                fingerprint,
                config.service_name,
            )
        return user

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()


@dataclass
class _Flight:
    """One hub check in progress, shared by concurrent requests with the same token."""

    done: trio.Event = field(default_factory=trio.Event)
    finished: bool = False
    user: User | None = None
    error: GatewayError | None = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, h11.LocalProtocolError):
        return "the request could not be encoded"  # (h11's message would show the header)
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause):
        text += f" ({cause})"
    return text
