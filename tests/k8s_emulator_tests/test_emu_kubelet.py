"""The kubelet emulator: pods become real local processes with Kubernetes-like status."""

from __future__ import annotations

import os
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from tests.k8s_emulator import KubeEmulator, poll_until

NS = "default"
TIMEOUT = 15

#: serves 503 until the file named by $READY_FILE exists, then 200; logs each request.
PROBED_SERVER = """
import http.server, os, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if os.path.exists(os.environ["READY_FILE"]) else 503
        print("probe", self.path, code, flush=True)
        self.send_response(code)
        self.end_headers()
        self.wfile.write(os.environ["POD_NAME"].encode())
    def log_message(self, *args):
        pass
http.server.HTTPServer((sys.argv[1], 8788), Handler).serve_forever()
"""


def container(script: str, *args: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "main",
        "image": "ghcr.io/dask/dask:latest",
        "command": ["python", "-c", script, *args],
        **extra,
    }


def pod(
    name: str, *containers: dict[str, Any], restart: str = "Never", **spec: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"app": "emu"}},
        "spec": {"restartPolicy": restart, "containers": list(containers), **spec},
    }


def phase(name: str, wanted: str):  # noqa: ANN201 - predicate factory
    return lambda obj: obj is not None and obj["status"].get("phase") == wanted


def condition(obj: dict[str, Any] | None, kind: str) -> str | None:
    for cond in (obj or {}).get("status", {}).get("conditions") or []:
        if cond["type"] == kind:
            return cond["status"]
    return None


def main_state(obj: dict[str, Any] | None) -> dict[str, Any]:
    statuses = (obj or {}).get("status", {}).get("containerStatuses") or [{}]
    return statuses[0].get("state") or {}


def waiting_reason(obj: dict[str, Any] | None) -> str | None:
    return main_state(obj).get("waiting", {}).get("reason")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


POD_IP_ENV = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
POD_NAME_ENV = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}


def test_http_pod_becomes_ready_only_after_its_readiness_probe(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api, tmp_path: Path
) -> None:
    kube = kubelet_kube
    ready_file = tmp_path / "ready"
    spec = container(
        PROBED_SERVER,
        "$(POD_IP)",
        env=[POD_IP_ENV, POD_NAME_ENV, {"name": "READY_FILE", "value": str(ready_file)}],
        ports=[{"name": "api", "containerPort": 8788}],
        readinessProbe={"httpGet": {"path": "/api/health", "port": "api"}, "periodSeconds": 5},
    )
    kapi.create_namespaced_pod(NS, pod("web", spec))
    kube.wait_for("pods", NS, "web", phase("web", "Running"), timeout=TIMEOUT)
    poll_until(
        lambda: "probe /api/health 503" in kube.kubelet.logs(NS, "web"),
        timeout=TIMEOUT,
        what="a failed probe",
    )  # type: ignore[union-attr]
    running = kapi.read_namespaced_pod("web", NS)
    assert condition(kube.store.get("pods", NS, "web"), "Ready") == "False"
    assert running.status.container_statuses[0].ready is False
    assert running.status.container_statuses[0].state.running is not None

    ready_file.touch()
    ready = kube.wait_for(
        "pods", NS, "web", lambda obj: condition(obj, "Ready") == "True", timeout=TIMEOUT
    )
    assert ready is not None
    pod_ip = ready["status"]["podIP"]
    assert pod_ip.startswith("127.") and pod_ip != "127.0.0.1"
    assert (
        condition(ready, "ContainersReady") == "True" and condition(ready, "PodScheduled") == "True"
    )
    with urllib.request.urlopen(f"http://{pod_ip}:8788/", timeout=5) as response:
        assert response.read() == b"web"
    typed = kapi.read_namespaced_pod("web", NS)
    assert typed.spec.node_name == "emulated-node"
    assert typed.status.host_ip == "127.0.0.1" and typed.status.start_time is not None
    assert typed.status.container_statuses[0].ready is True
    assert "probe /api/health 200" in kapi.read_namespaced_pod_log("web", NS)


