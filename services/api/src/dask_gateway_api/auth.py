"""Who is calling: user authentication (spec §2) and cluster-token authentication.

Theory of operation
-------------------
User-authenticated endpoints go through :class:`UserAuth` (the flow of spec §2.2):

1. A cookie named ``cookie_name`` whose value is in the :class:`CookieCache` and younger
   than ``max_age`` (monotonic clock, measured from first issue, never refreshed on use)
   authenticates the request. Nothing is added to the response.
2. Otherwise the :class:`Authenticator` runs. ``None`` → 401 ``Authentication required``
   with ``WWW-Authenticate: <scheme>`` (the official client retries once with credentials
   only after a 401, so this must be 401, never 403).
3. After the handler *succeeded*, and only on that path, :meth:`UserAuth.finish` lets the
   authenticator decorate the response (``pre_response``: Kerberos adds its mutual-auth
   token) and adds ``Set-Cookie: <name>=<value>; Max-Age=<2*max_age>; Path=/``. One cookie
   value per user name is reused until it expires.

The cookie name defaults to ``dask-gateway-<uuid4 hex>``, new for each process start, so a
restarted API silently invalidates old cookies (the client just re-authenticates).

Cluster tokens (``Authorization: token <t>``) authenticate the scheduler preload on the
heartbeat (E10) and may replace the user on delete (E7); they are matched against the one
cluster named in the path, in constant time.

Everything that parses a header here is total: malformed input means "not authenticated",
never an exception.
"""

from __future__ import annotations

import abc
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import Request, Response
from dask_gateway_common.tokens import (
    check_token_header,
    decode_basic,
    parse_authorization,
    tokens_equal,
)

__all__ = [
    "AuthResult",
    "Authenticator",
    "CookieCache",
    "SimpleAuthenticator",
    "User",
    "UserAuth",
    "cluster_token_matches",
    "parse_cookies",
    "token_required",
]

DEFAULT_CACHE_MAX_AGE = 300.0


@dataclass(frozen=True)
class User:
    """An authenticated user. Permission rule everywhere: ``user.name == cluster.username``."""

    name: str
    groups: frozenset[str] = field(default_factory=frozenset)
    admin: bool = False


class Authenticator(abc.ABC):
    """Turns a request's credentials into a :class:`User`.

    ``scheme`` is what a 401 advertises in ``WWW-Authenticate``. Implementations return
    ``None`` for missing or wrong credentials and raise ``GatewayError`` only for failures
    that are not the caller's fault (e.g. 502 when an identity provider is down).
    """

    scheme: str = ""

    @abc.abstractmethod
    async def authenticate(self, request: Request) -> User | None:
        """The user the request's credentials prove, or ``None``."""

    def pre_response(self, request: Request, user: User, response: Response) -> None:  # noqa: B027
        """Decorate a successful response of a freshly authenticated request (optional)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources (HTTP clients to identity providers...)."""


class SimpleAuthenticator(Authenticator):
    """HTTP Basic: user = part before the first ``:``; an optional shared password.

    With ``password=None`` any password is accepted (upstream's default). Otherwise the
    password must equal it (constant-time compare). Empty user names are refused.
    """

    scheme = "Basic"

    def __init__(self, password: str | None = None) -> None:
        self._password = password

    async def authenticate(self, request: Request) -> User | None:
        parsed = parse_authorization(request.headers.get("Authorization"))
        if parsed is None or parsed[0] != "basic":
            return None
        decoded = decode_basic(parsed[1])
        if decoded is None:
            return None
        name, password = decoded
        if not name:
            return None
        if self._password is not None and not tokens_equal(password, self._password):
            return None
        return User(name=name)


def parse_cookies(header_values: list[str]) -> dict[str, str]:
    """Name → value from ``Cookie`` header values (first occurrence wins). Never raises."""
    cookies: dict[str, str] = {}
    for header in header_values:
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name:
                cookies.setdefault(name.strip(), value.strip().strip('"'))
    return cookies


class CookieCache:
    """In-memory cookie value → user cache (pure; the clock is injectable for tests)."""

    def __init__(
        self,
        max_age: float = DEFAULT_CACHE_MAX_AGE,
        *,
        cookie_name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age <= 0:
            raise ValueError("cache max age must be positive")
        self.max_age = max_age
        self.cookie_name = cookie_name or f"dask-gateway-{uuid.uuid4().hex}"
        self._clock = clock
        self._by_value: dict[str, tuple[User, float]] = {}
        self._by_user: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._by_value)

    def lookup(self, request: Request) -> User | None:
        """The user of the request's cookie if it is known and not expired."""
        value = parse_cookies(request.headers.get_all("Cookie")).get(self.cookie_name)
        if not value:
            return None
        entry = self._by_value.get(value)
        if entry is None:
            return None
        user, issued = entry
        if self._clock() - issued >= self.max_age:
            self._drop(value)
            return None
        return user

    def issue(self, user: User) -> str:
        """The cookie value for ``user``: the existing one if still valid, else a new one."""
        now = self._clock()
        self._purge(now)
        value = self._by_user.get(user.name)
        if value is not None:
            _, issued = self._by_value[value]
            self._by_value[value] = (user, issued)  # keep the latest groups/admin
            return value
        value = uuid.uuid4().hex
        self._by_value[value] = (user, now)
        self._by_user[user.name] = value
        return value

    def set_cookie_header(self, value: str) -> tuple[str, str]:
        max_age = int(2 * self.max_age)
        return ("Set-Cookie", f"{self.cookie_name}={value}; Max-Age={max_age}; Path=/")

    def _drop(self, value: str) -> None:
        entry = self._by_value.pop(value, None)
        if entry is not None and self._by_user.get(entry[0].name) == value:
            del self._by_user[entry[0].name]

    def _purge(self, now: float) -> None:
        expired = [v for v, (_, t) in self._by_value.items() if now - t >= self.max_age]
        for value in expired:
            self._drop(value)


@dataclass(frozen=True)
class AuthResult:
    """Who the caller is, and whether they came through the authenticator (not a cookie)."""

    user: User
    fresh: bool


class UserAuth:
    """The user-authentication flow of spec §2.2: cookie cache, then the authenticator."""

    def __init__(self, authenticator: Authenticator, cache: CookieCache) -> None:
        self.authenticator = authenticator
        self.cache = cache

    async def authenticate(self, request: Request) -> AuthResult:
        """Authenticate or raise a 401 ``GatewayError`` advertising the scheme."""
        user = self.cache.lookup(request)
        if user is not None:
            return AuthResult(user, fresh=False)
        user = await self.authenticator.authenticate(request)
        if user is None:
            raise GatewayError(
                "Authentication required",
                status=401,
                headers=[("WWW-Authenticate", self.authenticator.scheme)],
            )
        return AuthResult(user, fresh=True)

    def finish(self, request: Request, result: AuthResult, response: Response) -> Response:
        """Add the authenticator's headers and the cookie to a successful fresh response."""
        if result.fresh:
            self.authenticator.pre_response(request, result.user, response)
            value = self.cache.issue(result.user)
            response.headers.append(self.cache.set_cookie_header(value))
        return response


def cluster_token_matches(request: Request, token: str | None) -> bool:
    """Whether the request carries ``Authorization: token <token>`` for this cluster."""
    if not token:
        return False
    return check_token_header(request.headers.get("Authorization"), token)


def token_required() -> GatewayError:
    """The 401 of token-only endpoints (E10)."""
    return GatewayError(
        "Authentication required", status=401, headers=[("WWW-Authenticate", "token")]
    )
