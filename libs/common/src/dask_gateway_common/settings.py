"""Small helpers for typed settings validated all at once.

A CLI builds its settings from defaults < file < environment < flags, and reports *every*
problem in one go rather than stopping at the first. The pattern::

    problems = Problems()
    address = problems.capture(parse_host_port, args.address, what="--address")
    token = problems.capture(read_token, token_file=args.api_token_file, env=os.environ)
    problems.check(args.api_url.startswith(("http://", "https://")), "--api-url must be ...")
    problems.raise_if_any()   # SettingsError listing them all

Parsers raise ``ValueError`` with a message fit for the operator. Messages about tokens
name where the token came from, never the token itself.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "LOG_LEVELS",
    "CommonProxySettings",
    "Problems",
    "RaisingArgumentParser",
    "SettingsError",
    "add_common_proxy_args",
    "log_level",
    "parse_host_port",
    "parse_proxy_argv",
    "parse_routes_url",
    "parse_seconds",
    "read_token",
]

P = ParamSpec("P")
T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_MAX_TOKEN_FILE_BYTES = 64 * 1024


class SettingsError(Exception):
    """Invalid configuration; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


def parse_host_port(value: str, *, what: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``, ``:PORT`` (host ``0.0.0.0``) or ``[IPv6]:PORT``.

    ``what`` names the setting in error messages (e.g. ``"--address"``).
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what}: expected HOST:PORT, got an empty value")
    text = value.strip()
    if "://" in text:
        raise ValueError(f"{what}: expected HOST:PORT, not a URL: {value!r}")
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{what}: expected [IPV6]:PORT, got {value!r}")
        host, port_text = text[1:close], text[close + 2 :]
        if not host:
            raise ValueError(f"{what}: empty IPv6 address in {value!r}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{what}: expected HOST:PORT or :PORT, got {value!r}")
        if ":" in host:
            raise ValueError(f"{what}: write IPv6 addresses in brackets, e.g. [::1]:8000")
        host = host or "0.0.0.0"
    if any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"{what}: invalid host {host!r}")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"{what}: port must be a number, got {port_text!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"{what}: port {port} out of range 0-65535")
    return host, port


