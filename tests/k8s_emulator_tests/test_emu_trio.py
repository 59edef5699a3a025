"""The emulators used from trio code, the way the Kubernetes backend will use them:
blocking client calls in worker threads, watch events handed to trio over a channel."""

from __future__ import annotations

from typing import Any

import trio
from kubernetes import client, watch

from tests.k8s_emulator import KubeEmulator

NS = "default"


def sleeper(name: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "img:1",
                    "command": ["python", "-c", "import time; time.sleep(600)"],
                }
            ],
        },
    }


async def test_trio_program_drives_pods_and_consumes_a_watch() -> None:
    with KubeEmulator(kubelet=True) as kube:
        api_client = kube.api_client()
        api = client.CoreV1Api(api_client)
        send, receive = trio.open_memory_channel[tuple[str, str, str]](100)
        w = watch.Watch()

        def pump() -> None:  # runs in a worker thread
            for event in w.stream(api.list_namespaced_pod, NS, timeout_seconds=20):
                obj = event["object"]
                trio.from_thread.run(
                    send.send, (event["type"], obj.metadata.name, obj.status.phase)
                )
                if event["type"] == "DELETED":
                    return

        try:
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, pump)
                    await trio.to_thread.run_sync(api.create_namespaced_pod, NS, sleeper("p"))
                    seen = []
                    async for kind, name, phase in receive:
                        seen.append((kind, name, phase))
                        if phase == "Running":
                            break
                    assert seen[0] == ("ADDED", "p", "Pending")
                    running = await kube.await_for(
                        "pods",
                        NS,
                        "p",
                        lambda o: o is not None and o["status"]["phase"] == "Running",
                    )
                    assert running is not None and running["status"]["podIP"]
                    await trio.to_thread.run_sync(api.delete_namespaced_pod, "p", NS)
                    async for kind, name, phase in receive:
                        if kind == "DELETED":
                            assert (name, phase) == ("p", "Failed")  # terminated by SIGTERM
                            break
                    assert await kube.await_for("pods", NS, "p", lambda o: o is None) is None
        finally:
            api_client.close()
