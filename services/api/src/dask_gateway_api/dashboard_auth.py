"""Dashboards only for their owner: the access check the web proxy asks, and the hub's
OAuth login for browsers.

Theory of operation
-------------------
The web proxy never holds user secrets. Before it forwards a request into a dashboard
(``<prefix>/clusters/<name>/...``) it asks us, ``GET <prefix>/api/v1/clusters/<name>/access``,
authenticated with the proxy token and carrying the browser's credentials in dedicated
headers (:data:`FORWARDED_AUTHORIZATION`, :data:`FORWARDED_COOKIE`; the request path for a
login redirect in :data:`FORWARDED_NEXT`). We put those credentials back where the normal
user authentication looks (``Authorization``, ``Cookie``) and answer by the table below
(:func:`pre_verdict`, :func:`user_verdict`):

==============================  ========================================================
situation                       answer
==============================  ========================================================
no / wrong proxy token          401 ``WWW-Authenticate: token``
unknown or inactive cluster     404, whoever asks (before any authentication)
``dashboards.auth: none``       204 for anyone (upstream's open dashboards)
no valid user credentials       401 + the native challenge (``Basic realm=...``,
                                ``Negotiate``, ``jupyterhub``); with the hub OAuth
                                client configured and a navigable request, 302 to
                                ``<prefix>/api/oauth_login?next=<the dashboard path>``
authenticated, not the owner    403
the owner                       204, plus (fresh authentication only) the auth cookie
                                and the Kerberos mutual-auth token for the proxy to relay
==============================  ========================================================

An authenticator failure that is not the caller's fault (hub down: 502) propagates; the
proxy turns anything but 204/302/401/403/404 into 502.

JupyterHub OAuth (the gateway as the hub's OAuth client ``service-<name>``):
``oauth_login`` validates ``next`` (a same-origin path under the prefix, see
:func:`safe_next`), signs ``(nonce, next, expiry)`` into the ``state`` parameter (HMAC with
a per-process key; :func:`make_state`), puts the nonce in a short-lived ``HttpOnly`` cookie
scoped to the callback path, and redirects to the hub's authorize URL. ``oauth_callback``
checks the signature, the expiry and that the cookie's nonce matches (so a login cannot be
planted in another browser), exchanges the code at the hub's token URL (client id + the
service's API token as secret), asks ``/user`` with the access token, applies the same
identity and scope rules as the JupyterHub authenticator, issues the gateway's usual auth
cookie (the same cookie cache as every API request) and redirects to ``next``. The hub's
access token is neither stored nor logged.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import h11
import trio

from dask_gateway_common.errors import GatewayError
from dask_gateway_common.http import Headers, HTTPClient, Request, Response
from dask_gateway_common.tokens import check_token_header

from .auth import User, UserAuth, parse_cookies, token_required
from .auth_jupyterhub import HubAnswerError, usable_token, user_from_hub_model
from .config import DASHBOARD_MODES, Settings
from .models import ACTIVE_STATUSES, Cluster

__all__ = [
    "DASHBOARD_MODES",
    "FORWARDED_AUTHORIZATION",
    "FORWARDED_COOKIE",
    "FORWARDED_NEXT",
    "STATE_COOKIE",
    "DashboardAuth",
    "OAuthClientConfig",
    "Verdict",
    "authorize_url",
    "challenge",
    "forwarded_credentials",
    "make_state",
    "oauth_from_settings",
    "open_state",
    "pre_verdict",
    "safe_next",
    "user_verdict",
]

log = logging.getLogger("dask_gateway.api.dashboards")

FORWARDED_AUTHORIZATION = "X-Dask-Gateway-Authorization"
FORWARDED_COOKIE = "X-Dask-Gateway-Cookie"
FORWARDED_NEXT = "X-Dask-Gateway-Next"
STATE_COOKIE = "dask-gateway-oauth-state"
#: How long a browser may take between oauth_login and the callback (seconds).
STATE_MAX_AGE = 600
MAX_NEXT_LENGTH = 2048
MAX_HUB_ANSWER = 1024 * 1024
REALM = "dask-gateway"

UPSTREAM_FAILURE = "Upstream failure during the JupyterHub OAuth login"


# --- the decision table (pure) ----------------------------------------------------------


class Verdict(enum.Enum):
    ALLOW = 204
    CHALLENGE = 401
    FORBIDDEN = 403
    NOT_FOUND = 404


def pre_verdict(*, owner: str | None, mode: str) -> Verdict | None:
    """The verdict that needs no user (``None``: authenticate the caller first).

    ``owner`` is the user name of the *active* cluster, ``None`` when there is none, so an
    unknown cluster is 404 whatever the credentials.
    """
    if owner is None:
        return Verdict.NOT_FOUND
    if mode == "none":
        return Verdict.ALLOW
    return None


def user_verdict(owner: str, user: User | None) -> Verdict:
    """Owner → allow; another authenticated user → 403; nobody → the challenge."""
    if user is None:
        return Verdict.CHALLENGE
    return Verdict.ALLOW if user.name == owner else Verdict.FORBIDDEN


def challenge(scheme: str) -> str:
    """The ``WWW-Authenticate`` value a browser understands for the authenticator's scheme.

    Browsers only prompt for Basic with a realm (RFC 7617 requires it); other schemes are
    sent as the API sends them.
    """
    if scheme.lower() == "basic":
        return f'Basic realm="{REALM}", charset="UTF-8"'
    return scheme


def forwarded_credentials(headers: Headers) -> list[tuple[str, str]]:
    """The user's ``Authorization`` and ``Cookie`` headers, from the proxy's forwarding
    headers (the proxy's own ``Authorization`` is not among them)."""
    out = []
    authorization = headers.get(FORWARDED_AUTHORIZATION)
    if authorization:
        out.append(("Authorization", authorization))
    cookie = headers.get(FORWARDED_COOKIE)
    if cookie:
        out.append(("Cookie", cookie))
    return out


def _unsafe_segment(segment: str) -> bool:
    decoded = urllib.parse.unquote(segment)
    return decoded in (".", "..") or "/" in decoded or "\\" in decoded


def safe_next(value: str | None, prefix: str) -> str | None:
    """``value`` if it is a same-origin path under ``prefix`` (else ``None``).

    Refused: anything not starting with exactly one ``/`` (``//host``, ``http://...``),
    backslashes, whitespace or control or non-ASCII characters, dot segments (also
    percent-encoded), encoded slashes, and paths outside ``<prefix>/``. No open redirect.
    """
    if not value or len(value) > MAX_NEXT_LENGTH:
        return None
    if not (value.isascii() and value.isprintable()) or any(c.isspace() for c in value):
        return None
    if not value.startswith("/") or value.startswith("//") or "\\" in value:
        return None
    path = value.split("?", 1)[0].split("#", 1)[0]
    if any(_unsafe_segment(s) for s in path.split("/")):
        return None
    if prefix and not (path == prefix or path.startswith(prefix + "/")):
        return None
    return value


# --- OAuth state (pure) -----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_state(
    key: bytes, next_url: str, now: float, *, nonce: str | None = None
) -> tuple[str, str]:
    """``(state, nonce)``: ``state`` carries ``next`` and an expiry, signed with ``key``;
    the nonce goes into the browser's state cookie."""
    nonce = nonce or secrets.token_urlsafe(16)
    payload = json.dumps(
        {"n": nonce, "next": next_url, "exp": int(now) + STATE_MAX_AGE}, separators=(",", ":")
    ).encode()
    mac = hmac.new(key, payload, hashlib.sha256).digest()
    return f"{_b64(payload)}.{_b64(mac)}", nonce


