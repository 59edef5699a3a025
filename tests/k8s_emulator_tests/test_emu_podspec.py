"""Pod spec to process: $(VAR) expansion, env sources, mount rewriting, probes (pure)."""

from __future__ import annotations

import base64

import pytest

from tests.k8s_emulator.podspec import (
    ContainerProblem,
    ProbeState,
    expand,
    probe_spec,
    resolve_env,
    rewrite_paths,
    volume_files,
)

SECRET = {
    "data": {
        "token": base64.b64encode(b"s3cret").decode(),
        "dask.crt": base64.b64encode(b"CERT").decode(),
    }
}
CONFIG = {"data": {"mode": "fast"}, "binaryData": {"blob": base64.b64encode(b"\x00\x01").decode()}}
POD = {
    "metadata": {"name": "pod-1", "namespace": "ns", "uid": "u-1", "labels": {"app": "x"}},
    "spec": {"nodeName": "node", "serviceAccountName": "default"},
    "status": {"podIP": "127.0.0.9", "podIPs": [{"ip": "127.0.0.9"}], "hostIP": "127.0.0.1"},
}


def secrets(name: str) -> dict | None:
    return SECRET if name == "creds" else None


def configmaps(name: str) -> dict | None:
    return CONFIG if name == "conf" else None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "1"),
        ("x-$(A)-$(B)", "x-1-two"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("$$", "$"),
        ("$A", "$A"),
        ("$(A", "$(A"),
        ("cost: 5$", "cost: 5$"),
    ],
)
def test_expand_like_kubernetes(text: str, expected: str) -> None:
    assert expand(text, {"A": "1", "B": "two"}) == expected


def test_rewrite_paths_replaces_whole_prefixes_only() -> None:
    mounts = [
        ("/etc/dask-credentials", "/tmp/p/vol"),
        ("/etc/dask-credentials/sub", "/tmp/p/other"),
    ]
    assert rewrite_paths("/etc/dask-credentials/dask.crt", mounts) == "/tmp/p/vol/dask.crt"
    assert (
        rewrite_paths("--tls-cert=/etc/dask-credentials/dask.crt", mounts)
        == "--tls-cert=/tmp/p/vol/dask.crt"
    )
    assert rewrite_paths("/etc/dask-credentials/sub/x", mounts) == "/tmp/p/other/x"
    assert rewrite_paths("/etc/dask-credentials", mounts) == "/tmp/p/vol"
    assert rewrite_paths("/etc/dask-credentials2/x", mounts) == "/etc/dask-credentials2/x"
    assert rewrite_paths("/opt/etc/dask-credentials/x", mounts) == "/opt/etc/dask-credentials/x"


def test_resolve_env_sources_in_order() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "conf"}, "prefix": "CM_"}],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "conf", "key": "mode"}}},
            {"name": "ADDR", "value": "tls://$(POD_IP):8786"},
            {"name": "LATER", "value": "$(AFTER)"},
            {"name": "AFTER", "value": "x"},
            {
                "name": "OPT",
                "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
        ],
    }
    env = resolve_env(container, POD, secrets=secrets, configmaps=configmaps)
    assert env == {
        "CM_mode": "fast",
        "CM_blob": "\x00\x01",
        "POD_IP": "127.0.0.9",
        "NAME": "pod-1",
        "NS": "ns",
        "APP": "x",
        "TOKEN": "s3cret",
        "MODE": "fast",
        "ADDR": "tls://127.0.0.9:8786",
        "LATER": "$(AFTER)",
        "AFTER": "x",
    }


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"secretKeyRef": {"name": "nope", "key": "k"}}, 'secret "nope" not found'),
        ({"secretKeyRef": {"name": "creds", "key": "k"}}, "couldn't find key k in Secret ns/creds"),
        ({"configMapKeyRef": {"name": "nope", "key": "k"}}, 'configmap "nope" not found'),
        ({"fieldRef": {"fieldPath": "spec.bogus"}}, "unsupported fieldRef"),
    ],
)
def test_resolve_env_problems(ref: dict, message: str) -> None:
    container = {"env": [{"name": "X", "valueFrom": ref}]}
    with pytest.raises(ContainerProblem) as info:
        resolve_env(container, POD, secrets=secrets, configmaps=configmaps)
    assert info.value.reason == "CreateContainerConfigError"
    assert message in info.value.message


