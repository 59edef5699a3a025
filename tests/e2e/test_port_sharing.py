"""Spec §11.27: one public port for both HTTP and scheduler TLS (the client's default when no
``proxy_address`` is given). A second scheduler proxy, following the same route feed, listens
on the shared port and relays everything that is not TLS to the web proxy."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from collections.abc import Iterator

import pytest
from dask_gateway import BasicAuth, Gateway

from tests.e2e.harness import (
    BIN_DIR,
    GatewayUnderTest,
    basic,
    default_config,
    free_port,
    http_request,
    running_gateway,
    wait_until,
    wait_workers,
)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    with running_gateway(tmp_path_factory, "port-sharing", default_config()) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def shared_port(gw: GatewayUnderTest) -> Iterator[int]:
    local = gw.local
    port, admin = free_port(), free_port()
    log = open(local.workdir / "logs" / "shared-port-proxy.log", "ab")  # noqa: SIM115
    process = subprocess.Popen(
        [
            str(BIN_DIR / "dask-gateway-scheduler-proxy"),
            "--address",
            f"{local.host}:{port}",
            "--admin-address",
            f"{local.host}:{admin}",
            "--api-url",
            local.routes_url,
            "--http-forward",
            f"{local.host}:{local.ports.web}",
        ],
        env={**os.environ, "DASK_GATEWAY_PROXY_TOKEN": local.proxy_token},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        wait_until(
            lambda: (
                process.poll() is None
                and http_request(f"http://{local.host}:{admin}/readyz", timeout=2).status == 200
            ),
            30,
            "the shared-port scheduler proxy to be ready",
            ignore=(OSError,),
        )
        yield port
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_s27_port_sharing(gw: GatewayUnderTest, shared_port: int) -> None:
    host = gw.local.host
    address = f"http://{host}:{shared_port}"
    assert http_request(f"{address}/api/version").json()["version"]

    with Gateway(address, auth=BasicAuth("alice", "")) as gateway:
        assert gateway.proxy_address == f"gateway://{host}:{shared_port}"
        cluster = gateway.new_cluster()
        try:
            assert cluster.scheduler_address == f"gateway://{host}:{shared_port}/{cluster.name}"
            cluster.scale(1)
            wait_workers(cluster, 1)
            client = cluster.get_client(set_as_default=False)
            try:
                assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
            finally:
                client.close()
            owner = {"Authorization": basic("alice")}  # dashboards are owner-only by default
            page = http_request(cluster.dashboard_link, headers=owner)
            assert page.status == 200, page
        finally:
            cluster.shutdown()

    # An unknown cluster's SNI: the connection is closed, no handshake completes.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, shared_port), timeout=10) as sock:
        with pytest.raises((ssl.SSLError, OSError)):
            context.wrap_socket(sock, server_hostname="daskgateway-unknown").close()

    # Plain HTTP on the same port still works afterwards.
    assert http_request(f"{address}/api/version").status == 200
