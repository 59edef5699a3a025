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
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_RESPONSE_TIMEOUT = 60.0


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
    return parser


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
    problems.raise_if_any()
    assert common is not None and connect is not None and response is not None
    return WebProxySettings(
        **vars(common),
        tls_cert=cert,
        tls_key=key,
        connect_timeout=connect,
        response_timeout=response,
    )
