"""Spec §11.26: the whole gateway under a path prefix."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dask_gateway import BasicAuth, Gateway

from tests.e2e.harness import (
    GatewayUnderTest,
    basic,
    default_config,
    http_request,
    running_gateway,
    wait_until,
    wait_workers,
)

PREFIX = "/svc"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayUnderTest]:
    with running_gateway(tmp_path_factory, "prefix", default_config(prefix=PREFIX)) as gateway:
        yield gateway


def test_s26_prefix_deployment(gw: GatewayUnderTest) -> None:
    host, port = gw.web_host_port
    root = f"http://{host}:{port}"
    assert gw.address == root + PREFIX
    with Gateway(
        root + PREFIX,
        proxy_address=gw.proxy_address,
        public_address=PREFIX + "/",
        auth=BasicAuth("alice", ""),
    ) as gateway:
        assert gateway.get_versions()["server"]["version"]
        assert list(gateway.cluster_options()) == ["worker_cores", "size"]
        assert gateway.list_clusters() == []
        cluster = gateway.new_cluster()
        try:
            name = cluster.name
            assert cluster.dashboard_link == f"{PREFIX}/clusters/{name}/status"
            cluster.scale(1)
            wait_workers(cluster, 1)
            client = cluster.get_client(set_as_default=False)
            try:
                assert client.submit(lambda x: x + 1, 1).result(timeout=30) == 2
            finally:
                client.close()
            owner = {"Authorization": basic("alice")}  # dashboards are owner-only by default
            page = http_request(root + cluster.dashboard_link, headers=owner)
            assert page.status == 200, page
            # Nothing is served outside the prefix.
            assert http_request(f"{root}/clusters/{name}/status").status == 404
            assert http_request(f"{root}/api/version").status == 404
        finally:
            cluster.shutdown()
        assert gateway.list_clusters() == []
    wait_until(
        lambda: http_request(f"{root}{PREFIX}/clusters/{name}/status").status == 404,
        10,
        "the prefixed dashboard route to go away",
    )
