"""Settings of the web proxy: argv + environment → typed ``WebProxySettings``.

Pure apart from reading the token file and checking that the TLS files are readable.
Every flag is taken as a string and validated here, so one run reports *every* problem at
once (``SettingsError.problems``); the CLI prints them and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from dask_gateway_common.settings import (
    Problems,
    SettingsError,
    add_common_proxy_args,
    log_level,
    parse_host_port,
    read_token,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_RESPONSE_TIMEOUT",
    "PROG",
    "SettingsError",
    "WebProxySettings",
    "build_parser",
    "load_settings",
]

PROG = "dask-gateway-web-proxy"
TOKEN_ENV = "DASK_GATEWAY_PROXY_TOKEN"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RESPONSE_TIMEOUT = 60.0
MAX_TIMEOUT = 3600.0


@dataclass(frozen=True)
class WebProxySettings:
    """Everything the web proxy needs, validated. The token never shows in repr."""

    address: tuple[str, int]
    api_url: str
    token: str = field(repr=False)
    admin_address: tuple[str, int] = ("127.0.0.1", 0)
    log_level: str = "INFO"
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting on malformed argv."""

    def error(self, message: str):  # type: ignore[override]
        raise SettingsError([message])


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser; every value is a string, validated by :func:`load_settings`."""
    parser = _Parser(
        prog=PROG,
        description=(
            "HTTP/1.1 reverse proxy for Dask Gateway: routes requests by path prefix to "
            "the API and to each cluster's dashboard, passing websocket upgrades through. "
            "The route table comes from the API's route feed, authenticated with "
            f"${TOKEN_ENV} or --api-token-file."
        ),
        exit_on_error=False,
    )
    add_common_proxy_args(parser)
    parser.add_argument(
        "--tls-cert",
        default=None,
        metavar="FILE",
        help="PEM certificate (chain) to serve HTTPS on --address; needs --tls-key",
    )
    parser.add_argument(
        "--tls-key",
        default=None,
        metavar="FILE",
        help="PEM private key for --tls-cert",
    )
    parser.add_argument(
        "--connect-timeout",
        default=str(DEFAULT_CONNECT_TIMEOUT),
        metavar="SECONDS",
        help="deadline for connecting to an upstream (502 past it); default %(default)s",
    )
    parser.add_argument(
        "--response-timeout",
        default=str(DEFAULT_RESPONSE_TIMEOUT),
        metavar="SECONDS",
        help="deadline for an upstream's response head once the request is sent "
        "(504 past it); default %(default)s",
    )
    return parser


def _seconds(value: str, *, what: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{what}: expected a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(f"{what}: must be > 0 and <= {MAX_TIMEOUT:g} seconds, got {value!r}")
    return seconds


def _api_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"--api-url: not a valid URL: {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "--api-url: expected the full routes URL, e.g. "
            f"http://127.0.0.1:8000/api/v1/routes, got {value!r}"
        )
    if port == 0:
        raise ValueError(f"--api-url: port 0 is not a valid port: {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("--api-url: must not carry credentials, a query or a fragment")
    return value


def _readable_file(path: str, *, what: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"{what}: no such file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what}: file is not readable: {path}")
    return path


def load_settings(argv: Sequence[str], env: Mapping[str, str]) -> WebProxySettings:
    """Validate ``argv`` (without the program name) and ``env``; raise ``SettingsError``.

    ``--help`` prints the help and raises ``SystemExit(0)`` as usual.
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise SettingsError([str(exc)]) from None
    problems = Problems()
    for item in extra:
        problems.add(f"unrecognized argument: {item}")

    address = None
    if problems.check(args.address is not None, "--address is required (HOST:PORT)"):
        address = problems.capture(parse_host_port, args.address, what="--address")
    api_url = None
    if problems.check(args.api_url is not None, "--api-url is required (the routes URL)"):
        api_url = problems.capture(_api_url, args.api_url)
    admin = problems.capture(parse_host_port, args.admin_address, what="--admin-address")
    level = problems.capture(log_level, args.log_level)
    token = problems.capture(read_token, env_var=TOKEN_ENV, token_file=args.api_token_file, env=env)
    connect = problems.capture(_seconds, args.connect_timeout, what="--connect-timeout")
    response = problems.capture(_seconds, args.response_timeout, what="--response-timeout")
    cert = key = None
    if (args.tls_cert is None) != (args.tls_key is None):
        problems.add("--tls-cert and --tls-key must be given together")
    elif args.tls_cert is not None:
        cert = problems.capture(_readable_file, args.tls_cert, what="--tls-cert")
        key = problems.capture(_readable_file, args.tls_key, what="--tls-key")
    problems.raise_if_any()
    assert address is not None and api_url is not None and admin is not None
    assert level is not None and token is not None
    assert connect is not None and response is not None
    return WebProxySettings(
        address=address,
        api_url=api_url,
        token=token,
        admin_address=admin,
        log_level=level,
        tls_cert=cert,
        tls_key=key,
        connect_timeout=connect,
        response_timeout=response,
    )