def open_state(key: bytes, state: str | None, nonce: str | None, now: float) -> str | None:
    """The ``next`` path of a valid, unexpired ``state`` matching ``nonce``; else ``None``.

    Never raises: any malformed part means "invalid".
    """
    if not state or not nonce or len(state) > 4 * MAX_NEXT_LENGTH:
        return None
    payload_text, sep, mac_text = state.partition(".")
    if not sep:
        return None
    try:
        payload = _unb64(payload_text)
        mac = _unb64(mac_text)
    except (binascii.Error, ValueError):
        return None
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        return None
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    expected, next_url, expiry = data.get("n"), data.get("next"), data.get("exp")
    if not isinstance(expected, str) or not isinstance(next_url, str):
        return None
    if not isinstance(expiry, int) or now > expiry:
        return None
    if not hmac.compare_digest(expected.encode(), nonce.encode("utf-8", "replace")):
        return None
    return next_url


# --- the hub OAuth client ---------------------------------------------------------------


@dataclass(frozen=True)
class OAuthClientConfig:
    """The gateway as the hub's OAuth client.

    ``authorize_url`` is what browsers open (the hub's public address, or a path on the
    gateway's origin when both sit behind the hub's proxy); ``token_url`` and ``user_url``
    are called by the API (the hub's internal address).
    """

    client_id: str
    client_secret: str = field(repr=False)
    redirect_uri: str
    authorize_url: str
    token_url: str
    user_url: str
    service_name: str = ""
    check_scopes: bool = False
    timeout: float = 10.0


