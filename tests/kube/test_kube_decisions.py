"""Pure decisions of the Kubernetes backend: pod health, the watch cache, pod cleanup."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dask_gateway_api.backends.kube_decisions import (
    DeletePod,
    DesiredCluster,
    ObjectCache,
    decide_cleanup,
    pod_health,
    worker_name_of,
)


def pod(
    name: str = "p",
    uid: str = "u1",
    rv: str = "10",
    *,
    phase: str | None = "Running",
    state: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    **status: Any,
) -> dict[str, Any]:
    st_: dict[str, Any] = dict(status)
    if phase is not None:
        st_["phase"] = phase
    if state is not None:
        st_["containerStatuses"] = [{"name": "c", "state": state}]
    return {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "uid": uid,
            "resourceVersion": rv,
            "labels": labels or {},
            "annotations": annotations or {},
        },
        "status": st_,
    }


# --- pod health -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj, uid, alive, phase, reason",
    [
        (None, None, False, "Gone", "the pod no longer exists"),
        (pod(uid="other"), "u1", False, "Gone", "the pod was replaced by another of the same name"),
        (pod(state={"running": {}}), "u1", True, "Running", "Running"),
        (pod(phase=None), None, True, "Pending", "Pending"),
        (
            pod(phase="Pending", state={"waiting": {"reason": "ContainerCreating"}}),
            None,
            True,
            "Pending",
            "ContainerCreating",
        ),
        (
            pod(
                phase="Pending",
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/1 nodes are available",
                    }
                ],
            ),
            None,
            True,
            "Pending",
            "Unschedulable: 0/1 nodes are available",
        ),
        (
            pod(
                phase="Pending",
                state={"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off "x"'}},
            ),
            None,
            False,
            "Broken",
            'ImagePullBackOff: Back-off "x"',
        ),
        (
            pod(phase="Pending", state={"waiting": {"reason": "ErrImagePull"}}),
            None,
            False,
            "Broken",
            "ErrImagePull",
        ),
        (
            pod(phase="Running", state={"waiting": {"reason": "CrashLoopBackOff"}}),
            None,
            False,
            "Broken",
            "CrashLoopBackOff",
        ),
        (
            pod(phase="Failed", state={"terminated": {"reason": "OOMKilled", "exitCode": 137}}),
            None,
            False,
            "Failed",
            "OOMKilled (exit code 137)",
        ),
        (
            pod(phase="Failed", reason="Evicted", message="The node was low on memory."),
            None,
            False,
            "Failed",
            "Evicted: The node was low on memory.",
        ),
        (
            pod(phase="Succeeded", state={"terminated": {"reason": "Completed", "exitCode": 0}}),
            None,
            False,
            "Succeeded",
            "Completed (exit code 0)",
        ),
        (
            pod(phase="Running", state={"terminated": {"reason": "Error", "exitCode": 1}}),
            None,
            False,
            "Failed",
            "Error (exit code 1)",
        ),
    ],
)
def test_pod_health(
    obj: dict[str, Any] | None, uid: str | None, alive: bool, phase: str, reason: str
) -> None:
    health = pod_health(obj, uid)
    assert (health.alive, health.phase, health.reason) == (alive, phase, reason)


def test_a_pod_being_deleted_is_down() -> None:
    obj = pod()
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_health(obj).phase == "Deleting" and not pod_health(obj).alive


def test_worker_name_prefers_the_exact_annotation() -> None:
    assert worker_name_of(pod(annotations={"gateway.dask.org/worker-name": "W.1"})) == "W.1"
    assert worker_name_of(pod(labels={"gateway.dask.org/worker": "w1"})) == "w1"
    assert worker_name_of(pod()) is None


# --- the watch cache --------------------------------------------------------------------


def test_cache_replace_reports_what_changed() -> None:
    cache = ObjectCache()
    assert cache.replace([pod("a"), pod("b", uid="u2")], "10") == {"a", "b"}
    assert cache.resource_version == "10"
    assert cache.replace([pod("a"), pod("c", uid="u3")], "12") == {"b", "c"}
    assert sorted(o["metadata"]["name"] for o in cache.values()) == ["a", "c"]
    # "b" was deleted: a late write-through of it is ignored.
    assert not cache.observe(pod("b", uid="u2", rv="11"))


def test_cache_applies_events_in_order_and_keeps_newer_write_through() -> None:
    cache = ObjectCache()
    assert cache.apply({"type": "ADDED", "object": pod("a", rv="5")}) == {"a"}
    assert cache.observe(pod("a", rv="7", phase="Failed"))
    # A watch event older than the write-through copy does not roll it back.
    assert cache.apply({"type": "MODIFIED", "object": pod("a", rv="6")}) == set()
    assert cache.get("a")["status"]["phase"] == "Failed"  # type: ignore[index]
    assert cache.resource_version == "6"
    assert (
        cache.apply({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}) == set()
    )
    assert cache.resource_version == "9"
    assert cache.apply({"type": "DELETED", "object": pod("a", rv="10")}) == {"a"}
    assert cache.get("a") is None
    assert cache.apply({"type": "MODIFIED", "object": pod("a", rv="11")}) == set()  # tombstone
    # A new incarnation (another uid) is welcome.
    assert cache.apply({"type": "ADDED", "object": pod("a", uid="u9", rv="12")}) == {"a"}
    assert cache.apply({"type": "ERROR", "object": {"code": 410}}) == set()


def test_cache_delete_of_an_old_incarnation_keeps_the_new_one() -> None:
    cache = ObjectCache()
    cache.apply({"type": "ADDED", "object": pod("a", uid="new", rv="5")})
    assert cache.apply({"type": "DELETED", "object": pod("a", uid="old", rv="6")}) == set()
    assert cache.get("a") is not None
    assert not cache.forget("a", uid="old")
    assert cache.forget("a", uid="new") and "a" not in cache


@given(
    st.lists(
        st.tuples(
            st.sampled_from("abc"), st.sampled_from(["ADDED", "MODIFIED", "DELETED", "observe"])
        ),
        max_size=40,
    )
)
def test_cache_converges_to_the_server_state(ops: list[tuple[str, str]]) -> None:
    """Whatever mix of watch events and write-throughs, the cache ends equal to the server
    (each op is a change on the server with the next resourceVersion; a write-through is
    our own create/patch answer, seen before its watch event)."""
    server: dict[str, dict[str, Any]] = {}
    incarnation = {n: 0 for n in "abc"}
    cache = ObjectCache()
    pending: list[dict[str, Any]] = []
    for rv, (name, op) in enumerate(ops, start=1):
        if op == "DELETED":
            if name not in server:
                continue
            obj = dict(server.pop(name))
            obj["metadata"] = dict(obj["metadata"], resourceVersion=str(rv))
            pending.append({"type": "DELETED", "object": obj})
            incarnation[name] += 1
            continue
        kind = "MODIFIED" if name in server else "ADDED"
        obj = pod(name, uid=f"{name}{incarnation[name]}", rv=str(rv), phase=op)
        server[name] = obj
        pending.append({"type": kind, "object": obj})
        if op == "observe":
            cache.observe(obj)
    for event in pending:
        cache.apply(event)
    assert {o["metadata"]["name"]: o for o in cache.values()} == server


# --- cleanup ----------------------------------------------------------------------------


def labelled(name: str, cluster: str, component: str, worker: str | None = None) -> dict[str, Any]:
    labels = {"gateway.dask.org/cluster": cluster, "gateway.dask.org/component": component}
    annotations = {"gateway.dask.org/worker-name": worker} if worker else {}
    return pod(name, uid=f"uid-{name}", labels=labels, annotations=annotations)


def test_cleanup_decisions() -> None:
    pods = [
        labelled("s-run", "run", "scheduler"),
        labelled("w-run-known", "run", "worker", "w1"),
        labelled("w-run-orphan", "run", "worker", "w2"),
        labelled("w-run-young", "run", "worker", "w3"),
        labelled("s-done", "done", "scheduler"),
        labelled("w-done", "done", "worker", "w1"),
        labelled("w-stopping", "stopping", "worker", "zz"),
        labelled("s-unknown", "unknown", "scheduler"),
        pod("unlabelled", uid="uid-unlabelled"),
    ]
    deleting = labelled("w-run-deleting", "run", "worker", "w9")
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    pods.append(deleting)
    desired = {
        "run": DesiredCluster("RUNNING", frozenset({"w1"})),
        "done": DesiredCluster("FAILED"),
        "stopping": DesiredCluster("STOPPING"),
    }
    first_seen = {"uid-w-run-orphan": 0.0, "uid-w-run-young": 95.0}
    actions = decide_cleanup(pods, desired, first_seen, now=100.0, grace=10.0)
    assert actions == [
        DeletePod("w-run-orphan", "uid-w-run-orphan", "no live worker record claims it"),
        DeletePod("s-done", "uid-s-done", "its cluster is FAILED"),
        DeletePod("w-done", "uid-w-done", "its cluster is FAILED"),
    ]
    # Once old enough, the young orphan goes too; an unseen pod starts its grace now.
    later = decide_cleanup(pods, desired, first_seen, now=106.0, grace=10.0)
    assert "w-run-young" in {a.name for a in later}
    assert decide_cleanup(pods[2:3], desired, {}, now=1000.0, grace=10.0) == []