def test_pods_get_distinct_loopback_addresses_for_the_same_port(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api, tmp_path: Path
) -> None:
    kube = kubelet_kube
    (tmp_path / "ready").touch()
    env = [POD_IP_ENV, POD_NAME_ENV, {"name": "READY_FILE", "value": str(tmp_path / "ready")}]
    probe = {"httpGet": {"path": "/", "port": 8788}}
    for name in ("one", "two"):
        kapi.create_namespaced_pod(
            NS, pod(name, container(PROBED_SERVER, "$(POD_IP)", env=env, readinessProbe=probe))
        )
    ips = set()
    for name in ("one", "two"):
        obj = kube.wait_for(
            "pods", NS, name, lambda obj: condition(obj, "Ready") == "True", timeout=TIMEOUT
        )
        assert obj is not None
        ips.add(obj["status"]["podIP"])
        with urllib.request.urlopen(
            f"http://{obj['status']['podIP']}:8788/", timeout=5
        ) as response:
            assert response.read() == name.encode()
    assert len(ips) == 2


READER = """
import os, sys
print("file", open(sys.argv[1]).read())
print("name", sys.argv[2])
print("env", os.environ["TOKEN"], os.environ["NS"], os.environ["CERT_PATH"].endswith("/dask.crt"))
print("mode", oct(os.stat(sys.argv[1]).st_mode & 0o777))
print("exists", os.path.exists("/etc/" + "dask-credentials"))  # split: args are rewritten too
"""


def test_secret_volume_env_sources_and_expansion(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    kube = kubelet_kube
    kapi.create_namespaced_secret(
        NS, {"metadata": {"name": "creds"}, "stringData": {"api-token": "t0k", "dask.crt": "CERT"}}
    )
    spec = container(
        READER,
        "/etc/dask-credentials/api-token",
        "$(POD_NAME)",
        env=[
            POD_NAME_ENV,
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "api-token"}}},
            {"name": "CERT_PATH", "value": "/etc/dask-credentials/dask.crt"},
        ],
        volumeMounts=[{"name": "creds", "mountPath": "/etc/dask-credentials", "readOnly": True}],
    )
    body = pod(
        "reader",
        spec,
        volumes=[{"name": "creds", "secret": {"secretName": "creds", "defaultMode": 0o600}}],
    )
    kapi.create_namespaced_pod(NS, body)
    done = kube.wait_for("pods", NS, "reader", phase("reader", "Succeeded"), timeout=TIMEOUT)
    terminated = main_state(done)["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    log = kapi.read_namespaced_pod_log("reader", NS)
    assert "file t0k" in log
    assert "name reader" in log
    assert "env t0k default True" in log
    assert "mode 0o600" in log
    assert "exists False" in log  # the real mount path is not touched: it was rewritten


def test_missing_secret_blocks_start_until_it_exists(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    kube = kubelet_kube
    spec = container(
        "import os; print(os.environ['TOKEN'])",
        env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "t"}}}],
    )
    kapi.create_namespaced_pod(NS, pod("patient", spec))
    blocked = kube.wait_for(
        "pods",
        NS,
        "patient",
        lambda obj: waiting_reason(obj) == "CreateContainerConfigError",
        timeout=TIMEOUT,
    )
    assert blocked is not None and blocked["status"]["phase"] == "Pending"
    assert 'secret "late" not found' in main_state(blocked)["waiting"]["message"]
    kapi.create_namespaced_secret(NS, {"metadata": {"name": "late"}, "stringData": {"t": "now"}})
    kube.wait_for("pods", NS, "patient", phase("patient", "Succeeded"), timeout=TIMEOUT)
    assert kapi.read_namespaced_pod_log("patient", NS).strip() == "now"


