"""``backend.kubernetes`` settings: defaults, file, environment, problems, cluster options."""

from __future__ import annotations

from typing import Any

import pytest

from dask_gateway_api.backends.kube_objects import KUBE_CLUSTER_DEFAULTS
from dask_gateway_api.config import KubernetesSettings, SettingsError, settings_from_mapping
from dask_gateway_api.resources import resolve_cluster_config

ENV = {"DASK_GATEWAY_PROXY_TOKEN": "t" * 32}


def settings(data: dict[str, Any], env: dict[str, str] | None = None) -> Any:
    return settings_from_mapping(data, {**ENV, **(env or {})})


def problems(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(SettingsError) as info:
        settings(data, env)
    return info.value.problems


def test_defaults() -> None:
    s = settings({"backend": {"type": "kubernetes"}})
    assert s.backend.type == "kubernetes"
    assert s.backend.kubernetes == KubernetesSettings()
    # Every per-cluster key is declared in cluster.extra (so options may target it).
    assert s.cluster.config.extra == KUBE_CLUSTER_DEFAULTS
    assert s.cluster.config.extra is not KUBE_CLUSTER_DEFAULTS
    # The local backend is untouched.
    assert settings({}).cluster.config.extra == {}


def test_file_and_environment() -> None:
    s = settings(
        {
            "backend": {
                "type": "kubernetes",
                "kubernetes": {
                    "kubeconfig": "/etc/kube/config",
                    "namespace": "dask",
                    "instance": "prod",
                    "api_concurrency": 8,
                    "watch_timeout": 60,
                    "image": "r/img:1",
                    "node_selector": {"pool": "dask"},
                },
            },
            "cluster": {"extra": {"image": "r/img:from-extra"}},
        },
        {
            "DASK_GATEWAY_BACKEND__KUBERNETES__NAMESPACE": "from-env",
            "DASK_GATEWAY_BACKEND__KUBERNETES__REQUEST_TIMEOUT": "5",
            "DASK_GATEWAY_BACKEND__KUBERNETES__TOLERATIONS": '[{"key": "k", "operator": "Exists"}]',
            "DASK_GATEWAY_BACKEND__KUBERNETES__WORKER_MEMORY_LIMIT": "6 G",
            "DASK_GATEWAY_BACKEND__KUBERNETES__SERVICE_ACCOUNT": "",
        },
    )
    kube = s.backend.kubernetes
    assert (kube.kubeconfig, kube.namespace, kube.instance) == (
        "/etc/kube/config",
        "from-env",
        "prod",
    )
    assert (kube.api_concurrency, kube.request_timeout, kube.watch_timeout) == (8, 5.0, 60.0)
    extra = s.cluster.config.extra
    assert extra["image"] == "r/img:from-extra"  # cluster.extra wins
    assert extra["node_selector"] == {"pool": "dask"}
    assert extra["tolerations"] == [{"key": "k", "operator": "Exists"}]
    assert extra["worker_memory_limit"] == "6 G"
    assert extra["service_account"] is None


def test_options_may_target_kubernetes_keys() -> None:
    fields = [
        {"field": "image", "type": "string", "default": "r/img:1", "target": "image"},
        {"field": "gpu", "type": "bool", "default": False, "target": "worker_extra_pod_config"},
    ]
    s = settings({"backend": {"type": "kubernetes"}, "options": {"fields": fields[:1]}})
    spec = s.options.spec
    config = resolve_cluster_config(
        s.cluster.config, spec.transform(spec.validate({"image": "r/x:2"}))
    )
    assert config.extra["image"] == "r/x:2"
    # With the local backend those keys are not cluster config keys.
    assert any(
        "target 'image' is not a cluster config key" in p
        for p in problems({"options": {"fields": fields[:1]}})
    )


def test_every_problem_is_listed() -> None:
    found = problems(
        {
            "backend": {
                "type": "kubernetes",
                "kubernetes": {
                    "namespace": "Not_A_Namespace",
                    "instance": "-bad-",
                    "api_concurrency": 0,
                    "kubeconfig": " ",
                    "imge": "x",
                    "image_pull_policy": "Sometimes",
                    "worker_memory_limit": "lots",
                },
            },
            "cluster": {"extra": {"tolerations": "none"}},
        },
        {"DASK_GATEWAY_BACKEND__KUBERNETES__WATCH_TIMEOUT": "soon"},
    )
    expected = [
        "unknown key 'backend.kubernetes.imge' (did you mean 'image'?)",
        "DASK_GATEWAY_BACKEND__KUBERNETES__WATCH_TIMEOUT: expected a number, got 'soon'",
        "backend.kubernetes.kubeconfig: must not be empty",
        "backend.kubernetes.namespace: must be a Kubernetes namespace name",
        "backend.kubernetes.instance: must be a valid label value",
        "backend.kubernetes.api_concurrency: must be > 0, got 0",
        "backend.kubernetes.image_pull_policy: must be null or one of Always, IfNotPresent, Never",
        "backend.kubernetes.worker_memory_limit: invalid memory size 'lots'",
        "cluster.extra.tolerations: must be a list of toleration objects, got 'none'",
    ]
    assert len(found) == len(expected), found
    for fragment in expected:
        assert any(fragment in p for p in found), (fragment, found)


def test_type_errors_of_backend_keys() -> None:
    found = problems(
        {"backend": {"type": "kubernetes", "kubernetes": {"namespace": 5, "instance": None}}}
    )
    assert "backend.kubernetes.namespace: expected a string, got 5" in found
    assert "backend.kubernetes.instance: expected a string, got None" in found
    assert problems({"backend": {"kubernetes": []}}) == [
        "backend.kubernetes: expected a mapping, got []"
    ]
