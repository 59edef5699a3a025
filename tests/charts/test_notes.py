"""The install notes: how to find the public addresses and the connect snippet."""

from __future__ import annotations

from tests.charts.chart_tools import (
    API,
    CLASSIC,
    DEFAULT,
    NAMESPACE,
    SCHED,
    UMBRELLA,
    WEB,
    merge,
    render_notes,
)


def test_umbrella_notes_print_the_connect_snippet() -> None:
    notes = render_notes(UMBRELLA, DEFAULT, release="dask-gateway")
    assert (
        f"kubectl --namespace {NAMESPACE} get service web-public-dask-gateway "
        "scheduler-public-dask-gateway"
    ) in notes
    assert "WEB_IP=$(kubectl --namespace dask get service web-public-dask-gateway" in notes
    assert "{.status.loadBalancer.ingress[0].ip}" in notes
    assert "from dask_gateway import Gateway" in notes
    assert (
        'Gateway("http://<web-public IP>", proxy_address="tls://<scheduler-public IP>:8786", '
        'auth="basic")'
    ) in notes
    assert "NodePort" not in notes
    assert "{{" not in notes and "<no value>" not in notes


def test_umbrella_notes_follow_the_values() -> None:
    values = merge(
        CLASSIC,
        {
            "gateway": {"prefix": "/services/dask-gateway"},
            "webProxy": {"service": {"port": 8080}},
            "schedulerProxy": {"service": {"port": 443}},
        },
    )
    notes = render_notes(UMBRELLA, values)
    assert (
        'Gateway("http://<web-public IP>:8080/services/dask-gateway", '
        'proxy_address="tls://<scheduler-public IP>:443", auth="jupyterhub")'
    ) in notes
    nodeport = render_notes(
        UMBRELLA, merge(DEFAULT, {"webProxy": {"service": {"type": "NodePort"}}})
    )
    assert "reach a NodePort Service at <any node's address>" in nodeport


def test_sub_chart_notes() -> None:
    api = render_notes(API, {"proxyToken": "x"}, release="gw-api")
    assert "--set gateway.release=gw-api" in api
    assert "http://gateway-api-gw-api:8001/api/v1/routes" in api
    sched = render_notes(SCHED, {"gateway": {"release": "gw-api"}}, release="s")
    assert "kubectl --namespace dask get service scheduler-public-s" in sched
    assert 'proxy_address="tls://<that address>:8786"' in sched
    assert "configmap/gateway-api-gw-api" in sched
    web = render_notes(WEB, {"tls": {"secretName": "t"}, "service": {"port": 443}}, release="w")
    assert 'Gateway("https://<that address>", ...)' in web
    for notes in (api, sched, web):
        assert "<no value>" not in notes
