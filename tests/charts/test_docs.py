"""docs/install-kube.md stays true: its config files render, its names and keys exist."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.charts.chart_tools import API, CHARTS, REPO, SCHED, UMBRELLA, WEB, render

DOC = REPO / "docs" / "install-kube.md"
SUBCHART_OF = {"gateway": API, "schedulerProxy": SCHED, "webProxy": WEB}


def _blocks() -> dict[str, str]:
    """Fenced blocks marked with ``<!-- chart-test: NAME -->`` on the line before."""
    pattern = re.compile(r"<!-- chart-test: ([\w-]+) -->\n```\w*\n(.*?)```", re.S)
    return dict(pattern.findall(DOC.read_text()))


def _schema(chart: str) -> dict[str, Any]:
    return json.loads((CHARTS / chart / "values.schema.json").read_text())


def _in_schema(schema: dict[str, Any], path: list[str]) -> bool:
    node = schema
    for part in path:
        props = node.get("properties")
        if props is None or part not in props:
            # Free-form objects (passed through verbatim) accept any key below them.
            return props is None and node.get("type") == "object"
        node = props[part]
    return True


def test_the_marked_blocks_exist() -> None:
    assert set(_blocks()) == {"minimal-config", "classic-config", "jupyterhub-config"}


def test_minimal_config_installs() -> None:
    values = yaml.safe_load(_blocks()["minimal-config"])
    out = render(UMBRELLA, values, release="dask-gateway")
    assert out.api_config("dask-gateway")["auth"]["type"] == "simple"


def test_classic_config_and_jupyterhub_side_agree() -> None:
    blocks = _blocks()
    values = yaml.safe_load(blocks["classic-config"])
    hub = yaml.safe_load(blocks["jupyterhub-config"])
    out = render(UMBRELLA, values, release="dask-gateway")
    auth = out.api_config("dask-gateway")["auth"]
    assert auth["type"] == "jupyterhub"
    assert auth["jupyterhub_api_url"] == "http://hub:8081/hub/api"
    secret = out.secret_data("gateway-secret-dask-gateway")
    # The same token on both sides, as the text says.
    assert secret["jupyterhub-api-token"] == hub["hub"]["services"]["dask-gateway"]["apiToken"]
    assert secret["proxy-token"] == values["gateway"]["proxyToken"]
    # The notebook environment points at the Services this release creates.
    env = hub["singleuser"]["extraEnv"]
    services = {s["metadata"]["name"]: s for s in out.of_kind("Service")}
    web_host = env["DASK_GATEWAY__ADDRESS"].removeprefix("http://")
    sched_host, sched_port = env["DASK_GATEWAY__PROXY_ADDRESS"].removeprefix("tls://").split(":")
    assert services[web_host]["spec"]["ports"][0]["port"] == 80
    assert services[sched_host]["spec"]["ports"][0]["port"] == int(sched_port)


def test_documented_service_listing_matches_the_chart() -> None:
    text = DOC.read_text()
    listing = text.split("$ kubectl --namespace dask-gateway get service\n", 1)[1].split("```")[0]
    rows = [line.split() for line in listing.splitlines()[1:] if line.strip()]
    documented = {row[0]: (row[1], row[4].split(":")[0].split("/")[0]) for row in rows}
    out = render(UMBRELLA, yaml.safe_load(_blocks()["minimal-config"]), release="dask-gateway")
    rendered = {
        s["metadata"]["name"]: (s["spec"]["type"], str(s["spec"]["ports"][0]["port"]))
        for s in out.of_kind("Service")
    }
    assert documented == rendered


def test_documented_keys_exist() -> None:
    text = DOC.read_text()
    keys = set(re.findall(r"`((?:gateway|schedulerProxy|webProxy)(?:\.[A-Za-z]+)+)`", text))
    assert len(keys) > 20
    missing = []
    for key in sorted(keys):
        top, *path = key.split(".")
        found = _in_schema(_schema(SUBCHART_OF[top]), path)
        if top == "gateway":  # or the proxy charts' own `gateway.*` keys (where the API is)
            found = found or any(_in_schema(_schema(c), [top, *path]) for c in (SCHED, WEB))
        if not found:
            missing.append(key)
    assert missing == []


def test_documented_proxy_keys_exist() -> None:
    # The proxy table lists keys without the umbrella prefix; some are for one proxy only.
    table = DOC.read_text().split("### `schedulerProxy` and `webProxy`", 1)[1].split("\n## ", 1)[0]
    keys = set(re.findall(r"^\| `([A-Za-z]+(?:\.[A-Za-z]+)*)`", table, re.M))
    assert {"replicas", "service.type", "service.nodePort", "workers", "responseTimeout"} <= keys
    schemas = [_schema(SCHED), _schema(WEB)]
    assert [k for k in sorted(keys) if not any(_in_schema(s, k.split(".")) for s in schemas)] == []
