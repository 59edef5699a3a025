"""CRUD of pods, secrets, services and configmaps through the official client's CoreV1Api."""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.k8s_emulator import KubeEmulator

NS = "default"


def pod_body(name: str = "p", **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, **meta},
        "spec": {
            "containers": [
                {"name": "main", "image": "ghcr.io/dask/dask:2026.8.0", "command": ["sleep", "1"]}
            ]
        },
    }


def status_of(exc: ApiException) -> dict[str, Any]:
    return json.loads(exc.body)


OPS = ("create", "read", "replace", "patch", "delete", "list", "delete_collection")
SUFFIX = {"pods": "pod", "secrets": "secret", "services": "service", "configmaps": "config_map"}


def op(api: client.CoreV1Api, kind: str, name: str, info: bool = False) -> Callable[..., Any]:
    """``api.<name>_namespaced_<kind>[_with_http_info]``; ``*_with_http_info`` returns
    ``(data, status, headers)``."""
    method = f"{name}_namespaced_{SUFFIX[kind]}"
    return getattr(api, method + ("_with_http_info" if info else ""))


BODIES: dict[str, Callable[[str], dict[str, Any]]] = {
    "pods": lambda name: pod_body(name, labels={"app": "t"}),
    "secrets": lambda name: {
        "metadata": {"name": name, "labels": {"app": "t"}},
        "stringData": {"k": "v"},
    },
    "services": lambda name: {
        "metadata": {"name": name, "labels": {"app": "t"}},
        "spec": {"selector": {"app": "t"}, "ports": [{"port": 8786}]},
    },
    "configmaps": lambda name: {
        "metadata": {"name": name, "labels": {"app": "t"}},
        "data": {"k": "v"},
    },
}
KINDS = list(BODIES)


@pytest.mark.parametrize("kind", KINDS)
def test_crud_round_trip_status_codes_and_server_metadata(api: client.CoreV1Api, kind: str) -> None:
    created, status, _ = op(api, kind, "create", info=True)(NS, BODIES[kind]("obj-1"))
    assert status == 201
    meta = created.metadata
    assert meta.uid and meta.namespace == NS and meta.name == "obj-1"
    assert int(meta.resource_version) > 0
    assert abs(meta.creation_timestamp - dt.datetime.now(dt.UTC)) < dt.timedelta(seconds=30)
    if kind in ("pods", "services"):
        assert meta.generation == 1

    with pytest.raises(ApiException) as dup:
        op(api, kind, "create")(NS, BODIES[kind]("obj-1"))
    assert dup.value.status == 409
    assert status_of(dup.value)["reason"] == "AlreadyExists"

    got, status, _ = op(api, kind, "read", info=True)("obj-1", NS)
    assert status == 200 and got.metadata.uid == meta.uid

    got.metadata.labels["extra"] = "yes"
    replaced, status, _ = op(api, kind, "replace", info=True)("obj-1", NS, got)
    assert status == 200
    assert replaced.metadata.labels["extra"] == "yes"
    assert int(replaced.metadata.resource_version) > int(meta.resource_version)

    stale = got  # still carries the old resourceVersion
    with pytest.raises(ApiException) as conflict:
        op(api, kind, "replace")("obj-1", NS, stale)
    assert conflict.value.status == 409
    assert status_of(conflict.value)["reason"] == "Conflict"

    patched, status, _ = op(api, kind, "patch", info=True)(
        "obj-1", NS, {"metadata": {"labels": {"extra": None, "p": "1"}}}
    )
    assert status == 200
    assert patched.metadata.labels == {"app": "t", "p": "1"}

    listed = op(api, kind, "list")(NS, label_selector="p=1")
    assert [item.metadata.name for item in listed.items] == ["obj-1"]
    assert int(listed.metadata.resource_version) >= int(patched.metadata.resource_version)

    deleted, status, _ = op(api, kind, "delete", info=True)("obj-1", NS)
    assert status == 200
    if kind in ("pods", "services"):
        assert deleted.metadata.name == "obj-1"
    else:
        assert deleted["kind"] == "Status" and deleted["status"] == "Success"
        assert deleted["details"]["name"] == "obj-1"

    for name in ("read", "delete"):
        with pytest.raises(ApiException) as missing:
            op(api, kind, name)("obj-1", NS)
        assert missing.value.status == 404
        body = status_of(missing.value)
        assert body["kind"] == "Status" and body["reason"] == "NotFound"
        assert body["message"] == f'{kind} "obj-1" not found'