def oauth_from_settings(settings: Settings) -> OAuthClientConfig | None:
    """The hub OAuth client of these settings, ``None`` when it is off or incomplete.

    Defaults: client id ``service-<auth.jupyterhub_service_name>`` (JupyterHub's own default
    for a service), secret ``auth.jupyterhub_api_token``, redirect URI
    ``<public_url><prefix>/api/oauth_callback``, authorize URL
    ``<auth.jupyterhub_api_url>/oauth2/authorize``; token and user URLs under the hub API.
    """
    auth, dashboards = settings.auth, settings.dashboards
    if auth.type != "jupyterhub" or dashboards.jupyterhub_oauth is False:
        return None
    service = auth.jupyterhub_service_name
    client_id = dashboards.oauth_client_id or (f"service-{service}" if service else None)
    secret = auth.jupyterhub_api_token
    api = (auth.jupyterhub_api_url or "").rstrip("/")
    if not (client_id and secret and api):
        return None
    check = auth.jupyterhub_use_service_access_scopes
    return OAuthClientConfig(
        client_id=client_id,
        client_secret=secret,
        redirect_uri=dashboards.oauth_redirect_uri
        or f"{settings.public_url}{settings.prefix}/api/oauth_callback",
        authorize_url=dashboards.oauth_authorize_url or f"{api}/oauth2/authorize",
        token_url=f"{api}/oauth2/token",
        user_url=f"{api}/user",
        service_name=service,
        check_scopes=bool(service) if check is None else check,
        timeout=auth.jupyterhub_timeout,
    )


def authorize_url(config: OAuthClientConfig, state: str) -> str:
    """The hub URL a browser is sent to for consent (skipped with ``oauth_no_confirm``)."""
    query = urllib.parse.urlencode(
        {
            "client_id": config.client_id,
            "redirect_uri": config.redirect_uri,
            "response_type": "code",
            "state": state,
        }
    )
    sep = "&" if "?" in config.authorize_url else "?"
    return f"{config.authorize_url}{sep}{query}"


class ClusterLookup(Protocol):
    """What the check needs of the cluster manager."""

    @property
    def running(self) -> bool: ...

    def get(self, name: str) -> Cluster | None: ...


