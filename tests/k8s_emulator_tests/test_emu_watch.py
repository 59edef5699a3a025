"""Watch streams through the official ``kubernetes.watch.Watch``: resume, 410, timeouts."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.k8s_emulator import KubeEmulator, poll_until

NS = "default"


def pod(name: str, **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "img:1"}]},
    }


def collect(stream: Iterator[dict[str, Any]], count: int) -> list[tuple[str, str]]:
    events = []
    for event in stream:
        events.append((event["type"], event["object"].metadata.name))
        if len(events) == count:
            break
    return events


def test_initial_state_then_live_events_until_timeout(api: client.CoreV1Api) -> None:
    api.create_namespaced_pod(NS, pod("a"))
    api.create_namespaced_pod(NS, pod("b"))
    w = watch.Watch()
    seen: list[tuple[str, str]] = []
    started = time.monotonic()
    for event in w.stream(api.list_namespaced_pod, NS, timeout_seconds=1):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 2:
            api.patch_namespaced_pod("a", NS, {"metadata": {"labels": {"x": "1"}}})
            api.delete_namespaced_pod("b", NS)
    elapsed = time.monotonic() - started
    assert seen == [("ADDED", "a"), ("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert 0.9 < elapsed < 4, elapsed


def test_resume_from_resource_version(api: client.CoreV1Api) -> None:
    api.create_namespaced_pod(NS, pod("old"))
    rv = api.list_namespaced_pod(NS).metadata.resource_version
    api.create_namespaced_pod(NS, pod("new"))
    api.delete_namespaced_pod("old", NS)
    w = watch.Watch()
    events = collect(
        w.stream(api.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=5), 2
    )
    assert events == [("ADDED", "new"), ("DELETED", "old")]
    # resuming from the rv of the first event replays only the second
    first_rv = api.list_namespaced_pod(NS).metadata.resource_version
    api.create_namespaced_pod(NS, pod("third"))
    events = collect(
        w.stream(api.list_namespaced_pod, NS, resource_version=first_rv, timeout_seconds=5), 1
    )
    assert events == [("ADDED", "third")]


def test_expired_resource_version_gives_410_then_relist_recovers(
    kube: KubeEmulator, api: client.CoreV1Api
) -> None:
    api.create_namespaced_pod(NS, pod("a"))
    rv = api.list_namespaced_pod(NS).metadata.resource_version
    kube.expire_history()
    api.create_namespaced_pod(NS, pod("b"))

    with pytest.raises(ApiException) as info:
        for _ in watch.Watch().stream(
            api.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=5
        ):
            pass
    assert info.value.status == 410
    assert "Expired" in info.value.reason and "too old resource version" in info.value.reason

    # Without timeout_seconds the client retries once from the same version, then gives up.
    with pytest.raises(ApiException) as again:
        for _ in watch.Watch().stream(api.list_namespaced_pod, NS, resource_version=rv):
            pass
    assert again.value.status == 410
    watches = [r for r in kube.requests if r.query.get("watch") == "true"]
    assert [r.query.get("resourceVersion") for r in watches[-2:]] == [rv, rv]

    listing = api.list_namespaced_pod(NS)
    assert sorted(p.metadata.name for p in listing.items) == ["a", "b"]
    api.create_namespaced_pod(NS, pod("c"))
    resumed = collect(
        watch.Watch().stream(
            api.list_namespaced_pod,
            NS,
            resource_version=listing.metadata.resource_version,
            timeout_seconds=5,
        ),
        1,
    )
    assert resumed == [("ADDED", "c")]


def test_history_is_bounded() -> None:
    with KubeEmulator(history_size=5) as kube:
        api_client = kube.api_client()
        try:
            api = client.CoreV1Api(api_client)
            api.create_namespaced_config_map(NS, {"metadata": {"name": "cm"}})
            rv = api.list_namespaced_config_map(NS).metadata.resource_version
            for i in range(4):
                api.patch_namespaced_config_map("cm", NS, {"data": {"i": str(i)}})
            assert (
                len(
                    collect(
                        watch.Watch().stream(
                            api.list_namespaced_config_map,
                            NS,
                            resource_version=rv,
                            timeout_seconds=5,
                        ),
                        4,
                    )
                )
                == 4
            )
            for i in range(4):
                api.patch_namespaced_config_map("cm", NS, {"data": {"j": str(i)}})
            with pytest.raises(ApiException) as info:
                for _ in watch.Watch().stream(
                    api.list_namespaced_config_map, NS, resource_version=rv, timeout_seconds=5
                ):
                    pass
            assert info.value.status == 410
        finally:
            api_client.close()


def test_raw_410_is_an_error_event_in_a_200_stream(kube: KubeEmulator) -> None:
    kube.store.create("configmaps", NS, {"metadata": {"name": "x"}})
    kube.expire_history()
    url = f"{kube.url}/api/v1/namespaces/{NS}/configmaps?watch=true&resourceVersion=1001&timeoutSeconds=5"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        line = json.loads(response.readline())
    assert line["type"] == "ERROR"
    obj = line["object"]
    assert (obj["kind"], obj["status"], obj["reason"], obj["code"]) == (
        "Status",
        "Failure",
        "Expired",
        410,
    )


def test_selector_transitions_become_added_and_deleted(api: client.CoreV1Api) -> None:
    api.create_namespaced_pod(NS, pod("p", app="x"))
    api.create_namespaced_pod(NS, pod("other", app="y"))
    rv = api.list_namespaced_pod(NS).metadata.resource_version
    api.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"app": "y"}}})
    api.patch_namespaced_pod("other", NS, {"metadata": {"labels": {"tier": "1"}}})
    api.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"app": "x"}}})
    api.patch_namespaced_pod("p", NS, {"metadata": {"labels": {"extra": "1"}}})
    stream = watch.Watch().stream(
        api.list_namespaced_pod, NS, label_selector="app=x", resource_version=rv, timeout_seconds=5
    )
    assert collect(stream, 3) == [("DELETED", "p"), ("ADDED", "p"), ("MODIFIED", "p")]
    field_stream = watch.Watch().stream(
        api.list_namespaced_pod, NS, field_selector="metadata.name=other", timeout_seconds=5
    )
    assert collect(field_stream, 1) == [("ADDED", "other")]


def test_all_namespaces_watch(api: client.CoreV1Api) -> None:
    api.create_namespace({"metadata": {"name": "two"}})
    rv = api.list_pod_for_all_namespaces().metadata.resource_version
    api.create_namespaced_pod(NS, pod("a"))
    api.create_namespaced_pod("two", pod("b"))
    stream = watch.Watch().stream(
        api.list_pod_for_all_namespaces, resource_version=rv, timeout_seconds=5
    )
    events = []
    for event in stream:
        events.append((event["object"].metadata.namespace, event["object"].metadata.name))
        if len(events) == 2:
            break
    assert events == [("default", "a"), ("two", "b")]


def test_closed_watch_is_resumed_by_the_client_from_its_last_version(
    kube: KubeEmulator, api: client.CoreV1Api
) -> None:
    w = watch.Watch()
    events: queue.Queue[tuple[str, str]] = queue.Queue()

    def consume() -> None:
        for event in w.stream(api.list_namespaced_pod, NS):
            events.put((event["type"], event["object"].metadata.name))
            if event["object"].metadata.name == "stop":
                return

    api.create_namespaced_pod(NS, pod("first"))
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        assert events.get(timeout=10) == ("ADDED", "first")
        first_rv = api.read_namespaced_pod("first", NS).metadata.resource_version
        kube.close_watches()  # like an apiserver restart: the stream just ends
        watches = poll_until(
            lambda: (
                (found := [r for r in kube.requests if r.query.get("watch") == "true"])[1:]
                and found
            ),
            timeout=10,
            what="the client reconnects",
        )
        assert watches[1].query.get("resourceVersion") == first_rv
        api.create_namespaced_pod(NS, pod("second"))
        assert events.get(timeout=10) == ("ADDED", "second")
    finally:
        api.create_namespaced_pod(NS, pod("stop"))
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_bookmarks_advance_the_clients_version() -> None:
    with KubeEmulator(bookmark_interval=0.05) as kube:
        api_client = kube.api_client()
        try:
            api = client.CoreV1Api(api_client)
            api.create_namespaced_pod(NS, pod("a"))
            kube.store.create("secrets", NS, {"metadata": {"name": "unrelated"}})
            w = watch.Watch()
            kinds = []
            for event in w.stream(
                api.list_namespaced_pod, NS, allow_watch_bookmarks=True, timeout_seconds=5
            ):
                kinds.append(event["type"])
                if event["type"] == "BOOKMARK":
                    break
            assert kinds[0] == "ADDED" and kinds[-1] == "BOOKMARK"
            assert int(w.resource_version) == kube.store.resource_version
        finally:
            api_client.close()


def test_send_initial_events_ends_with_a_marked_bookmark(kube: KubeEmulator) -> None:
    kube.store.create("configmaps", NS, {"metadata": {"name": "one"}})
    url = (
        f"{kube.url}/api/v1/namespaces/{NS}/configmaps?watch=1&sendInitialEvents=true"
        "&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=5"
    )
    with urllib.request.urlopen(url, timeout=10) as response:
        first = json.loads(response.readline())
        second = json.loads(response.readline())
    assert first["type"] == "ADDED" and first["object"]["metadata"]["name"] == "one"
    assert second["type"] == "BOOKMARK"
    assert second["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


def test_server_notices_a_departed_watcher(kube: KubeEmulator) -> None:
    url = f"{kube.url}/api/v1/namespaces/{NS}/pods?watch=true"
    response = urllib.request.urlopen(url, timeout=10)
    server = kube._server
    assert server is not None
    poll_until(lambda: server.connections, timeout=10, what="the watch is open")
    response.close()
    poll_until(lambda: not server.connections, timeout=10, what="the server notices the departure")
