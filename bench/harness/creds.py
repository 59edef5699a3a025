"""The benchmark cluster's TLS material and the two contexts built exactly as in production:
the client's as the official ``dask_gateway.client.GatewaySecurity`` builds it, the
backend's as distributed builds a scheduler's listener (cert doubles as the only CA)."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

from dask_gateway_common.tls import generate_cluster_credentials, write_private_file


@dataclass(frozen=True)
class ClusterCreds:
    name: str
    cert_path: str
    key_path: str

    @property
    def sni(self) -> str:
        return "daskgateway-" + self.name


def make_creds(directory: str, name: str, key_type: str = "ec") -> ClusterCreds:
    cert, key = generate_cluster_credentials(name, key_type=key_type)
    cert_path = os.path.join(directory, f"{name}.crt")
    key_path = os.path.join(directory, f"{name}.pem")
    write_private_file(cert_path, cert)
    write_private_file(key_path, key)
    return ClusterCreds(name, cert_path, key_path)


def client_context(creds: ClusterCreds) -> ssl.SSLContext:
    from dask_gateway.client import GatewaySecurity

    with open(creds.cert_path) as f:
        cert = f.read()
    with open(creds.key_path) as f:
        key = f.read()
    return GatewaySecurity(tls_key=key, tls_cert=cert).get_connection_args("client")["ssl_context"]


def backend_context(creds: ClusterCreds) -> ssl.SSLContext:
    from distributed.security import Security

    security = Security(
        tls_ca_file=creds.cert_path,
        tls_scheduler_cert=creds.cert_path,
        tls_scheduler_key=creds.key_path,
        require_encryption=True,
    )
    return security.get_listen_args("scheduler")["ssl_context"]