def _redirect(location: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(302, [("Location", location), *(headers or [])], b"")


class DashboardAuth:
    """The API's dashboard endpoints: ``await maybe_handle(request)`` answers the access
    check and the OAuth login/callback, and returns ``None`` for every other path."""

    def __init__(
        self,
        *,
        manager: ClusterLookup,
        auth: UserAuth,
        proxy_token: str,
        prefix: str = "",
        mode: str = "owner",
        oauth: OAuthClientConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
        http: HTTPClient | None = None,
        clock: Callable[[], float] = time.time,
        state_key: bytes | None = None,
    ) -> None:
        if mode not in DASHBOARD_MODES:
            raise ValueError(f"dashboards.auth must be one of {DASHBOARD_MODES}, got {mode!r}")
        self.manager = manager
        self.auth = auth
        self.mode = mode
        self.oauth = oauth
        self.prefix = prefix.rstrip("/")
        self._proxy_token = proxy_token
        self._clock = clock
        self._key = state_key or secrets.token_bytes(32)
        self._owns_http = http is None
        self._http = http if http is not None else HTTPClient(ssl_context=ssl_context)
        api = f"{self.prefix}/api"
        self._clusters = f"{api}/v1/clusters/"
        self._login_path = f"{api}/oauth_login"
        self._callback_path = f"{api}/oauth_callback"

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def maybe_handle(self, request: Request) -> Response | None:
        path = request.path
        if path.startswith(self._clusters) and path.endswith("/access"):
            name = path[len(self._clusters) : -len("/access")]
            if not name or "/" in name:
                return None
            self._only_get(request)
            return await self.access(request, name)
        if path == self._login_path:
            self._only_get(request)
            return self.oauth_login(request)
        if path == self._callback_path:
            self._only_get(request)
            return await self.oauth_callback(request)
        return None

    @staticmethod
    def _only_get(request: Request) -> None:
        if request.method != "GET":
            raise GatewayError("Method Not Allowed", status=405, headers=[("Allow", "GET")])

    # -- the access check --------------------------------------------------------------

    async def access(self, request: Request, name: str) -> Response:
        if not check_token_header(request.headers.get("Authorization"), self._proxy_token):
            raise token_required()
        if not self.manager.running:
            raise GatewayError("The gateway is starting or stopping", status=503)
        cluster = self.manager.get(name)
        owner = None
        if cluster is not None and cluster.status in ACTIVE_STATUSES:
            owner = cluster.username
        verdict = pre_verdict(owner=owner, mode=self.mode)
        if verdict is Verdict.NOT_FOUND:
            raise GatewayError(f"Cluster {name} not found", status=404)
        if verdict is Verdict.ALLOW:
            return Response.empty(204)
        assert owner is not None
        next_url = request.headers.get(FORWARDED_NEXT)
        # The user's credentials go where the authenticators look; the proxy token goes.
        request.headers = Headers(forwarded_credentials(request.headers))
        try:
            result = await self.auth.authenticate(request)
        except GatewayError as exc:
            if exc.status != 401:
                raise
            return self._challenge(next_url)
        verdict = user_verdict(owner, result.user)
        if verdict is Verdict.FORBIDDEN:
            raise GatewayError(
                f"User {result.user.name} lacks permissions to view the dashboard of "
                f"cluster {name}",
                status=403,
            )
        return self.auth.finish(request, result, Response.empty(204))

    def _challenge(self, next_url: str | None) -> Response:
        if self.oauth is not None:
            target = safe_next(next_url, self.prefix)
            if target is not None:
                query = urllib.parse.urlencode({"next": target})
                return _redirect(f"{self._login_path}?{query}")
        scheme = self.auth.authenticator.scheme
        return Response.error(
            401, "Authentication required", headers=[("WWW-Authenticate", challenge(scheme))]
        )

    # -- OAuth ---------------------------------------------------------------------------

    def _oauth_config(self) -> OAuthClientConfig:
        if self.oauth is None:
            raise GatewayError("Not Found", status=404)
        return self.oauth

    def _state_cookie(self, value: str, max_age: int) -> tuple[str, str]:
        secure = "; Secure" if self._oauth_config().redirect_uri.startswith("https:") else ""
        return (
            "Set-Cookie",
            f"{STATE_COOKIE}={value}; Path={self._callback_path}; Max-Age={max_age}; "
            f"HttpOnly; SameSite=Lax{secure}",
        )

    def oauth_login(self, request: Request) -> Response:
        config = self._oauth_config()
        next_url = safe_next(request.query_params.get("next"), self.prefix)
        if next_url is None:
            raise GatewayError(
                f"Invalid or missing 'next': it must be a path under {self.prefix or ''}/",
                status=400,
            )
        state, nonce = make_state(self._key, next_url, self._clock())
        return _redirect(authorize_url(config, state), [self._state_cookie(nonce, STATE_MAX_AGE)])

    async def oauth_callback(self, request: Request) -> Response:
        config = self._oauth_config()
        params = request.query_params
        if "error" in params:
            reason = "".join(c for c in params["error"][:64] if c.isalnum() or c in "_-")
            raise GatewayError(f"JupyterHub refused the login ({reason})", status=403)
        code, state = params.get("code"), params.get("state")
        if not code or not state:
            raise GatewayError("OAuth callback without 'code' and 'state'", status=400)
        nonce = parse_cookies(request.headers.get_all("Cookie")).get(STATE_COOKIE)
        next_url = open_state(self._key, state, nonce, self._clock())
        if next_url is None:
            raise GatewayError(
                "Invalid or expired OAuth state: open the dashboard link again", status=400
            )
        token = await self._exchange_code(config, code)
        user = await self._hub_user(config, token)
        value = self.auth.cache.issue(user)
        log.info("Dashboard login of %s through JupyterHub OAuth", user.name)
        return _redirect(
            next_url, [self.auth.cache.set_cookie_header(value), self._state_cookie("", 0)]
        )

    async def _hub_call(
        self, what: str, method: str, url: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, object]:
        """One request to the hub → ``(status, parsed JSON or None)``; 502 when unusable."""
        try:
            response = await self._http.fetch(
                method,
                url,
                headers=[("Accept", "application/json"), *headers],
                body=body,
                timeout=self._oauth_config().timeout,
                max_body_bytes=MAX_HUB_ANSWER,
            )
        except (
            OSError,
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
            GatewayError,
        ) as exc:
            reason = "timed out" if isinstance(exc, trio.TooSlowError) else type(exc).__name__
            log.error("%s: %s at %s: %s", UPSTREAM_FAILURE, what, url, reason)
            raise GatewayError(UPSTREAM_FAILURE, status=502) from None
        if response.status >= 500:
            log.error("%s: %s answered %d", UPSTREAM_FAILURE, what, response.status)
            raise GatewayError(UPSTREAM_FAILURE, status=502)
        try:
            parsed = json.loads(response.body) if response.body else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            parsed = None
        return response.status, parsed

    async def _exchange_code(self, config: OAuthClientConfig, code: str) -> str:
        body = urllib.parse.urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": config.redirect_uri,
                "client_id": config.client_id,
                "client_secret": config.client_secret,
            }
        ).encode()
        headers = [("Content-Type", "application/x-www-form-urlencoded")]
        status, answer = await self._hub_call(
            "token exchange", "POST", config.token_url, headers, body
        )
        if status != 200:
            log.info("JupyterHub refused an OAuth code (%d)", status)
            raise GatewayError("JupyterHub refused the OAuth code", status=403)
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not usable_token(token):
            log.error("%s: no usable access_token in the token answer", UPSTREAM_FAILURE)
            raise GatewayError(UPSTREAM_FAILURE, status=502)
        return token

    async def _hub_user(self, config: OAuthClientConfig, token: str) -> User:
        headers = [("Authorization", f"token {token}")]
        status, model = await self._hub_call("user lookup", "GET", config.user_url, headers, b"")
        if status != 200:
            log.info("JupyterHub refused the OAuth access token (%d)", status)
            raise GatewayError("JupyterHub refused the OAuth access token", status=403)
        try:
            user = user_from_hub_model(
                model, service_name=config.service_name, check_scopes=config.check_scopes
            )
        except HubAnswerError as exc:
            log.error("%s: malformed user model: %s", UPSTREAM_FAILURE, exc)
            raise GatewayError(UPSTREAM_FAILURE, status=502) from None
        if user is None:
            raise GatewayError(
                "Your JupyterHub login does not grant access to the gateway service", status=403
            )
        return user
