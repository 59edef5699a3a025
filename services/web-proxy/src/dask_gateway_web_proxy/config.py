"""Settings of the web proxy: argv + environment → typed ``WebProxySettings``.

Pure apart from reading the token file and checking that the TLS files are readable.
Every flag is taken as a string and validated here, so one run reports *every* problem at
once (``SettingsError.problems``); the CLI prints them and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dask_gateway_common.settings import (
    TOKEN_ENV,
    RaisingArgumentParser,
    SettingsError,
    add_common_proxy_args,
    parse_proxy_argv,
    parse_seconds,
)

from .access import DEFAULT_MAX_ENTRIES, DEFAULT_TTL, split_routes_url

__all__ = [
    "DASHBOARD_ACCESS_MODES",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_RESPONSE_TIMEOUT",
    "PROG",
    "SettingsError",
    "WebProxySettings",
    "build_parser",
    "load_settings",
]

PROG = "dask-gateway-web-proxy"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RESPONSE_TIMEOUT = 60.0
#: ``check``: ask the API before forwarding into a dashboard; ``open``: never (upstream).
DASHBOARD_ACCESS_MODES = ("check", "open")


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
    dashboard_access: str = "check"
    dashboard_access_ttl: float = DEFAULT_TTL
    dashboard_access_cache_size: int = DEFAULT_MAX_ENTRIES

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser; every value is a string, validated by :func:`load_settings`."""
    parser = RaisingArgumentParser(
        prog=PROG,
        description=(
            "HTTP/1.1 reverse proxy for Dask Gateway: routes requests by path prefix to "
            "the API and to each cluster's dashboard, passing websocket upgrades through. "
            "The route table comes from the API's route feed, authenticated with "
            f"${TOKEN_ENV} or --api-token-file."
        ),
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
    parser.add_argument(
        "--dashboard-access",
        default="check",
        metavar="check|open",
        help="check: let a request into /clusters/<name>/ only with the API's consent "
        "(owner-only dashboards, the API's dashboards.auth); open: no check, as upstream "
        "(for an API without the access endpoint); default %(default)s",
    )
    parser.add_argument(
        "--dashboard-access-ttl",
        default=str(DEFAULT_TTL),
        metavar="SECONDS",
        help="how long the API's consent is reused for the same cluster and credentials "
        "(refusals are never reused); 0 asks every time; default %(default)s",
    )
    parser.add_argument(
        "--dashboard-access-cache-size",
        default=str(DEFAULT_MAX_ENTRIES),
        metavar="N",
        help="most consents remembered (least recently used dropped); default %(default)s",
    )
    return parser


def _ttl(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(
            f"--dashboard-access-ttl: expected a number of seconds, got {value!r}"
        ) from None
    if not 0 <= seconds <= 3600:
        raise ValueError(f"--dashboard-access-ttl: must be >= 0 and <= 3600, got {value!r}")
    return seconds


def _cache_size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        raise ValueError(
            f"--dashboard-access-cache-size: expected an integer, got {value!r}"
        ) from None
    if size < 1:
        raise ValueError(f"--dashboard-access-cache-size: must be >= 1, got {value!r}")
    return size


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
    args, common, problems = parse_proxy_argv(build_parser(), argv, env)
    connect = problems.capture(parse_seconds, args.connect_timeout, what="--connect-timeout")
    response = problems.capture(parse_seconds, args.response_timeout, what="--response-timeout")
    cert = key = None
    if (args.tls_cert is None) != (args.tls_key is None):
        problems.add("--tls-cert and --tls-key must be given together")
    elif args.tls_cert is not None:
        cert = problems.capture(_readable_file, args.tls_cert, what="--tls-cert")
        key = problems.capture(_readable_file, args.tls_key, what="--tls-key")
    mode = args.dashboard_access
    if mode not in DASHBOARD_ACCESS_MODES:
        problems.add(
            f"--dashboard-access: must be one of {', '.join(DASHBOARD_ACCESS_MODES)}, got {mode!r}"
        )
    ttl = problems.capture(_ttl, args.dashboard_access_ttl)
    size = problems.capture(_cache_size, args.dashboard_access_cache_size)
    if mode == "check" and common is not None:
        problems.capture(split_routes_url, common.api_url)
    problems.raise_if_any()
    assert common is not None and connect is not None and response is not None
    assert ttl is not None and size is not None
    return WebProxySettings(
        **vars(common),
        tls_cert=cert,
        tls_key=key,
        connect_timeout=connect,
        response_timeout=response,
        dashboard_access=mode,
        dashboard_access_ttl=ttl,
        dashboard_access_cache_size=size,
    )
