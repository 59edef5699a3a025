"""Small in-process helpers: requests without sockets, a scripted fake hub, a test PKI."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dask_gateway_common.http import Headers, Request, Response, serve_http


def make_request(*headers: tuple[str, str]) -> Request:
    async def no_body() -> bytes | None:
        return None

    return Request(
        method="GET",
        target="/api/v1/clusters/",
        headers=Headers(headers),
        client=None,
        http_version="1.1",
        scheme="http",
        receive_body=no_body,
        max_body_bytes=1024,
    )


def hub_auth(token: str) -> tuple[str, str]:
    return ("Authorization", f"jupyterhub {token}")


@dataclass
class FakeHub:
    """A scripted hub: ``answers`` maps a token to ``(status, body)``; records requests."""

    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    default: tuple[int, bytes] = (403, b'{"status": 403, "message": null}')
    delay: float = 0.0
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    url: str = ""

    def user(self, token: str, model: dict[str, Any], status: int = 200) -> None:
        self.answers[token] = (status, json.dumps(model).encode())

    async def handle(self, request: Request) -> Response:
        auth = request.headers.get("Authorization")
        self.requests.append((request.target, auth))
        if self.delay:
            await trio.sleep(self.delay)
        token = (auth or "").partition(" ")[2]
        if request.path.rsplit("/", 1)[-1] != "user" and "/authorizations/token/" in request.path:
            token = urllib.parse.unquote(request.path.rsplit("/", 1)[-1])
        status, body = self.answers.get(token, self.default)
        return Response(status, [("Content-Type", "application/json")], body)


@asynccontextmanager
async def running_fake_hub(
    hub: FakeHub, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[FakeHub]:
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            lambda task_status: serve_http(
                hub.handle, "127.0.0.1", 0, ssl_context=ssl_context, task_status=task_status
            )
        )
        scheme = "https" if ssl_context is not None else "http"
        hub.url = f"{scheme}://127.0.0.1:{port}/hub/api"
        yield hub
        nursery.cancel_scope.cancel()


@dataclass(frozen=True)
class HubPKI:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_pki(directory: Path) -> HubPKI:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test hub CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name: str, usage: x509.ObjectIdentifier, san: x509.GeneralName | None) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf(
        "127.0.0.1",
        ExtendedKeyUsageOID.SERVER_AUTH,
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    )
    client_cert, client_key = leaf("dask-gateway", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    pem = serialization.Encoding.PEM
    files = {
        "ca.pem": ca_cert.public_bytes(pem),
        "server.pem": server_cert.public_bytes(pem),
        "server.key": _key_pem(server_key),
        "client.pem": client_cert.public_bytes(pem),
        "client.key": _key_pem(client_key),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return HubPKI(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


def mutual_tls_server_context(pki: HubPKI) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by the test CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
