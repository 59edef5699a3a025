"""Settings of the scheduler proxy: argv + environment → typed ``ProxySettings``.

Pure apart from reading the token file. Every flag is taken as a string and validated
here, so one run reports *every* problem at once (``SettingsError.problems``) instead of
stopping at the first; the CLI prints them and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dask_gateway_common.settings import (
    TOKEN_ENV,
    RaisingArgumentParser,
    SettingsError,
    add_common_proxy_args,
    parse_host_port,
    parse_proxy_argv,
    parse_seconds,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HELLO_TIMEOUT",
    "MAX_WORKERS",
    "PROG",
    "ProxySettings",
    "SettingsError",
    "build_parser",
    "load_settings",
]

PROG = "dask-gateway-scheduler-proxy"
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 10.0
MAX_WORKERS = 64


@dataclass(frozen=True)
class ProxySettings:
    """Everything the scheduler proxy needs, validated. The token never shows in repr."""

    address: tuple[str, int]
    api_url: str
    token: str = field(repr=False)
    admin_address: tuple[str, int] = ("127.0.0.1", 0)
    log_level: str = "INFO"
    http_forward: tuple[str, int] | None = None
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    workers: int = 1


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser; every value is a string, validated by :func:`load_settings`."""
    parser = RaisingArgumentParser(
        prog=PROG,
        description=(
            "TLS-SNI routing TCP proxy for Dask Gateway. Reads each connection's TLS "
            "ClientHello, routes SNI 'daskgateway-<name>' to cluster <name>'s scheduler "
            "and relays the still-encrypted bytes. The route table comes from the API's "
            f"route feed, authenticated with ${TOKEN_ENV} or --api-token-file."
        ),
    )
    add_common_proxy_args(parser)
    parser.add_argument(
        "--http-forward",
        default=None,
        metavar="HOST:PORT",
        help="relay connections that are not TLS (e.g. HTTP) to this address, such as the "
        "web proxy, so one public port serves both; default: close them",
    )
    parser.add_argument(
        "--hello-timeout",
        default=str(DEFAULT_HELLO_TIMEOUT),
        metavar="SECONDS",
        help="deadline for a client to send its whole TLS ClientHello; default %(default)s",
    )
    parser.add_argument(
        "--connect-timeout",
        default=str(DEFAULT_CONNECT_TIMEOUT),
        metavar="SECONDS",
        help="deadline for connecting to a scheduler; default %(default)s",
    )
    parser.add_argument(
        "--workers",
        default="1",
        metavar="N",
        help="number of processes sharing the port (SO_REUSEPORT, Linux); default %(default)s",
    )
    return parser


def _workers(value: str, *, platform: str) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"--workers: expected a whole number, got {value!r}")
    n = int(text)
    if not 1 <= n <= MAX_WORKERS:
        raise ValueError(f"--workers: must be between 1 and {MAX_WORKERS}, got {n}")
    if n > 1 and not platform.startswith("linux"):
        raise ValueError("--workers above 1 needs Linux (SO_REUSEPORT load balancing)")
    return n


def load_settings(
    argv: Sequence[str], env: Mapping[str, str], *, platform: str = sys.platform
) -> ProxySettings:
    """Validate ``argv`` (without the program name) and ``env``; raise ``SettingsError``.

    ``--help`` prints the help and raises ``SystemExit(0)`` as usual.
    """
    args, common, problems = parse_proxy_argv(build_parser(), argv, env)
    forward = None
    if args.http_forward is not None:
        forward = problems.capture(parse_host_port, args.http_forward, what="--http-forward")
        if forward is not None and forward[1] == 0:
            problems.add("--http-forward: port 0 is not a valid destination")
    hello = problems.capture(parse_seconds, args.hello_timeout, what="--hello-timeout")
    connect = problems.capture(parse_seconds, args.connect_timeout, what="--connect-timeout")
    workers = problems.capture(_workers, args.workers, platform=platform)
    problems.raise_if_any()
    assert common is not None and hello is not None
    assert connect is not None and workers is not None
    return ProxySettings(
        **vars(common),
        http_forward=forward,
        hello_timeout=hello,
        connect_timeout=connect,
        workers=workers,
    )
