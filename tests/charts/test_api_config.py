"""The configuration the API chart renders is one the API itself accepts.

The rendered ConfigMap (config.yaml) and the Secret values, delivered as the environment
variables the Deployment maps them to, go through the API's own settings loader, exactly as
`dask-gateway-api --config ...` would read them in the pod.
"""

from __future__ import annotations

from typing import Any

import pytest

from dask_gateway_api.config import BACKEND_TYPES, settings_from_mapping
from dask_gateway_common.settings import SettingsError
from tests.charts.chart_tools import (
    FULL,
    HUB_TOKEN,
    PASSWORD,
    SCENARIOS,
    TOKEN,
    UMBRELLA,
    Rendered,
    render,
)


def _pod_env(out: Rendered) -> dict[str, str]:
    """The API container's environment as the kubelet would resolve it."""
    container = out.container("gateway-api-gw")
    secrets = {
        s["metadata"]["name"]: out.secret_data(s["metadata"]["name"]) for s in out.of_kind("Secret")
    }
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def _problems(config: dict[str, Any], env: dict[str, str]) -> list[str]:
    try:
        settings_from_mapping(config, env)
    except SettingsError as exc:
        return list(exc.problems)
    return []


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_config_is_accepted_by_the_api(scenario: str) -> None:
    out = render(UMBRELLA, SCENARIOS[scenario])
    config = out.api_config()
    env = _pod_env(out)
    assert config["backend"]["type"] == "kubernetes"
    if "kubernetes" in BACKEND_TYPES:
        assert _problems(config, env) == []
    else:
        # The Kubernetes backend is not in the API yet: everything else must be accepted,
        # and the backend section must be the only thing the API objects to.
        problems = _problems(config, env)
        assert problems, "kubernetes is not in BACKEND_TYPES, yet the API accepted it"
        assert all(p.startswith("backend.") or "'backend." in p for p in problems), problems
        without_backend = {k: v for k, v in config.items() if k != "backend"}
        assert _problems(without_backend, env) == []


def test_secrets_reach_the_api_settings() -> None:
    out = render(UMBRELLA, FULL)
    config = {k: v for k, v in out.api_config().items() if k != "backend"}
    settings = settings_from_mapping(config, _pod_env(out))
    assert settings.proxy_token == TOKEN
    assert settings.auth.password == PASSWORD
    assert list(settings.encrypt_keys) == FULL["gateway"]["encryptKeys"]
    assert settings.prefix == "/services/dask-gateway"
    assert settings.bind == ("0.0.0.0", 8001)
    assert settings.api_url == "http://gateway-api-gw.dask:8001/services/dask-gateway/api"
    assert settings.user_limits.max_clusters == 4

    classic = render(UMBRELLA, SCENARIOS["classic"])
    config = {k: v for k, v in classic.api_config().items() if k != "backend"}
    settings = settings_from_mapping(config, _pod_env(classic))
    assert settings.auth.type == "jupyterhub"
    assert settings.auth.jupyterhub_api_token == HUB_TOKEN
    assert settings.auth.jupyterhub_api_url == "http://hub:8081/hub/api"


def test_a_bad_config_is_caught() -> None:
    # The check has teeth: a value the API rejects shows up as a problem.
    out = render(UMBRELLA, SCENARIOS["default"])
    config = {k: v for k, v in out.api_config().items() if k != "backend"}
    config["cluster"]["worker_memory"] = "lots"
    assert any("worker_memory" in p for p in _problems(config, _pod_env(out)))
