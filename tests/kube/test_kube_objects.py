"""Pure builders of the Kubernetes backend: names, labels, the Secret and the pods."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_gateway_api.backends.base import ClusterLaunch
from dask_gateway_api.backends.kube_objects import (
    KUBE_CLUSTER_DEFAULTS,
    ClusterIdentity,
    KubeSpecError,
    check_kube_cluster_values,
    cluster_id,
    deep_merge,
    format_cpu,
    instance_selector,
    is_dns_label,
    kube_cluster_spec,
    label_value,
    make_scheduler_pod,
    make_secret,
    make_worker_pod,
    owner_reference,
)
from dask_gateway_api.resources import ClusterConfig

NAME = "0123456789abcdef0123456789abcdef"
IDENT = ClusterIdentity("gw", "prod", NAME, "alice@example.com")
OWNER = {"apiVersion": "v1", "kind": "Secret", "name": "x", "uid": "u-1", "controller": True}
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def launch(**kw: Any) -> ClusterLaunch:
    base: dict[str, Any] = dict(
        name=NAME,
        username="alice@example.com",
        api_url="http://api.gw:8001/api",
        token="tok",
        tls_cert=b"CERT",
        tls_key=b"KEY",
        scheduler_cmd=("dask", "scheduler"),
        worker_cmd=("dask", "worker"),
        environment={"FOO": "bar", "DASK_GATEWAY_CLUSTER_NAME": "spoofed", "POD_IP": "1.2.3.4"},
        worker_threads=2,
        worker_memory=4 * 2**30,
        heartbeat_period=15,
        adaptive_period=3.0,
        idle_timeout=0.5,
        scheduler_address="tls://10.0.0.7:8786",
    )
    base.update(kw)
    return ClusterLaunch(**base)


CONFIG = ClusterConfig(worker_cores=2, worker_memory=4 * 2**30, scheduler_cores=1)


def env_dict(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --- names and labels -------------------------------------------------------------------


def test_cluster_id_uses_the_hex_name_or_the_last_dotted_part() -> None:
    assert cluster_id(NAME) == NAME
    assert cluster_id(f"default.{NAME}") == NAME  # spec §5.1 style
    hashed = cluster_id("Not A DNS Name!")
    assert hashed.startswith("h") and is_dns_label(hashed) and len(hashed) == 33
    assert cluster_id("Not A DNS Name!") == hashed  # stable


def test_object_names_are_valid() -> None:
    assert IDENT.secret_name == f"dask-gateway-{NAME}"
    assert IDENT.scheduler_pod_name == f"dask-scheduler-{NAME}"
    assert IDENT.worker_pod_name("ab12") == f"dask-worker-{NAME}-ab12"
    weird = IDENT.worker_pod_name("Worker_1")
    assert re.match(r"^dask-worker-[0-9a-f]{32}-h[0-9a-f]{32}$", weird)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("alice", "alice"),
        ("alice@example.com", "alice-example.com"),
        ("-_.", "x"),
        ("", ""),
        ("é" * 80, "x"),
    ],
)
def test_label_value(text: str, expected: str) -> None:
    assert label_value(text) == expected


@given(st.text(max_size=200))
def test_label_value_is_always_valid(text: str) -> None:
    value = label_value(text)
    assert len(value) <= 63 and LABEL_VALUE_RE.match(value)


def test_labels_and_selector() -> None:
    labels = IDENT.labels("scheduler")
    assert labels == {
        "app.kubernetes.io/name": "dask-gateway",
        "gateway.dask.org/instance": "prod",
        "gateway.dask.org/cluster": NAME,
        "gateway.dask.org/component": "scheduler",
        "gateway.dask.org/user": "alice-example.com",
    }
    assert (
        instance_selector("prod")
        == "app.kubernetes.io/name=dask-gateway,gateway.dask.org/instance=prod"
    )


# --- helpers ----------------------------------------------------------------------------


def test_deep_merge_merges_maps_appends_lists_and_copies() -> None:
    base = {"a": {"x": 1, "l": [1]}, "b": 2, "c": [1]}
    extra = {"a": {"y": 2, "l": [2]}, "b": {"new": True}, "c": "scalar"}
    merged = deep_merge(base, extra)
    assert merged == {"a": {"x": 1, "y": 2, "l": [1, 2]}, "b": {"new": True}, "c": "scalar"}
    merged["a"]["l"].append(3)
    assert base["a"]["l"] == [1] and extra["a"]["l"] == [2]


@pytest.mark.parametrize(
    "cores, text", [(1, "1"), (2.0, "2"), (1.5, "1500m"), (0.25, "250m"), (0.0011, "2m")]
)
def test_format_cpu(cores: float, text: str) -> None:
    assert format_cpu(cores) == text


def test_owner_reference() -> None:
    obj = {"metadata": {"name": "s", "uid": "u"}}
    assert owner_reference(obj, "Secret") == {
        "apiVersion": "v1",
        "kind": "Secret",
        "name": "s",
        "uid": "u",
        "controller": True,
    }


# --- per-cluster settings ---------------------------------------------------------------


def test_spec_defaults() -> None:
    spec = kube_cluster_spec({})
    assert spec.image == KUBE_CLUSTER_DEFAULTS["image"]
    assert spec.image_pull_secrets == () and spec.tolerations == ()
    assert spec.worker_memory_limit is None


def test_spec_parses_every_kind_of_value() -> None:
    spec = kube_cluster_spec(
        {
            "image": "r/img:2",
            "image_pull_policy": "Always",
            "image_pull_secrets": ["a", {"name": "b"}],
            "service_account": "sa",
            "node_selector": {"pool": "dask"},
            "tolerations": [{"key": "k", "operator": "Exists"}],
            "worker_cores_limit": 1.5,
            "worker_memory_limit": "6 G",
            "unrelated_extra": object(),  # other backends' keys are ignored
        }
    )
    assert spec.image_pull_secrets == ("a", "b")
    assert spec.worker_cores_limit == 1.5 and spec.worker_memory_limit == 6 * 2**30
    assert spec.tolerations == ({"key": "k", "operator": "Exists"},)


def test_spec_lists_every_problem() -> None:
    with pytest.raises(KubeSpecError) as info:
        kube_cluster_spec(
            {
                "image": "has space",
                "image_pull_policy": "Sometimes",
                "image_pull_secrets": "x",
                "node_selector": {"a": 1},
                "tolerations": ["x"],
                "worker_cores_limit": -1,
                "scheduler_memory_limit": "lots",
                "worker_extra_pod_config": [],
            }
        )
    problems = info.value.problems
    assert len(problems) == 8, problems
    assert (
        "image_pull_policy: must be null or one of Always, IfNotPresent, Never, got 'Sometimes'"
        in problems
    )
    assert any(p.startswith("scheduler_memory_limit: invalid memory size 'lots'") for p in problems)
    assert check_kube_cluster_values({"image": 5}, "backend.kubernetes.") == [
        "backend.kubernetes.image: must be a non-empty image reference without spaces, got 5"
    ]


# --- the Secret -------------------------------------------------------------------------


def test_make_secret() -> None:
    secret = make_secret(IDENT, tls_cert=b"C", tls_key=b"K", token="T", record='{"r":1}')
    assert secret["metadata"]["name"] == IDENT.secret_name
    assert secret["metadata"]["labels"]["gateway.dask.org/component"] == "credentials"
    assert secret["metadata"]["annotations"] == {
        "gateway.dask.org/cluster-name": NAME,
        "gateway.dask.org/cluster-record": '{"r":1}',
    }
    decoded = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert decoded == {"dask.crt": b"C", "dask.pem": b"K", "api-token": b"T"}


# --- the pods ---------------------------------------------------------------------------


def test_scheduler_pod_follows_spec_5_1_for_kubernetes() -> None:
    pod = make_scheduler_pod(IDENT, launch(), CONFIG, kube_cluster_spec({}), owner=OWNER)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == IDENT.scheduler_pod_name
    assert meta["ownerReferences"] == [OWNER]
    assert meta["labels"]["gateway.dask.org/component"] == "scheduler"
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    assert spec["volumes"] == [
        {"name": "dask-credentials", "secret": {"secretName": IDENT.secret_name}}
    ]
    [c] = spec["containers"]
    assert c["command"] == ["dask", "scheduler"]
    assert c["args"] == [
        "--protocol", "tls", "--port", "8786", "--host", "$(POD_IP)",
        "--dashboard-address", "$(POD_IP):8787",
        "--preload", "dask_gateway.scheduler_preload",
        "--dg-api-address", "$(POD_IP):8788",
        "--dg-heartbeat-period", "15", "--dg-adaptive-period", "3", "--dg-idle-timeout", "0.5",
    ]  # fmt: skip
    assert c["readinessProbe"]["httpGet"] == {"port": 8788, "path": "/api/health"}
    assert [p["containerPort"] for p in c["ports"]] == [8786, 8787, 8788]
    assert c["volumeMounts"] == [
        {"name": "dask-credentials", "mountPath": "/etc/dask-credentials", "readOnly": True}
    ]
    assert c["resources"] == {
        "requests": {"cpu": "1", "memory": str(2 * 2**30)},
        "limits": {"cpu": "1", "memory": str(2 * 2**30)},
    }
    assert c["env"][0] == {
        "name": "POD_IP",
        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
    }
    env = env_dict(c)
    assert env["FOO"] == "bar"
    assert env["DASK_GATEWAY_CLUSTER_NAME"] == NAME  # the gateway's variables win
    assert env["DASK_GATEWAY_API_URL"] == "http://api.gw:8001/api"
    assert env["DASK_GATEWAY_API_TOKEN"] == "/etc/dask-credentials/api-token"
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    assert env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"] == "/etc/dask-credentials/dask.crt"
    assert env["DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT"] == "/etc/dask-credentials/dask.crt"
    assert env["DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY"] == "/etc/dask-credentials/dask.pem"
    assert "DASK_GATEWAY_WORKER_NAME" not in env
    assert [e["name"] for e in c["env"]].count("POD_IP") == 1
    assert "imagePullPolicy" not in c and "nodeSelector" not in spec


def test_worker_pod() -> None:
    pod = make_worker_pod(
        IDENT, launch(), CONFIG, kube_cluster_spec({}), "w1", owner=OWNER, record='{"w":1}'
    )
    meta = pod["metadata"]
    assert meta["name"] == IDENT.worker_pod_name("w1")
    assert meta["labels"]["gateway.dask.org/worker"] == "w1"
    assert meta["annotations"]["gateway.dask.org/worker-name"] == "w1"
    assert meta["annotations"]["gateway.dask.org/worker-record"] == '{"w":1}'
    [c] = pod["spec"]["containers"]
    assert c["command"] == ["dask", "worker"]
    assert c["args"] == [
        "tls://10.0.0.7:8786", "--name", "w1", "--nthreads", "2",
        "--memory-limit", str(4 * 2**30), "--host", "$(POD_IP)",
        "--dashboard-address", "$(POD_IP):8787",
    ]  # fmt: skip
    env = env_dict(c)
    assert env["DASK_GATEWAY_WORKER_NAME"] == "w1"
    assert env["DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"] == "/etc/dask-credentials/dask.pem"
    assert c["resources"]["requests"] == {"cpu": "2", "memory": str(4 * 2**30)}
    assert "readinessProbe" not in c
    with pytest.raises(ValueError, match="no scheduler address"):
        make_worker_pod(
            IDENT, launch(scheduler_address=""), CONFIG, kube_cluster_spec({}), "w", owner=OWNER
        )


def test_pod_settings_and_extra_config() -> None:
    spec = kube_cluster_spec(
        {
            "image": "r/img:2",
            "image_pull_policy": "IfNotPresent",
            "image_pull_secrets": ["regcred"],
            "service_account": "dask",
            "node_selector": {"pool": "dask"},
            "tolerations": [{"key": "dedicated", "operator": "Exists"}],
            "worker_cores_limit": 2.5,
            "worker_memory_limit": "8 G",
            "worker_extra_pod_config": {
                "priorityClassName": "low",
                "tolerations": [{"key": "spot", "operator": "Exists"}],
            },
            "worker_extra_container_config": {
                "env": [{"name": "EXTRA", "value": "1"}],
                "securityContext": {"runAsNonRoot": True},
            },
            "worker_extra_pod_labels": {"team": "a", "gateway.dask.org/cluster": "hijack"},
            "worker_extra_pod_annotations": {"note": "x"},
        }
    )
    pod = make_worker_pod(IDENT, launch(), CONFIG, spec, "w1", owner=OWNER)
    pspec = pod["spec"]
    [c] = pspec["containers"]
    assert c["image"] == "r/img:2" and c["imagePullPolicy"] == "IfNotPresent"
    assert pspec["imagePullSecrets"] == [{"name": "regcred"}]
    assert pspec["serviceAccountName"] == "dask"
    assert pspec["nodeSelector"] == {"pool": "dask"}
    assert pspec["priorityClassName"] == "low"
    assert pspec["tolerations"] == [
        {"key": "dedicated", "operator": "Exists"},
        {"key": "spot", "operator": "Exists"},
    ]
    assert c["resources"]["limits"] == {"cpu": "2500m", "memory": str(8 * 2**30)}
    assert c["env"][-1] == {"name": "EXTRA", "value": "1"}
    assert c["securityContext"] == {"runAsNonRoot": True}
    labels = pod["metadata"]["labels"]
    assert labels["team"] == "a" and labels["gateway.dask.org/cluster"] == NAME
    assert pod["metadata"]["annotations"]["note"] == "x"
    # The scheduler keeps its own (empty) extras.
    sched = make_scheduler_pod(IDENT, launch(), CONFIG, spec, owner=OWNER)
    assert "priorityClassName" not in sched["spec"]
    assert "team" not in sched["metadata"]["labels"]
