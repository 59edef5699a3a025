"""Per-cluster credentials work with the official client and distributed, end to end.

The handshakes run over real loopback sockets: trio ``SSLStream`` for the raw contexts,
and distributed's own TLS comm (listener built from the scheduler's ``Security``,
connector = the official ``gateway://`` comm with ``GatewaySecurity``) in a worker thread.
"""

import asyncio
import datetime
import os
import ssl
import stat
import time

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from dask_gateway_common.tls import (
    client_ssl_context,
    generate_cluster_credentials,
    make_private_dir,
    server_ssl_context,
    write_private_file,
)

KEY_TYPES = ["ec", "rsa"]


@pytest.fixture(scope="module", params=KEY_TYPES)
def creds(request, tmp_path_factory):
    """(key_type, cert_pem, key_pem, cert_path, key_path) for cluster 'abc123'."""
    cert, key = generate_cluster_credentials("abc123", key_type=request.param)
    d = tmp_path_factory.mktemp(f"creds-{request.param}")
    cert_path, key_path = d / "dask.crt", d / "dask.pem"
    write_private_file(cert_path, cert)
    write_private_file(key_path, key)
    return request.param, cert, key, str(cert_path), str(key_path)


def test_certificate_matches_spec(creds):
    key_type, cert_pem, key_pem, _, _ = creds
    cert = x509.load_pem_x509_certificate(cert_pem)
    cn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-internal")])
    assert cert.subject == cn and cert.issuer == cn
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert san.value.get_values_for_type(x509.DNSName) == [
        "abc123",
        "dask-internal",
        "skein-internal",
    ]
    assert len(cert.extensions) == 1
    now = datetime.datetime.now(datetime.UTC)
    assert cert.not_valid_before_utc <= now - datetime.timedelta(seconds=30)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=365, minutes=1)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(key_pem, password=None)
    if key_type == "ec":
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    else:
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_credentials_are_unique_and_validated():
    a = generate_cluster_credentials("x")
    b = generate_cluster_credentials("x")
    assert a[0] != b[0] and a[1] != b[1]
    with pytest.raises(ValueError, match="unknown key type"):
        generate_cluster_credentials("x", key_type="dsa")
    with pytest.raises(ValueError):
        generate_cluster_credentials("")


