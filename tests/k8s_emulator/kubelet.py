"""A kubelet (and scheduler) emulator: pods in the emulator's store become local processes.

Theory of operation
-------------------
:class:`Kubelet` subscribes to pod events of a :class:`~.store.Store` (in process) and
plays two roles of a one-node cluster:

* **scheduler**: an unscheduled pod (no ``spec.nodeName``, ``schedulerName`` of
  ``default-scheduler``) is bound to this node, unless its ``nodeSelector`` does not match the
  node labels or a :meth:`Kubelet.keep_pending` rule matches it; then it stays ``Pending``
  with ``PodScheduled=False`` / ``Unschedulable``, as with a real scheduler;
* **kubelet**: each pod bound to this node gets a :class:`_PodWorker` thread that gives it a
  loopback IP of its own (``127.0.0.N``, N from 2, leased across processes with a lock file
  so parallel test runs never share one), writes Secret/ConfigMap volumes into a private
  directory, and runs each container's ``command + args`` as a process (in its own session)
  with the container's env. The image is ignored: the process runs with the test's Python
  environment, and a bare executable is looked up in the virtualenv's ``bin`` first.

Status follows the real kubelet: ``Pending`` (``ContainerCreating``, or
``CreateContainerConfigError`` while a referenced Secret is missing) → ``Running`` (container
``running``; ``Ready`` once started, or once the ``readinessProbe`` succeeds) →
``Succeeded``/``Failed`` when containers exit and ``restartPolicy`` does not restart them;
``Always``/``OnFailure`` restart with ``CrashLoopBackOff`` backoff. Liveness probes kill and
restart. Deletion sends SIGTERM, then SIGKILL to the process group after the grace period
(capped by ``max_grace_period``), reports terminated containers and confirms the deletion.

Time is compressed for tests: probe periods, initial delays and restart / image-pull backoff
are multiplied by ``time_scale`` (0.01: a 10 s probe period runs every 0.1 s).

Faults: :meth:`~Kubelet.fail_image_pull` (``ErrImagePull`` / ``ImagePullBackOff``, never
runs), :meth:`~Kubelet.keep_pending` (unschedulable), :meth:`~Kubelet.evict` (phase
``Failed``, reason ``Evicted``), :meth:`~Kubelet.oom_kill` (terminated ``OOMKilled``, exit
137).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import ApiError
from .podspec import (
    ContainerProblem,
    ProbeSpec,
    ProbeState,
    expand,
    probe_spec,
    resolve_env,
    rewrite_paths,
    volume_files,
)
from .resources import format_time
from .selectors import parse_label_selector
from .store import Store, WatchEvent

__all__ = ["Kubelet", "PodMatch", "default_base_env"]

log = logging.getLogger(__name__)

PodMatch = str | Callable[[dict[str, Any]], bool]
BACKOFF_BASE = 10.0
BACKOFF_CAP = 300.0
HOST_IP = "127.0.0.1"


def default_base_env() -> dict[str, str]:
    """What every container process inherits besides its own env: PATH (venv bin first)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
    }
    for key in ("LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


# --- pod IPs --------------------------------------------------------------------------------


class _IpLeases:
    """127.0.0.N addresses, N increasing from 2, each leased with an flock'ed file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = 2
        self._dir = Path(tempfile.gettempdir()) / "k8s-emulator-pod-ips"

    @staticmethod
    def _address(n: int) -> str | None:
        a, b, c = (n >> 16) & 255, (n >> 8) & 255, n & 255
        if c in (0, 255) or n >= 1 << 24:
            return None
        return f"127.{a}.{b}.{c}"

    def lease(self) -> tuple[str, IO[bytes]]:
        self._dir.mkdir(exist_ok=True)
        with self._lock:
            for _ in range(1 << 16):
                n = self._next
                self._next = n + 1 if n + 1 < (1 << 24) else 2
                ip = self._address(n)
                if ip is None:
                    continue
                handle = open(self._dir / ip, "wb")  # noqa: SIM115 - held for the pod's life
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    handle.close()
                    continue
                return ip, handle
        raise RuntimeError("no free loopback address for a pod")

    @staticmethod
    def release(handle: IO[bytes]) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


IP_LEASES = _IpLeases()


# --- containers -----------------------------------------------------------------------------


def _now() -> str:
    return format_time(time.time())


@dataclass
class _Container:
    spec: dict[str, Any]
    init: bool = False
    pull_fails: bool = False
    proc: subprocess.Popen[bytes] | None = None
    state: dict[str, Any] = field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = field(default_factory=dict)
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    done: bool = False
    exit_code: int | None = None
    kill_reason: str | None = None
    retry_at: float = 0.0
    backoff_n: int = 0
    started_at: str = ""
    container_id: str = ""
    probes: dict[str, ProbeState] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec.get("name"))

    @property
    def image(self) -> str:
        return str(self.spec.get("image") or "")

    def status(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.image.encode()).hexdigest()
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": f"{self.image}@sha256:{digest}",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.started,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


def _matches(rule: PodMatch, pod: dict[str, Any]) -> bool:
    if callable(rule):
        return bool(rule(pod))
    return parse_label_selector(rule).matches((pod.get("metadata") or {}).get("labels"))


class Kubelet:
    """Runs the pods of a :class:`~.apiserver.KubeEmulator` (or a bare :class:`Store`)."""

    def __init__(
        self,
        kube: Any,
        *,
        node_name: str = "emulated-node",
        node_labels: dict[str, str] | None = None,
        time_scale: float = 0.01,
        max_grace_period: float = 2.0,
        retry_interval: float = 0.05,
        base_env: dict[str, str] | None = None,
        bin_dirs: list[str] | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        self.store: Store = kube if isinstance(kube, Store) else kube.store
        self.kube = None if isinstance(kube, Store) else kube
        self.node_name = node_name
        self.node_labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **(node_labels or {}),
        }
        self.time_scale = time_scale
        self.max_grace_period = max_grace_period
        self.retry_interval = retry_interval
        self.base_env = dict(base_env) if base_env is not None else default_base_env()
        self.bin_dirs = (
            list(bin_dirs) if bin_dirs is not None else [str(Path(sys.executable).parent)]
        )
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="k8s-kubelet-")
        self.root = Path(workdir) if workdir else Path(self._tmp.name)  # type: ignore[union-attr]
        self._workers: dict[str, _PodWorker] = {}
        self._pull_failures: list[tuple[PodMatch | None, str | None]] = []
        self._pending_rules: list[PodMatch] = []
        self._lock = threading.Lock()
        self._closed = False
        self._queue: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        with self.store.lock:
            self._unsubscribe = self.store.subscribe(self._on_event)
            pods, _, _ = self.store.list("pods")
        for pod in pods:
            self._queue.put(("sync", pod))
        if self.kube is not None:
            self.kube.log_source = self._log_or_none
        self._thread = threading.Thread(target=self._run, name=f"kubelet-{node_name}", daemon=True)
        self._thread.start()

    # --- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: kill every pod process (SIGKILL), release IPs, remove the work directory."""
        if self._closed:
            return
        self._closed = True
        self._unsubscribe()
        self._queue.put(None)
        self._thread.join(timeout=5)
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.post(("shutdown", None))
        for worker in workers:
            worker.join(timeout=10)
        if self.kube is not None and self.kube.log_source == self._log_or_none:
            self.kube.log_source = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Kubelet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- faults -----------------------------------------------------------------------------

    def fail_image_pull(self, match: PodMatch | None = None, *, image: str | None = None) -> None:
        """Pods matching ``match`` (a label selector or a predicate), or containers using
        ``image``, never pull their image: ``ErrImagePull`` then ``ImagePullBackOff``."""
        with self._lock:
            self._pull_failures.append((match, image))

    def keep_pending(self, match: PodMatch) -> None:
        """Matching pods are never scheduled (``PodScheduled=False``, ``Unschedulable``)."""
        with self._lock:
            self._pending_rules.append(match)

    def clear_faults(self) -> None:
        """Forget image-pull and pending rules; pending pods get scheduled now."""
        with self._lock:
            self._pull_failures.clear()
            self._pending_rules.clear()
        for pod in self.store.list("pods")[0]:
            self._queue.put(("sync", pod))

    def evict(self, namespace: str, name: str, message: str | None = None) -> None:
        """Evict the pod: processes killed, phase ``Failed``, reason ``Evicted``."""
        self._worker(namespace, name).post(
            (
                "evict",
                message
                or "The node was low on resource: memory. Threshold quantity: 100Mi, available: 52Mi.",
            )
        )

    def oom_kill(self, namespace: str, name: str, container: str | None = None) -> None:
        """SIGKILL a container's processes and report ``OOMKilled`` (exit code 137)."""
        self._worker(namespace, name).post(("oom", container))

    # --- introspection ----------------------------------------------------------------------

    def pid(self, namespace: str, name: str, container: str | None = None) -> int | None:
        """The PID of a running container process, or ``None``."""
        worker = self._worker(namespace, name)
        c = worker.container(container)
        proc = c.proc if c is not None else None
        return proc.pid if proc is not None and proc.poll() is None else None

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        """Everything the container wrote to stdout/stderr (all restarts)."""
        text = self._log_or_none(namespace, name, container)
        return text or ""

    def pod_dir(self, namespace: str, name: str) -> Path:
        return self._worker(namespace, name).dir

    def _log_or_none(self, namespace: str, name: str, container: str | None) -> str | None:
        with self._lock:
            worker = next(
                (w for w in self._workers.values() if (w.namespace, w.name) == (namespace, name)),
                None,
            )
        if worker is None:
            return None
        c = worker.container(container)
        if c is None:
            return None
        path = worker.log_path(c.name)
        if not path.exists():
            return None
        return path.read_text(errors="replace")

    def _worker(self, namespace: str, name: str) -> _PodWorker:
        with self._lock:
            for worker in self._workers.values():
                if (worker.namespace, worker.name) == (namespace, name) and not worker.finished:
                    return worker
        raise LookupError(f"pod {namespace}/{name} is not running on node {self.node_name}")

    # --- event loop -------------------------------------------------------------------------

    def _on_event(self, event: WatchEvent) -> None:
        if event.plural == "pods":
            self._queue.put(("event", event))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, payload = item
            try:
                if kind == "event":
                    self._sync(payload.obj, deleted=payload.type == "DELETED")
                else:
                    self._sync(payload, deleted=False)
            except ApiError as exc:
                if exc.code not in (404, 409):
                    log.warning("kubelet: %s", exc.message)
            except Exception:
                log.exception("kubelet failed to sync a pod")

    def _sync(self, pod: dict[str, Any], *, deleted: bool) -> None:
        meta = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        uid = meta.get("uid", "")
        with self._lock:
            worker = self._workers.get(uid)
        if deleted:
            if worker is not None:
                worker.post(("removed", None))
            return
        node = spec.get("nodeName")
        if not node:
            if (
                not meta.get("deletionTimestamp")
                and spec.get("schedulerName", "default-scheduler") == "default-scheduler"
            ):
                self._schedule(pod)
            return
        if node != self.node_name:
            return
        if worker is not None:
            worker.post(("update", pod))
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed") or self._closed:
            return
        worker = _PodWorker(self, pod)
        with self._lock:
            self._workers[uid] = worker
        worker.start()

    def _unschedulable(self, pod: dict[str, Any]) -> str | None:
        with self._lock:
            rules = list(self._pending_rules)
        if any(_matches(rule, pod) for rule in rules):
            return "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."
        selector = (pod.get("spec") or {}).get("nodeSelector") or {}
        if any(self.node_labels.get(k) != v for k, v in selector.items()):
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
        return None

    def _schedule(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        why = self._unschedulable(pod)
        if why is None:
            self.store.bind(meta["namespace"], meta["name"], self.node_name, uid=meta["uid"])
            return

        def mark(obj: dict[str, Any]) -> None:
            status = obj.setdefault("status", {})
            conditions = [
                c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"
            ]
            old = next(
                (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None
            )
            if old and old.get("status") == "False" and old.get("message") == why:
                conditions.append(old)
            else:
                conditions.append(
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "lastProbeTime": None,
                        "lastTransitionTime": _now(),
                        "reason": "Unschedulable",
                        "message": why,
                    }
                )
            status["conditions"] = conditions

        self.store.mutate("pods", meta["namespace"], meta["name"], mark, uid=meta["uid"])

    def _pull_fails(self, pod: dict[str, Any], container: dict[str, Any]) -> bool:
        with self._lock:
            rules = list(self._pull_failures)
        for match, image in rules:
            if image is not None and container.get("image") != image:
                continue
            if match is None or _matches(match, pod):
                return True
        return False

    def _forget(self, worker: _PodWorker) -> None:
        with self._lock:
            if self._workers.get(worker.uid) is worker:
                del self._workers[worker.uid]


class _PodWorker:
    """One pod's life on the node (a thread fed by a message queue)."""

    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.dir = kubelet.root / f"{self.namespace}_{self.name}_{self.uid[:8]}"
        self.queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        spec = pod.get("spec") or {}
        self.containers = [
            _Container(c, init=True, pull_fails=kubelet._pull_fails(pod, c))
            for c in spec.get("initContainers") or []
        ] + [
            _Container(c, pull_fails=kubelet._pull_fails(pod, c))
            for c in spec.get("containers") or []
        ]
        self.ip = ""
        self._lease: IO[bytes] | None = None
        self.start_time = _now()
        self.phase = "Pending"
        self.evicted: str | None = None
        self.removed = False
        self.shutdown = False
        self.finished = False
        self._written: dict[str, Any] | None = None
        self._conditions: dict[str, dict[str, Any]] = {}
        self.deleting = bool(meta.get("deletionTimestamp"))
        self._thread = threading.Thread(
            target=self._main, name=f"pod-{self.namespace}-{self.name}", daemon=True
        )

    # --- plumbing ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def post(self, message: tuple[str, Any]) -> None:
        self.queue.put(message)

    def container(self, name: str | None) -> _Container | None:
        mains = [c for c in self.containers if not c.init]
        if name is None:
            return mains[0] if mains else None
        return next((c for c in self.containers if c.name == name), None)

    def log_path(self, container: str) -> Path:
        return self.dir / "logs" / f"{container}.log"

    @property
    def spec(self) -> dict[str, Any]:
        return self.pod.get("spec") or {}

    @property
    def restart_policy(self) -> str:
        return str(self.spec.get("restartPolicy") or "Always")

    # --- main loop --------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._setup()
            self._loop()
        except Exception:
            log.exception("pod worker %s/%s failed", self.namespace, self.name)
            self._kill_all(signal.SIGKILL)
        finally:
            self.finished = True
            self._release_ip()
            self.kubelet._forget(self)
            if self.removed or self.shutdown:
                shutil.rmtree(self.dir, ignore_errors=True)

    def _setup(self) -> None:
        for sub in ("home", "tmp", "logs", "volumes", "rootfs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.ip, self._lease = IP_LEASES.lease()
        self._write_status()

    def _release_ip(self) -> None:
        if self._lease is not None:
            IP_LEASES.release(self._lease)
            self._lease = None

    def _loop(self) -> None:
        while True:
            if self.shutdown:
                self._kill_all(signal.SIGKILL)
                return
            if self.removed:
                self._kill_all(signal.SIGKILL)
                return
            if self.deleting:
                self._terminate(self._grace())
                self._finish_deletion()
                if self.removed or self.shutdown:
                    return
                self._wait_for(lambda: self.removed or self.shutdown, timeout=None)
                continue
            if self.evicted is None and self.phase not in ("Succeeded", "Failed"):
                self._step_containers()
            self._write_status()
            if self.phase in ("Succeeded", "Failed"):
                self._release_ip()
            self._handle(self._next_message(self._next_wakeup()))

    def _next_message(self, timeout: float | None) -> tuple[str, Any] | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _wait_for(self, done: Callable[[], bool], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            self._handle(self._next_message(remaining if remaining is not None else 1.0))

    def _handle(self, message: tuple[str, Any] | None) -> None:
        if message is None:
            return
        kind, payload = message
        if kind == "update":
            self.pod = payload
            meta = payload.get("metadata") or {}
            if meta.get("deletionTimestamp"):
                self.deleting = True
        elif kind == "removed":
            self.removed = True
        elif kind == "shutdown":
            self.shutdown = True
        elif kind == "exit":
            self._on_exit(*payload)
        elif kind == "evict":
            self._evict(payload)
        elif kind == "oom":
            c = self.container(payload)
            if c is not None and c.proc is not None:
                c.kill_reason = "OOMKilled"
                _killpg(c.proc, signal.SIGKILL)

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        due = [now + 1.0]
        for c in self.containers:
            if c.proc is None and not c.done and c.retry_at:
                due.append(c.retry_at)
            for probe in c.probes.values():
                due.append(probe.next_due)
        return max(0.01, min(due) - now)

    # --- containers -------------------------------------------------------------------------

    def _step_containers(self) -> None:
        inits = [c for c in self.containers if c.init]
        pending_init = next((c for c in inits if not (c.done and c.exit_code == 0)), None)
        if pending_init is not None:
            if pending_init.done:  # failed for good (restartPolicy Never)
                return
            self._step(pending_init)
            for c in self.containers:
                if not c.init:
                    c.state = {"waiting": {"reason": "PodInitializing"}}
            return
        for c in self.containers:
            if not c.init:
                self._step(c)

    def _step(self, c: _Container) -> None:
        now = time.monotonic()
        if c.done:
            return
        if c.proc is None:
            if now < c.retry_at:
                return
            if c.pull_fails:
                self._pull_failed(c, now)
                return
            try:
                self._prepare(c)
            except ContainerProblem as problem:
                c.state = {"waiting": {"reason": problem.reason, "message": problem.message}}
                c.retry_at = now + self.kubelet.retry_interval
                return
            self._spawn(c)
            return
        self._run_probes(c, now)

    def _pull_failed(self, c: _Container, now: float) -> None:
        reason = c.state.get("waiting", {}).get("reason")
        if reason == "ErrImagePull":
            c.state = {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{c.image}"',
                }
            }
            c.retry_at = now + self._backoff(c)
        else:
            c.state = {
                "waiting": {
                    "reason": "ErrImagePull",
                    "message": f'failed to pull and unpack image "{c.image}": failed to resolve reference "{c.image}": not found',
                }
            }
            c.retry_at = now + self.kubelet.retry_interval

    def _backoff(self, c: _Container) -> float:
        delay = min(BACKOFF_BASE * (2**c.backoff_n), BACKOFF_CAP) * self.kubelet.time_scale
        c.backoff_n += 1
        return delay

    def _lookups(
        self,
    ) -> tuple[Callable[[str], dict[str, Any] | None], Callable[[str], dict[str, Any] | None]]:
        store = self.kubelet.store

        def get(plural: str) -> Callable[[str], dict[str, Any] | None]:
            def lookup(name: str) -> dict[str, Any] | None:
                try:
                    return store.get(plural, self.namespace, name)
                except ApiError:
                    return None

            return lookup

        return get("secrets"), get("configmaps")

    def _mounts(self, c: _Container) -> list[tuple[str, str]]:
        mounts = []
        for mount in c.spec.get("volumeMounts") or []:
            host = self.dir / "volumes" / str(mount.get("name"))
            if mount.get("subPath"):
                host = host / str(mount["subPath"])
            mounts.append((str(mount.get("mountPath")), str(host)))
        return mounts

    def _prepare(self, c: _Container) -> None:
        secrets, configmaps = self._lookups()
        volumes = {v.get("name"): v for v in self.spec.get("volumes") or []}
        for mount in c.spec.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name")) or {}
            files = volume_files(volume, secrets=secrets, configmaps=configmaps)
            base = self.dir / "volumes" / str(mount.get("name"))
            base.mkdir(parents=True, exist_ok=True)
            for rel, (content, mode) in files.items():
                target = base / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                target.chmod(mode & 0o777)
        pod_view = dict(self.pod)
        pod_view["status"] = dict(
            self.pod.get("status") or {},
            podIP=self.ip,
            podIPs=[{"ip": self.ip}],
            hostIP=HOST_IP,
            hostIPs=[{"ip": HOST_IP}],
        )
        own_env = resolve_env(c.spec, pod_view, secrets=secrets, configmaps=configmaps)
        mounts = self._mounts(c)
        env = dict(self.kubelet.base_env)
        env.update(
            {"HOME": str(self.dir / "home"), "TMPDIR": str(self.dir / "tmp"), "HOSTNAME": self.name}
        )
        if self.kubelet.kube is not None and self.kubelet.kube.url:
            host, _, port = self.kubelet.kube.url.rpartition("//")[2].partition(":")
            env.update({"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port})
        env.update({k: rewrite_paths(v, mounts) for k, v in own_env.items()})
        words = [expand(str(w), own_env) for w in (c.spec.get("command") or [])]
        words += [expand(str(w), own_env) for w in (c.spec.get("args") or [])]
        if not c.spec.get("command"):
            raise ContainerProblem(
                "CreateContainerError",
                "the emulator runs no images: the container needs an explicit command",
            )
        argv = [rewrite_paths(w, mounts) for w in words]
        search = os.pathsep.join([*self.kubelet.bin_dirs, env.get("PATH", "")])
        if "/" not in argv[0]:
            found = shutil.which(argv[0], path=search)
            if found:
                argv[0] = found
        c.argv, c.env = argv, env

    def _cwd(self, c: _Container) -> str:
        workdir = c.spec.get("workingDir")
        if not workdir:
            return str(self.dir / "rootfs")
        mapped = rewrite_paths(str(workdir), self._mounts(c))
        if mapped != workdir:
            return mapped
        path = self.dir / "rootfs" / str(workdir).lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _spawn(self, c: _Container) -> None:
        if c.state.get("waiting", {}).get("reason") == "CrashLoopBackOff" or c.last_state:
            c.restart_count += 1
        with open(self.log_path(c.name), "ab") as logfile:
            try:
                proc = subprocess.Popen(
                    c.argv,
                    env=c.env,
                    cwd=self._cwd(c),
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                c.state = {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "StartError",
                        "message": f"failed to start container process: exec: {c.argv[0]!r}: {exc.strerror}",
                        "startedAt": _now(),
                        "finishedAt": _now(),
                    }
                }
                self._after_exit(c, 128)
                return
        c.proc = proc
        c.kill_reason = None
        c.started_at = _now()
        c.container_id = f"emulator://{self.uid[:8]}-{c.name}-{proc.pid}"
        c.state = {"running": {"startedAt": c.started_at}}
        c.started = True
        c.probes = {}
        pod_ip = self.ip
        started = time.monotonic()
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            try:
                spec = probe_spec(c.spec.get(kind), c.spec, pod_ip)
            except ContainerProblem:
                spec = None
            if spec is not None:
                c.probes[kind] = ProbeState(spec, started, time_scale=self.kubelet.time_scale)
        c.ready = not c.init and "readinessProbe" not in c.probes and "startupProbe" not in c.probes
        if "startupProbe" in c.probes:
            c.started = False
        threading.Thread(
            target=self._reap, args=(c, proc), name=f"reap-{self.name}-{c.name}", daemon=True
        ).start()

    def _reap(self, c: _Container, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        self.post(("exit", (c.name, proc, code)))

    def _on_exit(self, name: str, proc: subprocess.Popen[bytes], code: int) -> None:
        c = next((c for c in self.containers if c.name == name), None)
        if c is None or c.proc is not proc:
            return
        _killpg(proc, signal.SIGKILL)  # the container's other processes go with it
        exit_code = 128 - code if code < 0 else code
        reason = c.kill_reason or ("Completed" if exit_code == 0 else "Error")
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": c.started_at,
            "finishedAt": _now(),
            "containerID": c.container_id,
        }
        if code < 0:
            terminated["signal"] = -code
        c.proc = None
        c.state = {"terminated": terminated}
        self._after_exit(c, exit_code)

    def _after_exit(self, c: _Container, exit_code: int) -> None:
        c.exit_code = exit_code
        c.ready = False
        c.probes = {}
        policy = self.restart_policy
        restart = policy == "Always" or (policy == "OnFailure" and exit_code != 0)
        if c.init:
            restart = exit_code != 0 and policy != "Never"
        if not restart or self.deleting or self.evicted is not None:
            c.done = True
            return
        c.last_state = c.state
        c.retry_at = time.monotonic() + self._backoff(c)
        c.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off restarting failed container={c.name} pod={self.name}_{self.namespace}({self.uid})",
            }
        }

    def _run_probes(self, c: _Container, now: float) -> None:
        if c.proc is None:
            return
        order = (
            ["startupProbe"]
            if "startupProbe" in c.probes and not c.started
            else ["readinessProbe", "livenessProbe"]
        )
        for kind in order:
            state = c.probes.get(kind)
            if state is None or now < state.next_due:
                continue
            verdict = state.record(self._probe(state.spec, c), time.monotonic())
            if kind == "startupProbe" and verdict is True:
                c.started = True
                c.ready = "readinessProbe" not in c.probes
            elif kind == "readinessProbe" and verdict is not None:
                c.ready = verdict
            elif kind in ("livenessProbe", "startupProbe") and verdict is False:
                c.kill_reason = "Error"
                self._stop_container(c, self._grace(from_spec=True))
                return

    def _probe(self, spec: ProbeSpec, c: _Container) -> bool:
        try:
            if spec.kind == "http":
                conn_cls = (
                    http.client.HTTPSConnection
                    if spec.scheme == "HTTPS"
                    else http.client.HTTPConnection
                )
                kwargs: dict[str, Any] = {"timeout": spec.timeout}
                if spec.scheme == "HTTPS":
                    kwargs["context"] = ssl._create_unverified_context()  # kubelet does not verify
                conn = conn_cls(spec.host, spec.port, **kwargs)
                try:
                    conn.request(
                        "GET",
                        spec.path,
                        headers={"User-Agent": "kube-probe/1.33", **dict(spec.headers)},
                    )
                    return 200 <= conn.getresponse().status < 400
                finally:
                    conn.close()
            if spec.kind == "tcp":
                with socket.create_connection((spec.host, spec.port), timeout=spec.timeout):
                    return True
            argv = [rewrite_paths(w, self._mounts(c)) for w in spec.command]
            if argv and "/" not in argv[0]:
                argv[0] = shutil.which(argv[0], path=c.env.get("PATH")) or argv[0]
            result = subprocess.run(
                argv, env=c.env, cwd=self._cwd(c), capture_output=True, timeout=spec.timeout
            )
            return result.returncode == 0
        except (OSError, http.client.HTTPException, subprocess.SubprocessError):
            return False

    # --- stopping ---------------------------------------------------------------------------

    def _grace(self, *, from_spec: bool = False) -> float:
        meta = self.pod.get("metadata") or {}
        grace = None if from_spec else meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.spec.get("terminationGracePeriodSeconds", 30)
        return min(float(grace), self.kubelet.max_grace_period)

    def _stop_container(self, c: _Container, grace: float) -> None:
        if c.proc is None:
            return
        proc = c.proc
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        self._wait_for(lambda: c.proc is not proc or self.removed or self.shutdown, timeout=grace)
        if c.proc is proc:
            _killpg(proc, signal.SIGKILL)
            self._wait_for(lambda: c.proc is not proc, timeout=5)

    def _terminate(self, grace: float) -> None:
        running = [c for c in self.containers if c.proc is not None]
        for c in running:
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        self._wait_for(
            lambda: all(c.proc is None for c in running) or self.removed or self.shutdown,
            timeout=grace,
        )
        self._kill_all(signal.SIGKILL)
        self._wait_for(lambda: all(c.proc is None for c in running), timeout=5)
        for c in self.containers:
            c.done = True
            c.ready = False
            if "terminated" in c.state or c.init:
                continue
            if c.last_state.get("terminated"):
                c.state = c.last_state
                continue
            c.exit_code = 137
            c.state = {
                "terminated": {
                    "exitCode": 137,
                    "reason": "ContainerStatusUnknown",
                    "message": "The container could not be located when the pod was terminated",
                    "finishedAt": _now(),
                }
            }

    def _kill_all(self, sig: signal.Signals) -> None:
        for c in self.containers:
            if c.proc is not None:
                _killpg(c.proc, sig)

    def _finish_deletion(self) -> None:
        if self.removed or self.shutdown:
            return
        self._write_status(final=True)
        try:
            self.kubelet.store.delete(
                "pods", self.namespace, self.name, grace_period=0, preconditions={"uid": self.uid}
            )
        except ApiError as exc:
            if exc.code in (404, 409):
                self.removed = True
            else:
                raise

    def _evict(self, message: str) -> None:
        if self.phase in ("Succeeded", "Failed") or self.evicted is not None:
            return
        self.evicted = message
        self._terminate(self._grace(from_spec=True))

    # --- status -----------------------------------------------------------------------------

    def _compute_phase(self, final: bool) -> str:
        if self.phase in ("Succeeded", "Failed"):
            return self.phase
        if self.evicted is not None:
            return "Failed"
        inits = [c for c in self.containers if c.init]
        mains = [c for c in self.containers if not c.init]
        if (
            any(c.done and c.exit_code not in (0, None) for c in inits)
            and self.restart_policy == "Never"
        ):
            return "Failed"
        if final:
            return "Succeeded" if all(c.exit_code == 0 for c in mains) else "Failed"
        if any(not (c.done and c.exit_code == 0) for c in inits):
            return "Pending"
        pending = running = succeeded = failed = 0
        for c in mains:
            if "running" in c.state:
                running += 1
            elif "terminated" in c.state or (c.last_state and "terminated" in c.last_state):
                if c.exit_code == 0:
                    succeeded += 1
                else:
                    failed += 1
            else:
                pending += 1
        stopped = succeeded + failed
        if pending:
            return "Pending"
        if running:
            return "Running"
        if stopped:
            if self.restart_policy == "Always":
                return "Running"
            if stopped == succeeded and all(c.done for c in mains):
                return "Succeeded"
            if self.restart_policy == "Never":
                return "Failed"
            return "Running"
        return "Pending"

    def _condition(
        self, kind: str, ok: bool, reason: str | None = None, message: str | None = None
    ) -> dict[str, Any]:
        status = "True" if ok else "False"
        old = self._conditions.get(kind)
        since = old["lastTransitionTime"] if old and old["status"] == status else _now()
        cond: dict[str, Any] = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": since,
        }
        if not ok and reason:
            cond["reason"] = reason
            if message:
                cond["message"] = message
        self._conditions[kind] = cond
        return cond

    def _status(self, final: bool) -> dict[str, Any]:
        self.phase = self._compute_phase(final)
        terminal = self.phase in ("Succeeded", "Failed")
        mains = [c for c in self.containers if not c.init]
        inits = [c for c in self.containers if c.init]
        if terminal:
            for c in self.containers:
                c.ready = False
        unready = [c.name for c in mains if not c.ready]
        incomplete = [c.name for c in inits if not (c.done and c.exit_code == 0)]
        why = (
            ("PodCompleted", None)
            if terminal
            else ("ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]")
        )
        conditions = [
            self._condition("PodReadyToStartContainers", bool(self.ip) and not terminal),
            self._condition(
                "Initialized",
                not incomplete,
                "ContainersNotInitialized",
                f"containers with incomplete status: [{' '.join(incomplete)}]",
            ),
            self._condition("Ready", not unready, *why),
            self._condition("ContainersReady", not unready, *why),
            self._condition("PodScheduled", True),
        ]
        if self.evicted is not None:
            conditions.insert(0, self._condition("DisruptionTarget", True))
            conditions[0]["reason"] = "TerminationByKubelet"
            conditions[0]["message"] = self.evicted
        status: dict[str, Any] = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in mains],
        }
        if inits:
            status["initContainerStatuses"] = [c.status() for c in inits]
        if self.evicted is not None:
            status["reason"] = "Evicted"
            status["message"] = self.evicted
        return status

    def _write_status(self, *, final: bool = False) -> None:
        status = self._status(final)
        if status == self._written or self.removed or self.shutdown:
            return

        def apply(obj: dict[str, Any]) -> None:
            old = obj.get("status") or {}
            merged = dict(status)
            if "qosClass" in old:
                merged["qosClass"] = old["qosClass"]
            obj["status"] = merged

        try:
            self.kubelet.store.mutate("pods", self.namespace, self.name, apply, uid=self.uid)
        except ApiError as exc:
            if exc.code == 404:
                self.removed = True
                return
            raise
        self._written = status


def _killpg(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
