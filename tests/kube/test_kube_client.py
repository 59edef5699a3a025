"""The threaded client and the informers, against the emulated API server (real HTTP)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from dask_gateway_api.backends.kube_client import (
    Informer,
    KubeClient,
    KubeConfigError,
    KubeError,
    load_api_client,
)
from tests.k8s_emulator import KubeEmulator

NS = "default"
SELECTOR = "app=test"
DEADLINE = 20


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.2) as emulator:
        yield emulator


@pytest.fixture
def client(kube: KubeEmulator) -> Iterator[KubeClient]:
    api_client, namespace = load_api_client(str(kube.kubeconfig_path), None)
    assert namespace == NS  # the kubeconfig context's namespace
    try:
        yield KubeClient(api_client, NS, concurrency=2, request_timeout=5)
    finally:
        api_client.close()


def secret(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {"app": "test", **labels}},
        "data": {},
    }


def names(informer: Informer) -> set[str]:
    return {o["metadata"]["name"] for o in informer.values()}


async def wait_for(informer: Informer, predicate: Any) -> None:
    with trio.fail_after(DEADLINE):
        while not predicate():
            await informer.wait_any_change()


def test_bad_kubeconfig_is_a_clear_error(tmp_path: Any) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(KubeConfigError, match="cannot load the Kubernetes configuration"):
        load_api_client(str(missing), None)


async def test_crud_and_errors(client: KubeClient) -> None:
    with trio.fail_after(DEADLINE):
        created = await client.create("secrets", secret("a"))
        assert created["metadata"]["uid"]
        with pytest.raises(KubeError) as info:
            await client.create("secrets", secret("a"))
        assert (info.value.status, info.value.reason) == (409, "AlreadyExists")
        assert not info.value.retryable
        patched = await client.patch("secrets", "a", {"metadata": {"annotations": {"k": "v"}}})
        assert patched["metadata"]["annotations"] == {"k": "v"}
        assert patched["metadata"]["labels"] == {"app": "test"}  # merge patch
        assert (await client.get("secrets", "a"))["metadata"]["annotations"] == {"k": "v"}  # type: ignore[index]
        items, rv = await client.list("secrets", SELECTOR)
        assert [i["metadata"]["name"] for i in items] == ["a"] and rv
        assert items[0]["kind"] == "Secret"
        # A delete with the wrong uid precondition does nothing (and says so).
        assert not await client.delete("secrets", "a", uid="not-its-uid")
        assert await client.delete("secrets", "a", grace=0)
        assert not await client.delete("secrets", "a")
        assert await client.get("secrets", "a") is None


async def test_server_errors_are_translated(kube: KubeEmulator, client: KubeClient) -> None:
    kube.fail_next(1, status=500, method="GET")
    with trio.fail_after(DEADLINE), pytest.raises(KubeError) as info:
        await client.get("secrets", "x")
    assert info.value.status == 500 and info.value.retryable
    assert info.value.reason == "InternalError"


async def test_unreachable_server_is_status_0(kube: KubeEmulator) -> None:
    api_client, _ = load_api_client(str(kube.kubeconfig_path), None)
    kube.close()
    try:
        c = KubeClient(api_client, NS, request_timeout=2, connect_timeout=2)
        with trio.fail_after(DEADLINE), pytest.raises(KubeError) as info:
            await c.list("secrets", SELECTOR)
        assert info.value.status == 0 and info.value.retryable
    finally:
        api_client.close()


async def test_informer_lists_then_follows_and_resumes(
    kube: KubeEmulator, client: KubeClient
) -> None:
    await client.create("secrets", secret("before"))
    await client.create("secrets", {**secret("other"), "metadata": {"name": "other"}})
    informer = Informer(client, "secrets", SELECTOR, watch_timeout=1)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE):
            await nursery.start(informer.run)
            assert names(informer) == {"before"}  # the selector applies
            changed = trio.Event()

            async def watch_one() -> None:
                await informer.wait_change("after")
                changed.set()

            nursery.start_soon(watch_one)
            await trio.testing.wait_all_tasks_blocked()
            await client.create("secrets", secret("after"))
            await changed.wait()
            assert names(informer) == {"before", "after"}

            # The server ends the watch (timeoutSeconds=1, and by force): it is resumed
            # from the last resourceVersion, without listing again and without a gap.
            await trio.sleep(1.2)
            kube.close_watches()
            kube.store.delete("secrets", NS, "before")
            await wait_for(informer, lambda: names(informer) == {"after"})
            assert informer.relists == 1
        nursery.cancel_scope.cancel()


async def test_informer_relists_after_410(kube: KubeEmulator, client: KubeClient) -> None:
    await client.create("secrets", secret("a"))
    await client.create("secrets", secret("b"))
    informer = Informer(client, "secrets", SELECTOR, watch_timeout=60)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE):
            await nursery.start(informer.run)
            # Changes happen while the watch is down and the history is lost: resuming
            # answers 410 Expired, the informer lists again and sees the deletion.
            kube.fail_next(1, status=500, method="GET", path="/secrets")  # the next watch fails
            kube.close_watches()
            kube.store.delete("secrets", NS, "a")
            await client.create("secrets", secret("c"))
            kube.expire_history()
            await wait_for(informer, lambda: names(informer) == {"b", "c"})
            assert informer.relists == 2
            # ... and follows from the new list's resourceVersion.
            await client.create("secrets", secret("d"))
            await wait_for(informer, lambda: names(informer) == {"b", "c", "d"})
        nursery.cancel_scope.cancel()


async def test_informer_write_through_is_not_undone(kube: KubeEmulator, client: KubeClient) -> None:
    informer = Informer(client, "secrets", SELECTOR)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(DEADLINE):
            await nursery.start(informer.run)
            obj = await client.create("secrets", secret("x"))
            informer.observe(obj)
            assert informer.get("x") is not None  # before its watch event arrives
            patched = await client.patch("secrets", "x", {"metadata": {"annotations": {"a": "1"}}})
            informer.observe(patched)
            await trio.sleep(0.3)  # the ADDED and MODIFIED events arrive meanwhile
            assert informer.get("x")["metadata"]["annotations"] == {"a": "1"}  # type: ignore[index]
        nursery.cancel_scope.cancel()