def test_ec_generation_is_fast():
    """The create request budget is 20 ms p50; EC generation must be a small part of it."""
    generate_cluster_credentials("warmup")
    timings = []
    for i in range(21):
        start = time.perf_counter()
        generate_cluster_credentials(f"c{i}")
        timings.append(time.perf_counter() - start)
    median = sorted(timings)[len(timings) // 2]
    assert median < 0.005, f"EC credentials took {median * 1000:.2f} ms (median)"


def _client_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    from dask_gateway.client import GatewaySecurity

    with open(cert_path) as f:
        cert = f.read()
    with open(key_path) as f:
        key = f.read()
    return GatewaySecurity(tls_key=key, tls_cert=cert).get_connection_args("client")["ssl_context"]


def _scheduler_security(cert_path: str, key_path: str):
    from distributed.security import Security

    return Security(
        tls_ca_file=cert_path,
        tls_scheduler_cert=cert_path,
        tls_scheduler_key=key_path,
        tls_worker_cert=cert_path,
        tls_worker_key=key_path,
        require_encryption=True,
    )


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, sni: str):
    """Full TLS handshake + one echo over loopback; returns (server-seen SNI, peer certs).

    If either side's handshake fails, raises ``HandshakeFailed`` naming the sides.
    """
    seen: dict[str, object] = {}
    failures: list[str] = []

    def sni_callback(sslobj, server_name, ctx):
        seen["sni"] = server_name

    server_ctx.sni_callback = sni_callback
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def serve_one():
        raw = await listeners[0].accept()
        stream = trio.SSLStream(raw, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            seen["client_cert"] = stream.getpeercert(binary_form=True)
            data = await stream.receive_some(100)
            await stream.send_all(data.upper())
        except trio.BrokenResourceError:
            failures.append("server")
        finally:
            await trio.aclose_forcefully(stream)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            client = trio.SSLStream(raw, client_ctx, server_hostname=sni)
            try:
                await client.send_all(b"ping")
                assert await client.receive_some(100) == b"PING"
                seen["server_cert"] = client.getpeercert(binary_form=True)
            except trio.BrokenResourceError:
                failures.append("client")
            finally:
                await trio.aclose_forcefully(client)
        await listeners[0].aclose()
    if failures:
        raise HandshakeFailed(failures)
    return seen


class HandshakeFailed(Exception):
    pass


@pytest.mark.parametrize("strict", [False, True])
async def test_official_client_handshakes_with_scheduler_context(creds, strict):
    _, cert_pem, _, cert_path, key_path = creds
    client_ctx = _client_context(cert_path, key_path)
    server_ctx = _scheduler_security(cert_path, key_path).get_listen_args("scheduler")[
        "ssl_context"
    ]
    if strict:
        client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        server_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    assert server_ctx.verify_mode == ssl.CERT_REQUIRED
    seen = await _handshake(server_ctx, client_ctx, "daskgateway-abc123")
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    assert seen["sni"] == "daskgateway-abc123"
    assert seen["client_cert"] == der
    assert seen["server_cert"] == der


async def test_client_without_certificate_is_rejected(creds):
    _, _, _, cert_path, key_path = creds
    server_ctx = _scheduler_security(cert_path, key_path).get_listen_args("scheduler")[
        "ssl_context"
    ]
    client_ctx = ssl.create_default_context(cafile=cert_path)
    client_ctx.check_hostname = False
    with pytest.raises(HandshakeFailed) as info:
        await _handshake(server_ctx, client_ctx, "daskgateway-abc123")
    assert "server" in info.value.args[0]  # the scheduler insists on a client certificate


async def test_other_clusters_certificate_is_rejected(creds):
    key_type, _, _, cert_path, key_path = creds
    other_cert, other_key = generate_cluster_credentials("other", key_type=key_type)
    d = os.path.dirname(cert_path)
    write_private_file(os.path.join(d, "other.crt"), other_cert)
    write_private_file(os.path.join(d, "other.pem"), other_key)
    server_ctx = _scheduler_security(cert_path, key_path).get_listen_args("scheduler")[
        "ssl_context"
    ]
    client_ctx = _client_context(os.path.join(d, "other.crt"), os.path.join(d, "other.pem"))
    with pytest.raises(HandshakeFailed) as info:
        await _handshake(server_ctx, client_ctx, "daskgateway-abc123")
    assert "client" in info.value.args[0]  # the client does not trust another cluster's cert


def _distributed_roundtrip(cert_path: str, key_path: str) -> object:
    """A distributed TLS listener (scheduler role) reached through the gateway:// comm."""
    import dask_gateway  # noqa: F401  (registers the gateway:// comm)
    from distributed.comm import connect, listen

    security = _scheduler_security(cert_path, key_path)
    client_args = {"ssl_context": _client_context(cert_path, key_path)}

    async def main():
        async def handle(comm):
            msg = await comm.read()
            await comm.write({"echo": msg})
            await comm.close()

        listener = listen("tls://127.0.0.1:0", handle, **security.get_listen_args("scheduler"))
        await listener.start()
        try:
            port = listener.listen_address.rsplit(":", 1)[1]
            comm = await connect(f"gateway://127.0.0.1:{port}/abc123", **client_args)
            await comm.write({"op": "ping"})
            reply = await comm.read()
            await comm.close()
            return reply
        finally:
            listener.stop()

    return asyncio.run(asyncio.wait_for(main(), 20))


async def test_distributed_comm_end_to_end(creds):
    _, _, _, cert_path, key_path = creds
    with trio.fail_after(30):
        reply = await trio.to_thread.run_sync(_distributed_roundtrip, cert_path, key_path)
    assert reply == {"echo": {"op": "ping"}}


async def test_server_and_client_contexts_for_https(tmp_path):
    cert, key = generate_cluster_credentials("localhost")
    write_private_file(tmp_path / "c.crt", cert)
    write_private_file(tmp_path / "c.key", key)
    server_ctx = server_ssl_context(str(tmp_path / "c.crt"), str(tmp_path / "c.key"))
    # Hostname checking is on by default; "localhost" is in the SAN.
    client_ctx = client_ssl_context(ca_file=str(tmp_path / "c.crt"))
    assert client_ctx.check_hostname and client_ctx.verify_mode == ssl.CERT_REQUIRED
    seen = await _handshake(server_ctx, client_ctx, "localhost")
    assert seen["sni"] == "localhost"
    assert seen["client_cert"] is None
    # Wrong name fails verification...
    with pytest.raises(HandshakeFailed):
        await _handshake(
            server_ssl_context(str(tmp_path / "c.crt"), str(tmp_path / "c.key")),
            client_ssl_context(ca_file=str(tmp_path / "c.crt")),
            "elsewhere",
        )
    # ...unless verification is off; a client certificate can be presented too.
    insecure = client_ssl_context(
        cert_file=str(tmp_path / "c.crt"), key_file=str(tmp_path / "c.key"), verify=False
    )
    assert insecure.verify_mode == ssl.CERT_NONE
    await _handshake(
        server_ssl_context(str(tmp_path / "c.crt"), str(tmp_path / "c.key")), insecure, "x"
    )
    with pytest.raises(ValueError):
        client_ssl_context(key_file=str(tmp_path / "c.key"))


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_private_file(tmp_path):
    old_umask = os.umask(0)
    try:
        target = tmp_path / "secret.pem"
        write_private_file(target, b"one")
        assert target.read_bytes() == b"one" and _mode(target) == 0o600
        target.chmod(0o644)
        write_private_file(str(target), b"two")
        assert target.read_bytes() == b"two" and _mode(target) == 0o600
        assert os.listdir(tmp_path) == ["secret.pem"]  # no temporary files left behind
    finally:
        os.umask(old_umask)
    with pytest.raises(FileNotFoundError):
        write_private_file(tmp_path / "missing" / "x", b"")
    assert os.listdir(tmp_path) == ["secret.pem"]


def test_make_private_dir(tmp_path):
    old_umask = os.umask(0)
    try:
        d = tmp_path / "a" / "b"
        make_private_dir(d)
        assert _mode(d) == 0o700
        d.chmod(0o755)
        make_private_dir(str(d))
        assert _mode(d) == 0o700
    finally:
        os.umask(old_umask)