def read_token(
    *,
    env_var: str = "DASK_GATEWAY_PROXY_TOKEN",
    token_file: str | None,
    env: Mapping[str, str],
) -> str:
    """Read a shared secret from ``token_file`` (wins when given) or ``env[env_var]``.

    Whitespace around the token is stripped. Errors name the source, never the value.
    """
    if token_file:
        try:
            with open(token_file, "rb") as f:
                raw = f.read(_MAX_TOKEN_FILE_BYTES + 1)
        except OSError as exc:
            raise ValueError(
                f"cannot read token file {token_file}: {exc.strerror or exc}"
            ) from None
        if len(raw) > _MAX_TOKEN_FILE_BYTES:
            raise ValueError(f"token file {token_file} is too large to hold a token")
        try:
            token = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"token file {token_file} is not UTF-8 text") from None
        source = f"token file {token_file}"
    else:
        token = (env.get(env_var) or "").strip()
        source = f"environment variable {env_var}"
        if not token:
            raise ValueError(f"no token: set {env_var} or give a token file")
    if not token:
        raise ValueError(f"{source} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"{source} holds a token with whitespace or control characters")
    return token


def log_level(value: str) -> str:
    """Validate a log level name (case-insensitive); returns it upper-cased."""
    if not isinstance(value, str) or value.strip().upper() not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.strip().upper()


class Problems:
    """Collects configuration problems so they can all be reported at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.problems)

    def add(self, message: str) -> None:
        self.problems.append(message)

    def check(self, condition: object, message: str) -> bool:
        """Record ``message`` unless ``condition`` holds; returns the condition's truth."""
        if not condition:
            self.problems.append(message)
            return False
        return True

    def capture(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        """Call ``fn``; on ``ValueError`` record its message and return ``None``."""
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            self.problems.append(str(exc))
            return None

    def raise_if_any(self) -> None:
        if self.problems:
            raise SettingsError(self.problems)


def add_common_proxy_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags both proxies share. Values are strings; validate with the helpers above."""
    # --address and --api-url are required, but checked later with every other problem
    # (argparse would stop at the first missing one).
    parser.add_argument(
        "--address",
        help="(required) HOST:PORT (or :PORT for all interfaces) to serve proxied traffic on",
    )
    parser.add_argument(
        "--api-url",
        help="(required) URL of the API's route feed, e.g. http://api:8000/api/v1/routes",
    )
    parser.add_argument(
        "--admin-address",
        default="127.0.0.1:0",
        help="HOST:PORT of the admin endpoint (/healthz, /readyz, /metrics, /routes); "
        "default %(default)s",
    )
    parser.add_argument(
        "--api-token-file",
        default=None,
        help="file holding the token for the route feed; default: the "
        "DASK_GATEWAY_PROXY_TOKEN environment variable",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        help=f"one of {', '.join(LOG_LEVELS)} (case-insensitive); default %(default)s",
    )


TOKEN_ENV = "DASK_GATEWAY_PROXY_TOKEN"
MAX_TIMEOUT = 3600.0


class RaisingArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises ``SettingsError`` instead of exiting on bad argv."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("exit_on_error", False)
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def error(self, message: str):  # type: ignore[override]
        raise SettingsError([message])


def parse_seconds(value: str, *, what: str, maximum: float = MAX_TIMEOUT) -> float:
    """A positive, finite number of seconds no larger than ``maximum``."""
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{what}: expected a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or not 0 < seconds <= maximum:
        raise ValueError(f"{what}: must be > 0 and <= {maximum:g} seconds, got {value!r}")
    return seconds


def parse_routes_url(value: str, *, what: str = "--api-url") -> str:
    """The full http(s) URL of the API's route feed (no credentials, query or fragment)."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"{what}: not a valid URL: {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{what}: expected the full routes URL, e.g. "
            f"http://127.0.0.1:8000/api/v1/routes, got {value!r}"
        )
    if port == 0:
        raise ValueError(f"{what}: port 0 is not a valid port: {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"{what}: must not carry credentials, a query or a fragment")
    return value


@dataclass(frozen=True)
class CommonProxySettings:
    """The settings both proxies share (from :func:`add_common_proxy_args`)."""

    address: tuple[str, int]
    api_url: str
    token: str = field(repr=False)
    admin_address: tuple[str, int]
    log_level: str


def parse_proxy_argv(
    parser: argparse.ArgumentParser, argv: Sequence[str], env: Mapping[str, str]
) -> tuple[argparse.Namespace, CommonProxySettings | None, Problems]:
    """Parse a proxy's argv; validate the shared flags.

    Returns the raw namespace (for the service's own flags), the shared settings (``None``
    when any of them is invalid) and the problems found so far; the caller adds its own
    and calls ``problems.raise_if_any()``.
    """
    try:
        args, extra = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise SettingsError([str(exc)]) from None
    problems = Problems()
    for item in extra:
        problems.add(f"unrecognized argument: {item}")
    address = api_url = None
    if problems.check(args.address is not None, "--address is required (HOST:PORT)"):
        address = problems.capture(parse_host_port, args.address, what="--address")
    if problems.check(args.api_url is not None, "--api-url is required (the routes URL)"):
        api_url = problems.capture(parse_routes_url, args.api_url)
    admin = problems.capture(parse_host_port, args.admin_address, what="--admin-address")
    level = problems.capture(log_level, args.log_level)
    token = problems.capture(read_token, env_var=TOKEN_ENV, token_file=args.api_token_file, env=env)
    common = None
    if None not in (address, api_url, admin, level, token):
        common = CommonProxySettings(address, api_url, token, admin, level)  # type: ignore[arg-type]
    return args, common, problems
