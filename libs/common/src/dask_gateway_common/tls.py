"""TLS helpers: per-cluster credentials (spec §3.3), SSL contexts, private files.

Per-cluster credentials are one self-signed certificate that doubles as the only CA: the
official client and the scheduler both load it as trust anchor *and* as their own
certificate, so they authenticate each other end to end through the SNI proxy. Hostnames
are never checked. The default key type is EC P-256 because it is generated in well under
a millisecond (RSA-2048 takes tens of milliseconds, and this runs on every cluster create);
``key_type="rsa"`` reproduces upstream exactly.

Files holding keys are created with mode 0600 from the first byte (``os.open`` with
``O_CREAT | O_EXCL`` on a temporary name, then an atomic rename), never world-readable.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "CLUSTER_CERT_CN",
    "KEY_TYPES",
    "client_ssl_context",
    "generate_cluster_credentials",
    "make_private_dir",
    "server_ssl_context",
    "write_private_file",
]

CLUSTER_CERT_CN = "dask-internal"
KEY_TYPES = ("ec", "rsa")
_VALIDITY = datetime.timedelta(days=365)
_BACKDATE = datetime.timedelta(minutes=1)


def _new_private_key(key_type: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}; expected one of {', '.join(KEY_TYPES)}")


def generate_cluster_credentials(name: str, *, key_type: str = "ec") -> tuple[bytes, bytes]:
    """Create a cluster's self-signed certificate and key: ``(cert PEM, key PEM)``.

    Subject = issuer = CN ``dask-internal``; SAN DNS names ``name``, ``dask-internal``,
    ``skein-internal``; SHA-256; valid from one minute ago for 365 days. The key is PKCS#8
    PEM, unencrypted.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("cluster name must be a non-empty string")
    key = _new_private_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CLUSTER_CERT_CN)])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName(name), x509.DNSName(CLUSTER_CERT_CN), x509.DNSName("skein-internal")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context (TLS ≥ 1.2) presenting ``cert_file``/``key_file``, e.g. public HTTPS."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def client_ssl_context(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client context for HTTPS peers (JupyterHub, an https API URL).

    ``ca_file`` replaces the system trust store when given; ``cert_file`` (+ ``key_file``)
    adds a client certificate; ``verify=False`` disables certificate and hostname checks.
    """
    if key_file and not cert_file:
        raise ValueError("a client key file was given without a certificate file")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (replacing any old file).

    The bytes go to a fresh temporary file created 0600 in the same directory, are fsynced,
    and the file is renamed over ``path``; readers see either the old or the new content.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    fd, tmp = _create_exclusive(directory, base)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _create_exclusive(directory: str, base: str) -> tuple[int, str]:
    # mkstemp already uses O_CREAT | O_EXCL with mode 0600 regardless of umask.
    return tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)


def make_private_dir(path: str | os.PathLike[str]) -> None:
    """Create ``path`` (and parents) with the leaf at mode 0700; tighten it if it exists."""
    path = os.fspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