@pytest.mark.parametrize(
    ("code", "wanted", "reason"), [(0, "Succeeded", "Completed"), (1, "Failed", "Error")]
)
def test_exit_code_decides_the_phase(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api, code: int, wanted: str, reason: str
) -> None:
    kapi.create_namespaced_pod(NS, pod("exit", container(f"raise SystemExit({code})")))
    done = kubelet_kube.wait_for("pods", NS, "exit", phase("exit", wanted), timeout=TIMEOUT)
    terminated = main_state(done)["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (code, reason)
    assert condition(done, "Ready") == "False"
    typed = kapi.read_namespaced_pod("exit", NS)
    assert typed.status.container_statuses[0].state.terminated.exit_code == code


def test_restart_policy_always_restarts_with_backoff(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    kapi.create_namespaced_pod(
        NS, pod("crashy", container("raise SystemExit(3)"), restart="Always")
    )

    def restarted_twice(obj: dict[str, Any] | None) -> bool:
        statuses = (obj or {}).get("status", {}).get("containerStatuses") or []
        return bool(statuses) and statuses[0]["restartCount"] >= 2

    obj = kubelet_kube.wait_for("pods", NS, "crashy", restarted_twice, timeout=TIMEOUT)
    assert obj is not None and obj["status"]["phase"] == "Running"
    status = obj["status"]["containerStatuses"][0]
    assert status["lastState"]["terminated"]["exitCode"] == 3
    kubelet_kube.wait_for(
        "pods", NS, "crashy", lambda o: waiting_reason(o) == "CrashLoopBackOff", timeout=TIMEOUT
    )


def test_deleting_a_pod_kills_its_process(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    kube = kubelet_kube
    kapi.create_namespaced_pod(NS, pod("sleeper", container("import time; time.sleep(600)")))
    kube.wait_for("pods", NS, "sleeper", phase("sleeper", "Running"), timeout=TIMEOUT)
    pid = kube.kubelet.pid(NS, "sleeper")  # type: ignore[union-attr]
    assert pid is not None and alive(pid)
    rv = kapi.read_namespaced_pod("sleeper", NS).metadata.resource_version
    terminating = kapi.delete_namespaced_pod("sleeper", NS)
    assert terminating.metadata.deletion_timestamp is not None
    events = []
    for event in watch.Watch().stream(
        kapi.list_namespaced_pod, NS, resource_version=rv, timeout_seconds=TIMEOUT
    ):
        events.append(event)
        if event["type"] == "DELETED":
            break
    assert events[-1]["type"] == "DELETED"
    final = events[-1]["object"].status
    assert final.phase == "Failed"
    assert final.container_statuses[0].state.terminated.exit_code == 143  # SIGTERM
    assert not alive(pid)


def test_sigterm_ignoring_process_is_killed_after_the_grace_period(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    kube = kubelet_kube
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('armed', flush=True); time.sleep(600)"
    kapi.create_namespaced_pod(
        NS, pod("stubborn", container(script), terminationGracePeriodSeconds=1)
    )
    kube.wait_for("pods", NS, "stubborn", phase("stubborn", "Running"), timeout=TIMEOUT)
    poll_until(
        lambda: "armed" in kube.kubelet.logs(NS, "stubborn"),
        timeout=TIMEOUT,
        what="SIGTERM ignored",
    )  # type: ignore[union-attr]
    pid = kube.kubelet.pid(NS, "stubborn")  # type: ignore[union-attr]
    started = time.monotonic()
    kapi.delete_namespaced_pod("stubborn", NS)
    kube.wait_for("pods", NS, "stubborn", lambda obj: obj is None, timeout=TIMEOUT)
    assert time.monotonic() - started >= 0.9
    assert pid is not None and not alive(pid)


def test_owner_deletion_kills_dependent_pods(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    kube = kubelet_kube
    owner = kapi.create_namespaced_pod(
        NS, pod("scheduler", container("import time; time.sleep(600)"))
    )
    ref = {"apiVersion": "v1", "kind": "Pod", "name": "scheduler", "uid": owner.metadata.uid}
    worker = pod("worker", container("import time; time.sleep(600)"))
    worker["metadata"]["ownerReferences"] = [ref]
    kapi.create_namespaced_pod(NS, worker)
    kube.wait_for("pods", NS, "worker", phase("worker", "Running"), timeout=TIMEOUT)
    pid = kube.kubelet.pid(NS, "worker")  # type: ignore[union-attr]
    kapi.delete_namespaced_pod("scheduler", NS)
    kube.wait_for("pods", NS, "worker", lambda obj: obj is None, timeout=TIMEOUT)
    assert pid is not None and not alive(pid)


def test_image_pull_failure_never_runs(kubelet_kube: KubeEmulator, kapi: client.CoreV1Api) -> None:
    kube = kubelet_kube
    kube.kubelet.fail_image_pull(image="registry.example/missing:1")  # type: ignore[union-attr]
    spec = container("print('should not run')")
    spec["image"] = "registry.example/missing:1"
    kapi.create_namespaced_pod(NS, pod("nopull", spec))
    first = kube.wait_for(
        "pods", NS, "nopull", lambda obj: waiting_reason(obj) == "ErrImagePull", timeout=TIMEOUT
    )
    assert "registry.example/missing:1" in main_state(first)["waiting"]["message"]
    backoff = kube.wait_for(
        "pods", NS, "nopull", lambda obj: waiting_reason(obj) == "ImagePullBackOff", timeout=TIMEOUT
    )
    assert backoff is not None and backoff["status"]["phase"] == "Pending"
    assert (
        kapi.read_namespaced_pod("nopull", NS).status.container_statuses[0].state.waiting.reason
        == "ImagePullBackOff"
    )
    kapi.delete_namespaced_pod("nopull", NS)
    kube.wait_for("pods", NS, "nopull", lambda obj: obj is None, timeout=TIMEOUT)


def test_eviction(kubelet_kube: KubeEmulator, kapi: client.CoreV1Api) -> None:
    kube = kubelet_kube
    kapi.create_namespaced_pod(
        NS, pod("evictee", container("import time; time.sleep(600)"), restart="Always")
    )
    kube.wait_for("pods", NS, "evictee", phase("evictee", "Running"), timeout=TIMEOUT)
    pid = kube.kubelet.pid(NS, "evictee")  # type: ignore[union-attr]
    kube.kubelet.evict(NS, "evictee")  # type: ignore[union-attr]
    evicted = kube.wait_for("pods", NS, "evictee", phase("evictee", "Failed"), timeout=TIMEOUT)
    assert evicted is not None and evicted["status"]["reason"] == "Evicted"
    assert "low on resource" in evicted["status"]["message"]
    assert condition(evicted, "DisruptionTarget") == "True"
    assert pid is not None and not alive(pid)
    typed = kapi.read_namespaced_pod("evictee", NS)
    assert typed.status.reason == "Evicted"


def test_oom_kill(kubelet_kube: KubeEmulator, kapi: client.CoreV1Api) -> None:
    kube = kubelet_kube
    kapi.create_namespaced_pod(NS, pod("hungry", container("import time; time.sleep(600)")))
    kube.wait_for("pods", NS, "hungry", phase("hungry", "Running"), timeout=TIMEOUT)
    kube.kubelet.oom_kill(NS, "hungry")  # type: ignore[union-attr]
    dead = kube.wait_for("pods", NS, "hungry", phase("hungry", "Failed"), timeout=TIMEOUT)
    terminated = main_state(dead)["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("OOMKilled", 137)


def test_unschedulable_pods_stay_pending_until_released(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    kube = kubelet_kube
    kube.kubelet.keep_pending("stuck=yes")  # type: ignore[union-attr]
    body = pod("stuck", container("print('ran')"))
    body["metadata"]["labels"]["stuck"] = "yes"
    kapi.create_namespaced_pod(NS, body)
    kapi.create_namespaced_pod(
        NS, pod("picky", container("print('ran')"), nodeSelector={"disktype": "ssd"})
    )
    for name in ("stuck", "picky"):
        obj = kube.wait_for(
            "pods", NS, name, lambda obj: condition(obj, "PodScheduled") == "False", timeout=TIMEOUT
        )
        assert obj is not None and obj["status"]["phase"] == "Pending"
        assert not obj["spec"].get("nodeName")
        cond = next(c for c in obj["status"]["conditions"] if c["type"] == "PodScheduled")
        assert cond["reason"] == "Unschedulable"
    assert kapi.list_namespaced_pod(NS, field_selector="spec.nodeName=").items
    kube.kubelet.clear_faults()  # type: ignore[union-attr]
    kube.wait_for("pods", NS, "stuck", phase("stuck", "Succeeded"), timeout=TIMEOUT)
    assert kube.store.get("pods", NS, "picky")["status"]["phase"] == "Pending"


def test_liveness_failure_restarts_the_container(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    spec = container(
        "import time; time.sleep(600)",
        livenessProbe={"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 1},
    )
    kapi.create_namespaced_pod(
        NS, pod("unhealthy", spec, restart="Always", terminationGracePeriodSeconds=1)
    )

    def restarted(obj: dict[str, Any] | None) -> bool:
        statuses = (obj or {}).get("status", {}).get("containerStatuses") or []
        return bool(statuses) and statuses[0]["restartCount"] >= 1

    obj = kubelet_kube.wait_for("pods", NS, "unhealthy", restarted, timeout=TIMEOUT)
    assert (
        obj is not None
        and obj["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 143
    )


def test_start_to_running_latency(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api, record_property: Any
) -> None:
    latencies = []
    for i in range(5):
        started = time.perf_counter()
        kapi.create_namespaced_pod(NS, pod(f"lat-{i}", container("import time; time.sleep(600)")))
        kubelet_kube.wait_for("pods", NS, f"lat-{i}", phase(f"lat-{i}", "Running"), timeout=TIMEOUT)
        latencies.append(time.perf_counter() - started)
    median = statistics.median(latencies)
    record_property("pod_create_to_running_median_s", round(median, 4))
    assert median < 2.0, latencies


def test_init_containers_run_first_and_share_empty_dir_volumes(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    mount = [{"name": "scratch", "mountPath": "/scratch"}]
    init = {
        "name": "prepare",
        "image": "img:1",
        "command": ["python", "-c", "open('/scratch/msg', 'w').write('from init')"],
        "volumeMounts": mount,
    }
    main = container("print(open('/scratch/msg').read())", volumeMounts=mount)
    kapi.create_namespaced_pod(
        NS,
        pod("staged", main, initContainers=[init], volumes=[{"name": "scratch", "emptyDir": {}}]),
    )
    done = kubelet_kube.wait_for(
        "pods", NS, "staged", phase("staged", "Succeeded"), timeout=TIMEOUT
    )
    assert done is not None
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert condition(done, "Initialized") == "True"
    assert kapi.read_namespaced_pod_log("staged", NS, container="main").strip() == "from init"


def test_failing_init_container_fails_the_pod(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    init = {"name": "broken", "image": "img:1", "command": ["python", "-c", "raise SystemExit(2)"]}
    kapi.create_namespaced_pod(
        NS, pod("blocked", container("print('never')"), initContainers=[init])
    )
    failed = kubelet_kube.wait_for(
        "pods", NS, "blocked", phase("blocked", "Failed"), timeout=TIMEOUT
    )
    assert failed is not None and condition(failed, "Initialized") == "False"
    assert waiting_reason(failed) == "PodInitializing"


def test_missing_executable_is_a_start_error(
    kubelet_kube: KubeEmulator, kapi: client.CoreV1Api
) -> None:
    spec = {"name": "main", "image": "img:1", "command": ["no-such-program-anywhere"]}
    kapi.create_namespaced_pod(NS, pod("typo", spec))
    failed = kubelet_kube.wait_for("pods", NS, "typo", phase("typo", "Failed"), timeout=TIMEOUT)
    terminated = main_state(failed)["terminated"]
    assert (terminated["reason"], terminated["exitCode"]) == ("StartError", 128)