@pytest.mark.parametrize("kind", KINDS)
def test_delete_collection_by_selector(api: client.CoreV1Api, kind: str) -> None:
    for i in range(3):
        body = BODIES[kind](f"c-{i}")
        body["metadata"]["labels"]["keep"] = "yes" if i == 0 else "no"
        op(api, kind, "create")(NS, body)
    result = op(api, kind, "delete_collection")(NS, label_selector="keep=no")
    assert result.status == "Success"
    left = op(api, kind, "list")(NS)
    assert [item.metadata.name for item in left.items] == ["c-0"]


def test_pod_defaults_like_the_apiserver(api: client.CoreV1Api) -> None:
    body = pod_body("d")
    body["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "1", "memory": "1Gi"}}
    body["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"port": 8788}}
    pod = api.create_namespaced_pod(NS, body)
    assert pod.status.phase == "Pending"
    assert pod.status.qos_class == "Guaranteed"
    assert pod.spec.restart_policy == "Always"
    assert pod.spec.termination_grace_period_seconds == 30
    assert pod.spec.service_account_name == "default"
    c = pod.spec.containers[0]
    assert c.resources.requests == {"cpu": "1", "memory": "1Gi"}
    assert c.image_pull_policy == "IfNotPresent"
    assert c.readiness_probe.period_seconds == 10 and c.readiness_probe.http_get.scheme == "HTTP"


def test_generate_name(api: client.CoreV1Api) -> None:
    a = api.create_namespaced_pod(NS, {**pod_body(""), "metadata": {"generateName": "worker-"}})
    b = api.create_namespaced_pod(NS, {**pod_body(""), "metadata": {"generateName": "worker-"}})
    assert a.metadata.name.startswith("worker-") and len(a.metadata.name) == len("worker-") + 5
    assert a.metadata.name != b.metadata.name
    assert a.metadata.generate_name == "worker-"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"metadata": {}, "spec": {"containers": [{"name": "c", "image": "i"}]}}, "metadata.name"),
        (
            {
                "metadata": {"name": "Bad_Name"},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
            "metadata.name",
        ),
        ({"metadata": {"name": "ok"}, "spec": {"containers": []}}, "spec.containers"),
        (
            {"metadata": {"name": "ok"}, "spec": {"containers": [{"name": "c"}]}},
            "spec.containers[0].image",
        ),
        (
            {
                "metadata": {"name": "ok", "labels": {"a": "x" * 64}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
            "metadata.labels",
        ),
        (
            {
                "metadata": {"name": "ok"},
                "spec": {"restartPolicy": "Sometimes", "containers": [{"name": "c", "image": "i"}]},
            },
            "spec.restartPolicy",
        ),
        (
            {
                "metadata": {"name": "ok"},
                "spec": {
                    "containers": [
                        {
                            "name": "c",
                            "image": "i",
                            "volumeMounts": [{"name": "v", "mountPath": "/x"}],
                        }
                    ]
                },
            },
            "spec.containers[0].volumeMounts[0].name",
        ),
    ],
)
def test_invalid_pods_are_422(api: client.CoreV1Api, body: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiException) as info:
        api.create_namespaced_pod(NS, body)
    assert info.value.status == 422
    status = status_of(info.value)
    assert status["reason"] == "Invalid"
    assert field in [cause["field"] for cause in status["details"]["causes"]]


def test_namespace_mismatch_and_missing_namespace(api: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as mismatch:
        api.create_namespaced_pod(NS, pod_body("x", namespace="other"))
    assert mismatch.value.status == 400
    with pytest.raises(ApiException) as missing:
        api.create_namespaced_pod("nowhere", pod_body("x"))
    assert missing.value.status == 404
    assert status_of(missing.value)["message"] == 'namespaces "nowhere" not found'
    assert api.list_namespaced_pod("nowhere").items == []


def test_pod_spec_is_immutable_but_status_subresource_is_separate(api: client.CoreV1Api) -> None:
    api.create_namespaced_pod(NS, pod_body("imm"))
    with pytest.raises(ApiException) as info:
        api.patch_namespaced_pod("imm", NS, {"spec": {"restartPolicy": "Never"}})
    assert info.value.status == 422
    assert "pod updates may not change fields" in status_of(info.value)["message"]

    image = api.patch_namespaced_pod(
        "imm", NS, {"spec": {"containers": [{"name": "main", "image": "other:2"}]}}
    )
    assert image.spec.containers[0].image == "other:2"
    assert image.metadata.generation == 2

    ignored = api.patch_namespaced_pod("imm", NS, {"status": {"phase": "Running"}})
    assert ignored.status.phase == "Pending"

    updated = api.patch_namespaced_pod_status(
        "imm",
        NS,
        {
            "status": {"phase": "Running", "podIP": "10.0.0.1"},
            "metadata": {"labels": {"ignored": "x"}},
        },
    )
    assert updated.status.phase == "Running" and updated.status.pod_ip == "10.0.0.1"
    assert updated.metadata.labels is None
    assert updated.metadata.generation == 2
    read = api.read_namespaced_pod_status("imm", NS)
    assert read.status.pod_ip == "10.0.0.1"


def test_json_patch_and_merge_patch(api: client.CoreV1Api) -> None:
    api.create_namespaced_config_map(NS, {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    patched = api.patch_namespaced_config_map(
        "cm", NS, [{"op": "add", "path": "/data/b", "value": "2"}]
    )
    assert patched.data == {"a": "1", "b": "2"}
    with pytest.raises(ApiException) as failed:
        api.patch_namespaced_config_map("cm", NS, [{"op": "test", "path": "/data/a", "value": "9"}])
    assert failed.value.status == 422
    merged = api.patch_namespaced_config_map(
        "cm", NS, {"data": {"a": None}}, _content_type="application/merge-patch+json"
    )
    assert merged.data == {"b": "2"}
    with pytest.raises(ApiException) as stale:
        api.patch_namespaced_config_map(
            "cm", NS, {"metadata": {"resourceVersion": "1"}, "data": {"c": "3"}}
        )
    assert stale.value.status == 409


def test_secret_data_is_base64_and_string_data_folds_in(api: client.CoreV1Api) -> None:
    secret = api.create_namespaced_secret(
        NS,
        {
            "metadata": {"name": "s"},
            "data": {"a": base64.b64encode(b"A").decode()},
            "stringData": {"b": "B"},
        },
    )
    assert secret.type == "Opaque"
    assert {k: base64.b64decode(v) for k, v in secret.data.items()} == {"a": b"A", "b": b"B"}
    with pytest.raises(ApiException) as bad:
        api.create_namespaced_secret(NS, {"metadata": {"name": "t"}, "data": {"a": "not base64!"}})
    assert bad.value.status == 422


def test_service_gets_a_cluster_ip_and_keeps_it(api: client.CoreV1Api) -> None:
    svc = api.create_namespaced_service(NS, BODIES["services"]("web"))
    assert svc.spec.cluster_ip.startswith("10.96.")
    assert svc.spec.type == "ClusterIP" and svc.spec.ports[0].target_port == 8786
    body = BODIES["services"]("web")
    body["metadata"]["labels"]["x"] = "y"
    replaced = api.replace_namespaced_service("web", NS, body)
    assert replaced.spec.cluster_ip == svc.spec.cluster_ip
    lb = api.create_namespaced_service(
        NS, {"metadata": {"name": "lb"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}
    )
    assert 30000 <= lb.spec.ports[0].node_port <= 32767


def test_all_namespaces_list_and_field_selectors(api: client.CoreV1Api) -> None:
    api.create_namespace({"metadata": {"name": "other"}})
    api.create_namespaced_pod(NS, pod_body("a"))
    api.create_namespaced_pod("other", pod_body("b"))
    everywhere = api.list_pod_for_all_namespaces()
    assert sorted((p.metadata.namespace, p.metadata.name) for p in everywhere.items) == [
        ("default", "a"),
        ("other", "b"),
    ]
    only_b = api.list_pod_for_all_namespaces(field_selector="metadata.name=b")
    assert [p.metadata.name for p in only_b.items] == ["b"]
    pending = api.list_namespaced_pod(NS, field_selector="status.phase=Pending,spec.nodeName=")
    assert [p.metadata.name for p in pending.items] == ["a"]
    not_a = api.list_namespaced_pod(NS, field_selector="metadata.name!=a")
    assert not_a.items == []
    with pytest.raises(ApiException) as bad:
        api.list_namespaced_pod(NS, field_selector="spec.bogus=1")
    assert bad.value.status == 400
    with pytest.raises(ApiException) as bad_labels:
        api.list_namespaced_pod(NS, label_selector="a in (b")
    assert bad_labels.value.status == 400


def test_list_pagination(api: client.CoreV1Api) -> None:
    for i in range(5):
        api.create_namespaced_config_map(NS, {"metadata": {"name": f"cm-{i}"}})
    first = api.list_namespaced_config_map(NS, limit=2)
    assert [c.metadata.name for c in first.items] == ["cm-0", "cm-1"]
    assert first.metadata._continue
    rest = api.list_namespaced_config_map(NS, limit=10, _continue=first.metadata._continue)
    assert [c.metadata.name for c in rest.items] == ["cm-2", "cm-3", "cm-4"]
    assert not rest.metadata._continue


def test_dry_run_changes_nothing(api: client.CoreV1Api) -> None:
    created = api.create_namespaced_pod(NS, pod_body("dry"), dry_run="All")
    assert created.metadata.uid
    with pytest.raises(ApiException):
        api.read_namespaced_pod("dry", NS)


def test_delete_preconditions(api: client.CoreV1Api) -> None:
    cm = api.create_namespaced_config_map(NS, {"metadata": {"name": "pre"}})
    with pytest.raises(ApiException) as info:
        api.delete_namespaced_config_map(
            "pre",
            NS,
            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="wrong")),
        )
    assert info.value.status == 409
    api.delete_namespaced_config_map(
        "pre",
        NS,
        body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=cm.metadata.uid)),
    )


def test_finalizers_hold_deletion_until_removed(api: client.CoreV1Api) -> None:
    api.create_namespaced_config_map(
        NS, {"metadata": {"name": "fin", "finalizers": ["example.com/hold"]}}
    )
    held, status, _ = api.delete_namespaced_config_map_with_http_info("fin", NS)
    assert status == 200 and held["metadata"]["deletionTimestamp"]
    still = api.read_namespaced_config_map("fin", NS)
    assert still.metadata.deletion_timestamp is not None
    with pytest.raises(ApiException) as add:
        api.patch_namespaced_config_map(
            "fin", NS, {"metadata": {"finalizers": ["example.com/hold", "example.com/more"]}}
        )
    assert add.value.status == 422
    api.patch_namespaced_config_map("fin", NS, [{"op": "remove", "path": "/metadata/finalizers"}])
    with pytest.raises(ApiException) as gone:
        api.read_namespaced_config_map("fin", NS)
    assert gone.value.status == 404


def test_unscheduled_pods_are_deleted_at_once_scheduled_ones_gracefully(
    kube: KubeEmulator, api: client.CoreV1Api
) -> None:
    api.create_namespaced_pod(NS, pod_body("free"))
    api.delete_namespaced_pod("free", NS)
    assert api.list_namespaced_pod(NS).items == []

    api.create_namespaced_pod(NS, pod_body("bound"))
    kube.store.bind(NS, "bound", "node-a")
    terminating = api.delete_namespaced_pod("bound", NS, grace_period_seconds=20)
    assert terminating.metadata.deletion_timestamp is not None
    assert terminating.metadata.deletion_grace_period_seconds == 20
    assert api.read_namespaced_pod("bound", NS).metadata.deletion_timestamp is not None
    api.delete_namespaced_pod("bound", NS, grace_period_seconds=0)
    assert api.list_namespaced_pod(NS).items == []


def test_bearer_token_is_checked() -> None:
    with KubeEmulator(token="t0ken") as kube:
        good = kube.api_client()
        try:
            assert client.CoreV1Api(good).list_namespaced_pod(NS).items == []
        finally:
            good.close()
        bad = client.ApiClient(client.Configuration(host=kube.url))
        try:
            with pytest.raises(ApiException) as info:
                client.CoreV1Api(bad).list_namespaced_pod(NS)
            assert info.value.status == 401
        finally:
            bad.close()


def test_load_kube_config_works(kube: KubeEmulator) -> None:
    from kubernetes import config

    configuration = client.Configuration()
    config.load_kube_config(
        config_file=str(kube.kubeconfig_path), client_configuration=configuration
    )
    assert configuration.host == kube.url
    with client.ApiClient(configuration) as api_client:
        assert client.CoreV1Api(api_client).read_namespace("default").status.phase == "Active"
        version = client.VersionApi(api_client).get_code()
        assert version.major == "1"


def test_injected_failures_then_recovery(kube: KubeEmulator, api: client.CoreV1Api) -> None:
    kube.fail_next(2, method="POST")
    for _ in range(2):
        with pytest.raises(ApiException) as info:
            api.create_namespaced_config_map(NS, {"metadata": {"name": "f"}})
        assert info.value.status == 500
        assert status_of(info.value)["reason"] == "InternalError"
    api.create_namespaced_config_map(NS, {"metadata": {"name": "f"}})
    kube.fail_next(1, status=500, path="/configmaps/f")
    api.list_namespaced_config_map(NS)  # does not match the path: unaffected
    with pytest.raises(ApiException) as broken:
        api.read_namespaced_config_map("f", NS)
    assert broken.value.status == 500
    assert api.read_namespaced_config_map("f", NS).metadata.name == "f"
    kube.fail_next(1, status=429, method="POST")
    with pytest.raises(ApiException) as throttled:  # POST is not retried by urllib3
        api.create_namespaced_config_map(NS, {"metadata": {"name": "g"}})
    assert throttled.value.status == 429
    assert throttled.value.headers["Retry-After"] == "1"
    assert [r.status for r in kube.requests if r.method == "POST"] == [500, 500, 201, 429]


def test_changes_behind_the_clients_back(kube: KubeEmulator, api: client.CoreV1Api) -> None:
    api.create_namespaced_pod(NS, pod_body("victim"))
    kube.store.delete("pods", NS, "victim")
    with pytest.raises(ApiException) as info:
        api.read_namespaced_pod("victim", NS)
    assert info.value.status == 404


def test_unknown_paths_and_methods(kube: KubeEmulator, api: client.CoreV1Api) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as unknown:
        urllib.request.urlopen(kube.url + "/api/v1/namespaces/default/widgets", timeout=5)
    assert unknown.value.code == 404
    assert json.loads(unknown.value.read())["kind"] == "Status"
    unknown.value.close()
    request = urllib.request.Request(kube.url + "/api/v1/pods", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as not_allowed:
        urllib.request.urlopen(request, timeout=5)
    assert not_allowed.value.code == 405
    not_allowed.value.close()
    malformed = urllib.request.Request(
        kube.url + "/api/v1/namespaces/default/pods",
        data=b"{not json",
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(malformed, timeout=5)
    assert bad.value.code == 400
    bad.value.close()


@pytest.mark.parametrize(
    "body",
    [
        "[]",
        '"pod"',
        '{"metadata": []}',
        '{"metadata": {"name": "x", "labels": ["a"]}, "spec": {"containers": [{"name": "c", "image": "i"}]}}',
        '{"metadata": {"name": "x", "ownerReferences": {"uid": "1"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}',
        '{"metadata": {"name": "x", "finalizers": "abc"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}',
        '{"metadata": {"name": "x"}, "spec": []}',
        '{"metadata": {"name": "x"}, "spec": {"containers": ["c"]}}',
        '{"metadata": {"name": "x"}, "spec": {"containers": [{"name": "c", "image": "i", "env": [1], "ports": [{}]}]}}',
        '{"metadata": {"name": "x"}, "spec": {"volumes": [1], "containers": [{"name": "c", "image": "i"}]}}',
        '{"kind": "Secret", "metadata": {"name": "x"}}',
    ],
)
def test_malformed_bodies_are_client_errors(kube: KubeEmulator, body: str) -> None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        kube.url + "/api/v1/namespaces/default/pods",
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    status = json.loads(info.value.read())
    info.value.close()
    assert info.value.code in (400, 422), status
    assert status["kind"] == "Status" and status["status"] == "Failure"