def test_volume_files() -> None:
    secret_volume = {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o600}}
    assert volume_files(secret_volume, secrets=secrets, configmaps=configmaps) == {
        "token": (b"s3cret", 0o600),
        "dask.crt": (b"CERT", 0o600),
    }
    items = {
        "name": "v",
        "secret": {
            "secretName": "creds",
            "items": [{"key": "token", "path": "sub/t", "mode": 0o400}],
        },
    }
    assert volume_files(items, secrets=secrets, configmaps=configmaps) == {
        "sub/t": (b"s3cret", 0o400)
    }
    cm = {"name": "c", "configMap": {"name": "conf"}}
    assert volume_files(cm, secrets=secrets, configmaps=configmaps)["mode"] == (b"fast", 0o644)
    projected = {
        "name": "p",
        "projected": {"sources": [{"secret": {"name": "creds"}}, {"configMap": {"name": "conf"}}]},
    }
    assert set(volume_files(projected, secrets=secrets, configmaps=configmaps)) == {
        "token",
        "dask.crt",
        "mode",
        "blob",
    }
    assert volume_files({"name": "e", "emptyDir": {}}, secrets=secrets, configmaps=configmaps) == {}
    optional = {"name": "o", "secret": {"secretName": "nope", "optional": True}}
    assert volume_files(optional, secrets=secrets, configmaps=configmaps) == {}


def test_missing_volume_source_waits_in_container_creating() -> None:
    with pytest.raises(ContainerProblem) as info:
        volume_files(
            {"name": "v", "secret": {"secretName": "nope"}}, secrets=secrets, configmaps=configmaps
        )
    assert info.value.reason == "ContainerCreating"
    assert 'secret "nope" not found' in info.value.message
    with pytest.raises(ContainerProblem):
        volume_files(
            {"name": "v", "hostPath": {"path": "/"}}, secrets=secrets, configmaps=configmaps
        )


def test_probe_spec_defaults_and_named_ports() -> None:
    container = {"ports": [{"name": "api", "containerPort": 8788}]}
    spec = probe_spec({"httpGet": {"port": "api", "path": "/api/health"}}, container, "127.0.0.5")
    assert spec is not None
    assert (spec.kind, spec.host, spec.port, spec.path, spec.scheme) == (
        "http",
        "127.0.0.5",
        8788,
        "/api/health",
        "HTTP",
    )
    assert (spec.period, spec.timeout, spec.success_threshold, spec.failure_threshold) == (
        10.0,
        1.0,
        1,
        3,
    )
    tcp = probe_spec({"tcpSocket": {"port": 8786}, "periodSeconds": 2}, container, "127.0.0.5")
    assert tcp is not None and (tcp.kind, tcp.port, tcp.period) == ("tcp", 8786, 2.0)
    assert probe_spec(None, container, "127.0.0.5") is None
    with pytest.raises(ContainerProblem):
        probe_spec({"httpGet": {"port": "nope"}}, container, "127.0.0.5")


def test_probe_thresholds() -> None:
    spec = probe_spec(
        {
            "exec": {"command": ["true"]},
            "successThreshold": 2,
            "failureThreshold": 2,
            "initialDelaySeconds": 5,
        },
        {},
        "",
    )
    assert spec is not None
    state = ProbeState(spec, started_at=100.0, time_scale=0.1)
    assert state.next_due == pytest.approx(100.5)
    assert state.record(True, 101.0) is None
    assert state.record(True, 102.0) is True
    assert state.next_due == pytest.approx(103.0)
    assert state.record(False, 103.0) is None
    assert state.record(True, 104.0) is None
    assert state.record(False, 105.0) is None
    assert state.record(False, 106.0) is False
    assert state.passing is False
