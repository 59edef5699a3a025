"""Owner-reference garbage collection and namespace deletion."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from tests.k8s_emulator import KubeEmulator

NS = "default"


def owned_by(*owners: Any) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": o.kind,
            "name": o.metadata.name,
            "uid": o.metadata.uid,
            "blockOwnerDeletion": True,
        }
        for o in owners
    ]


def pod(name: str, owners: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if owners:
        meta["ownerReferences"] = owners
    return {"metadata": meta, "spec": {"containers": [{"name": "main", "image": "img:1"}]}}


def gone(kube: KubeEmulator, plural: str, name: str) -> None:
    kube.wait_for(plural, NS, name, lambda obj: obj is None, timeout=10)


def test_background_cascade_through_two_levels(kube: KubeEmulator, api: client.CoreV1Api) -> None:
    scheduler = api.create_namespaced_pod(NS, pod("scheduler"))
    secret = api.create_namespaced_secret(
        NS, {"metadata": {"name": "creds", "ownerReferences": owned_by(scheduler)}}
    )
    worker = api.create_namespaced_pod(NS, pod("worker", owned_by(scheduler)))
    api.create_namespaced_config_map(
        NS, {"metadata": {"name": "leaf", "ownerReferences": owned_by(worker)}}
    )
    api.create_namespaced_config_map(NS, {"metadata": {"name": "unrelated"}})
    api.delete_namespaced_pod("scheduler", NS)
    for plural, name in (("secrets", "creds"), ("pods", "worker"), ("configmaps", "leaf")):
        gone(kube, plural, name)
    assert [c.metadata.name for c in api.list_namespaced_config_map(NS).items] == ["unrelated"]
    assert secret.metadata.uid not in {s.metadata.uid for s in api.list_namespaced_secret(NS).items}


def test_dependent_with_another_live_owner_only_loses_the_reference(
    kube: KubeEmulator, api: client.CoreV1Api
) -> None:
    a = api.create_namespaced_config_map(NS, {"metadata": {"name": "a"}})
    b = api.create_namespaced_config_map(NS, {"metadata": {"name": "b"}})
    api.create_namespaced_pod(NS, pod("shared", owned_by(a, b)))
    api.delete_namespaced_config_map("a", NS)
    kept = kube.wait_for(
        "pods",
        NS,
        "shared",
        lambda obj: obj is not None and len(obj["metadata"]["ownerReferences"]) == 1,
        timeout=10,
    )
    assert kept is not None and kept["metadata"]["ownerReferences"][0]["uid"] == b.metadata.uid


def test_orphan_propagation_keeps_dependents(kube: KubeEmulator, api: client.CoreV1Api) -> None:
    owner = api.create_namespaced_config_map(NS, {"metadata": {"name": "owner"}})
    api.create_namespaced_pod(NS, pod("child", owned_by(owner)))
    api.delete_namespaced_config_map("owner", NS, propagation_policy="Orphan")
    gone(kube, "configmaps", "owner")
    child = api.read_namespaced_pod("child", NS)
    assert child.metadata.owner_references is None


def test_foreground_deletion_waits_for_dependents(
    kube: KubeEmulator, api: client.CoreV1Api
) -> None:
    owner = api.create_namespaced_config_map(NS, {"metadata": {"name": "owner"}})
    api.create_namespaced_config_map(
        NS,
        {
            "metadata": {
                "name": "held",
                "finalizers": ["example.com/hold"],
                "ownerReferences": owned_by(owner),
            }
        },
    )
    api.delete_namespaced_config_map("owner", NS, propagation_policy="Foreground")
    waiting = kube.wait_for(
        "configmaps",
        NS,
        "held",
        lambda obj: obj is not None and bool(obj["metadata"].get("deletionTimestamp")),
        timeout=10,
    )
    assert waiting is not None
    still = api.read_namespaced_config_map("owner", NS)
    assert still.metadata.deletion_timestamp is not None
    assert "foregroundDeletion" in still.metadata.finalizers
    api.patch_namespaced_config_map("held", NS, {"metadata": {"finalizers": None}})
    gone(kube, "configmaps", "held")
    gone(kube, "configmaps", "owner")


def test_object_created_with_a_missing_owner_is_collected(
    kube: KubeEmulator, api: client.CoreV1Api
) -> None:
    ghost = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "ghost",
            "uid": "00000000-0000-0000-0000-000000000000",
        }
    ]
    api.create_namespaced_secret(NS, {"metadata": {"name": "orphan", "ownerReferences": ghost}})
    gone(kube, "secrets", "orphan")


def test_owner_in_another_namespace_does_not_count(
    kube: KubeEmulator, api: client.CoreV1Api
) -> None:
    api.create_namespace({"metadata": {"name": "elsewhere"}})
    owner = api.create_namespaced_config_map("elsewhere", {"metadata": {"name": "owner"}})
    api.create_namespaced_config_map(
        NS, {"metadata": {"name": "cross", "ownerReferences": owned_by(owner)}}
    )
    gone(kube, "configmaps", "cross")


def test_deleting_a_namespace_deletes_its_content(
    kube: KubeEmulator, api: client.CoreV1Api
) -> None:
    api.create_namespace({"metadata": {"name": "doomed"}})
    api.create_namespaced_pod("doomed", pod("p"))
    api.create_namespaced_secret("doomed", {"metadata": {"name": "s"}})
    api.delete_namespace("doomed")
    kube.wait_for("namespaces", None, "doomed", lambda obj: obj is None, timeout=10)
    assert api.list_pod_for_all_namespaces().items == []
    assert [s.metadata.name for s in api.list_secret_for_all_namespaces().items] == []
