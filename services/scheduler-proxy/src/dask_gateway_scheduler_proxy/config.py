"""Settings of the scheduler proxy: argv + environment → typed ``ProxySettings``.

Pure apart from reading the token file. Every flag is taken as a string and validated
here, so one run reports *every* problem at once (``SettingsError.problems``) instead of
stopping at the first; the CLI prints them and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
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
MAX_TIMEOUT = 3600.0
MAX_WORKERS = 64
TOKEN_ENV = "DASK_GATEWAY_PROXY_TOKEN"


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


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting on malformed argv."""

    def error(self, message: str):  # type: ignore[override]
        raise SettingsError([message])


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser; every value is a string, validated by :func:`load_settings`."""
    parser = _Parser(
        prog=PROG,
        description=(
            "TLS-SNI routing TCP proxy for Dask Gateway. Reads each connection's TLS "
            "ClientHello, routes SNI 'daskgateway-<name>' to cluster <name>'s scheduler "
            "and relays the still-encrypted bytes. The route table comes from the API's "
            f"route feed, authenticated with ${TOKEN_ENV} or --api-token-file."
        ),
        exit_on_error=False,
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


def _seconds(value: str, *, what: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{what}: expected a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError(f"{what}: must be > 0 and <= {MAX_TIMEOUT:g} seconds, got {value!r}")
    return seconds


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


def load_settings(
    argv: Sequence[str], env: Mapping[str, str], *, platform: str = sys.platform
) -> ProxySettings:
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
    forward = None
    if args.http_forward is not None:
        forward = problems.capture(parse_host_port, args.http_forward, what="--http-forward")
        if forward is not None and forward[1] == 0:
            problems.add("--http-forward: port 0 is not a valid destination")
    hello = problems.capture(_seconds, args.hello_timeout, what="--hello-timeout")
    connect = problems.capture(_seconds, args.connect_timeout, what="--connect-timeout")
    workers = problems.capture(_workers, args.workers, platform=platform)
    problems.raise_if_any()
    assert address is not None and api_url is not None and admin is not None
    assert level is not None and token is not None and hello is not None
    assert connect is not None and workers is not None
    return ProxySettings(
        address=address,
        api_url=api_url,
        token=token,
        admin_address=admin,
        log_level=level,
        http_forward=forward,
        hello_timeout=hello,
        connect_timeout=connect,
        workers=workers,
    )
