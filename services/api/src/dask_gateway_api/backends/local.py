"""The local backend: real ``dask scheduler`` / ``dask worker`` processes on this machine.

Theory of operation
-------------------
Each cluster gets a private directory ``<root>/<name>/`` (0700) holding ``.certs/``
(``dask.crt``, ``dask.pem`` and ``api-token``, all 0600) and ``logs/`` (``scheduler.log``,
``worker-<name>.log``). Processes are launched per spec §5.1 with the official preload, in
their own session (``start_new_session=True``): a Ctrl-C or crash of the API does not
reach them, and a restarted API re-adopts them.

A launched process is described by a JSON-able *state*: its pid, its start time in clock
ticks since boot (``/proc/<pid>/stat`` field 22), the boot id and the tail of its argv. The
first three identify the process even after an API restart: a recycled pid has another
start time, or another boot id. Children
started by this API run are watched by a reaper task (``Process.wait``), so they never
linger as zombies; processes adopted from an earlier run are checked with
``os.kill(pid, 0)`` plus the ``/proc`` identity check, and waited on with a pidfd.

Stopping sends SIGTERM to the process group (the worker's nanny has a child in the same
group), waits up to ``stop_grace`` seconds, then sends SIGKILL to the group.

Fast start: unless disabled, the backend runs a fork server (:mod:`.forkserver`) that has
already imported distributed. The default commands (``dask scheduler`` / ``dask worker`` of
this interpreter) of a cluster without a custom ``environment`` are forked from it instead
of exec'd, which saves the seconds of imports of each process (the worker's nanny then
forks its worker process too). A forked process is described and watched exactly like an
adopted one (pid + start time + boot id, pidfd). Until the fork server is ready, or if it
fails, processes are exec'd as usual.

The pure parts (commands, environment, ``/proc`` parsing) are module-level functions so
they are testable without processes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import trio

from dask_gateway_common.tls import make_private_dir, write_private_file

from .base import Backend, BackendError, ClusterLaunch, State
from .forkserver import ForkServer, ForkServerError, fork_plan, fork_supported

__all__ = [
    "INHERITED_ENV",
    "LocalBackend",
    "boot_id",
    "default_scheduler_cmd",
    "default_worker_cmd",
    "open_local_backend",
    "process_environment",
    "resolve_program",
    "scheduler_command",
    "worker_command",
]

log = logging.getLogger("dask_gateway.api.local")

#: Variables copied from the API's own environment into every process (spec §5.1).
INHERITED_ENV = (
    "PATH",
    "PYTHONPATH",
    "CONDA_ROOT",
    "CONDA_DEFAULT_ENV",
    "VIRTUAL_ENV",
    "LANG",
    "LC_ALL",
    "HOME",
)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_scheduler_cmd() -> tuple[str, ...]:
    """``dask scheduler`` of the running interpreter (no console script needed)."""
    return (sys.executable, "-m", "distributed.cli.dask_scheduler")


def default_worker_cmd() -> tuple[str, ...]:
    """``dask worker`` of the running interpreter."""
    return (sys.executable, "-m", "distributed.cli.dask_worker")


def resolve_program(argv: Sequence[str], path: str | None) -> list[str]:
    """``argv`` with a bare program name (``dask``) resolved to an absolute path.

    The running interpreter's own ``bin`` directory is searched first (a virtualenv's
    ``dask`` works without activating it), then ``path``. Unresolvable names are kept as
    they are, so the launch fails with a clear "cannot start" error.
    """
    argv = list(argv)
    if not argv or os.sep in argv[0]:
        return argv
    own_bin = os.path.dirname(sys.executable)
    search = os.pathsep.join(p for p in (own_bin, path or "") if p)
    found = shutil.which(argv[0], path=search)
    if found:
        argv[0] = found
    return argv


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def scheduler_command(launch: ClusterLaunch, host: str = "127.0.0.1") -> list[str]:
    """The scheduler argv of spec §5.1."""
    base = list(launch.scheduler_cmd or default_scheduler_cmd())
    return [
        *base,
        "--protocol",
        "tls",
        "--port",
        "0",
        "--host",
        host,
        "--dashboard-address",
        f"{host}:0",
        "--preload",
        "dask_gateway.scheduler_preload",
        "--dg-api-address",
        f"{host}:0",
        "--dg-heartbeat-period",
        _fmt_number(launch.heartbeat_period),
        "--dg-adaptive-period",
        _fmt_number(launch.adaptive_period),
        "--dg-idle-timeout",
        _fmt_number(launch.idle_timeout),
    ]


def worker_command(
    launch: ClusterLaunch, scheduler_address: str, worker_name: str, host: str = "127.0.0.1"
) -> list[str]:
    """The worker argv of spec §5.1."""
    base = list(launch.worker_cmd or default_worker_cmd())
    return [
        *base,
        scheduler_address,
        "--dashboard-address",
        f"{host}:0",
        "--name",
        worker_name,
        "--nthreads",
        str(launch.worker_threads),
        "--memory-limit",
        str(launch.worker_memory),
    ]


def process_environment(
    launch: ClusterLaunch,
    *,
    role: str,
    cert_path: str,
    key_path: str,
    token_path: str,
    parent_env: Mapping[str, str],
) -> dict[str, str]:
    """The environment of a scheduler (``role="scheduler"``) or worker process (§5.1).

    Inherited variables first, then the cluster config's ``environment``, then the
    gateway's own variables (which always win). The token is passed as a file path.
    """
    if role not in ("scheduler", "worker"):
        raise ValueError(f"unknown role {role!r}")
    env = {k: parent_env[k] for k in INHERITED_ENV if k in parent_env}
    env.update({str(k): str(v) for k, v in launch.environment.items()})
    upper = role.upper()
    env.update(
        {
            "USER": launch.username,
            "DASK_GATEWAY_API_URL": launch.api_url,
            "DASK_GATEWAY_API_TOKEN": token_path,
            "DASK_GATEWAY_CLUSTER_NAME": launch.name,
            "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": cert_path,
            f"DASK_DISTRIBUTED__COMM__TLS__{upper}__CERT": cert_path,
            f"DASK_DISTRIBUTED__COMM__TLS__{upper}__KEY": key_path,
        }
    )
    return env


# ---------------------------------------------------------------- /proc identity (pure)


def parse_proc_stat(text: str) -> tuple[str, int] | None:
    """``(state letter, starttime ticks)`` from a ``/proc/<pid>/stat`` line, or None."""
    _, sep, rest = text.rpartition(")")
    if not sep:
        return None
    fields = rest.split()
    if len(fields) < 20:
        return None
    try:
        return fields[0], int(fields[19])
    except ValueError:
        return None


def cmdline_matches(cmdline: bytes, argv_tail: Sequence[str]) -> bool:
    """Whether ``argv_tail`` ends the NUL-separated ``cmdline`` (interpreters may prepend)."""
    parts = [p.decode("utf-8", "surrogateescape") for p in cmdline.split(b"\0")]
    if parts and parts[-1] == "":
        parts.pop()
    tail = list(argv_tail)
    return len(tail) <= len(parts) and parts[len(parts) - len(tail) :] == tail


def _read_proc(pid: int, what: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{what}", "rb") as f:
            return f.read()
    except OSError:
        return None


def _proc_starttime(pid: int) -> int | None:
    raw = _read_proc(pid, "stat")
    parsed = parse_proc_stat(raw.decode("utf-8", "replace")) if raw is not None else None
    return parsed[1] if parsed else None


def boot_id() -> str | None:
    """This boot's random id (``/proc/sys/kernel/random/boot_id``), or None."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def same_process_alive(state: State) -> bool:
    """Whether the process of ``state`` exists, is not a zombie, and is the same one.

    Identity is the pid plus its start time (plus the boot id, when recorded): exact, and
    independent of the command line, which a process may rewrite (``setproctitle``). Only
    states without a start time fall back to comparing the command line.
    """
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    recorded_boot = state.get("boot_id")
    if isinstance(recorded_boot, str) and recorded_boot != boot_id():
        return False  # started before a reboot: any process with this pid is another one
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # somebody else's process: the pid was recycled
    raw = _read_proc(pid, "stat")
    if raw is not None:
        parsed = parse_proc_stat(raw.decode("utf-8", "replace"))
        if parsed is None or parsed[0] in ("Z", "X"):
            return False
        expected = state.get("starttime")
        if isinstance(expected, int):
            return parsed[1] == expected
    cmdline = _read_proc(pid, "cmdline")
    tail = state.get("argv_tail")
    if cmdline is not None and isinstance(tail, list) and tail:
        return cmdline_matches(cmdline, tail)
    return True


# ---------------------------------------------------------------- the backend


class LocalBackend(Backend):
    """Runs clusters as local processes under ``root``. Build it with :func:`open_local_backend`."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        nursery: trio.Nursery,
        *,
        host: str = "127.0.0.1",
        stop_grace: float = 5.0,
        parent_env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.host = host
        self.stop_grace = stop_grace
        self._parent_env = dict(os.environ if parent_env is None else parent_env)
        self._nursery = nursery
        self._children: dict[int, trio.Process] = {}
        #: The running fork server, when there is one (see :meth:`run_fork_server`).
        self.fork_server: ForkServer | None = None
        make_private_dir(self.root)

    # -- paths

    def cluster_dir(self, cluster_name: str) -> Path:
        if not _SAFE_NAME.match(cluster_name):
            raise BackendError(f"unsafe cluster name {cluster_name!r}")
        return self.root / cluster_name

    def _certs(self, cluster_name: str) -> tuple[Path, Path, Path]:
        certs = self.cluster_dir(cluster_name) / ".certs"
        return certs / "dask.crt", certs / "dask.pem", certs / "api-token"

    def _write_credentials(self, launch: ClusterLaunch) -> None:
        workdir = self.cluster_dir(launch.name)
        make_private_dir(workdir)
        make_private_dir(workdir / ".certs")
        make_private_dir(workdir / "logs")
        cert, key, token = self._certs(launch.name)
        write_private_file(cert, launch.tls_cert)
        write_private_file(key, launch.tls_key)
        write_private_file(token, launch.token.encode())

    # -- the fork server

    async def run_fork_server(
        self,
        preload: Sequence[str] | None = None,
        *,
        ready_timeout: float = 120.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a fork server running for this backend (a task; see the module docstring).

        Reports started once the first fork server is ready. It is restarted if it exits;
        after three failed starts in a row the task ends and the backend keeps exec'ing.
        """
        env = {k: self._parent_env[k] for k in INHERITED_ENV if k in self._parent_env}
        kwargs = {} if preload is None else {"preload": tuple(preload)}
        failures = 0
        reported = False
        while failures < 3:
            try:
                server = await ForkServer.start(
                    env=env,
                    cwd=str(self.root),
                    log_path=str(self.root / "fork-server.log"),
                    ready_timeout=ready_timeout,
                    **kwargs,
                )
            except ForkServerError as exc:
                failures += 1
                log.warning("%s; dask processes are started with exec", exc)
                await trio.sleep(5 * failures)
                continue
            failures = 0
            self.fork_server = server
            log.info("fork server ready, pid %d", server.pid)
            if not reported:
                task_status.started()
                reported = True
            try:
                code = await server.wait()
            finally:
                self.fork_server = None
                with trio.CancelScope(shield=True):
                    await server.aclose()
            log.warning("fork server exited with status %s; restarting it", code)
            await trio.sleep(1)

    # -- launching

    async def _spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
        *,
        forkable: bool = False,
    ) -> State:
        server = self.fork_server
        if forkable and server is not None and fork_plan(argv, sys.executable) is not None:
            try:
                pid = await server.spawn(argv, env, str(cwd), str(log_path))
            except ForkServerError as exc:
                log.warning("%s; starting %s with exec instead", exc, log_path.name)
            else:
                # Identity is pid + start time (+ boot id): a forked child rewrites its
                # command line. One already gone gets an impossible start time.
                starttime = _proc_starttime(pid)
                return {
                    "pid": pid,
                    "starttime": -1 if starttime is None else starttime,
                    "boot_id": boot_id(),
                    "argv_tail": [],
                    "log": str(log_path),
                    "forked": True,
                }
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise BackendError(f"cannot open log file {log_path}: {exc.strerror}") from exc
        try:
            proc = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                cwd=str(cwd),
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
        finally:
            os.close(log_fd)
        self._children[proc.pid] = proc
        self._nursery.start_soon(self._reap, proc)
        return {
            "pid": proc.pid,
            "starttime": _proc_starttime(proc.pid),
            "boot_id": boot_id(),
            "argv_tail": argv[1:],
            "log": str(log_path),
        }

    async def _reap(self, proc: trio.Process) -> None:
        try:
            code = await proc.wait()
        finally:
            self._children.pop(proc.pid, None)
        log.info("process %d exited with status %s", proc.pid, code)

    async def start_scheduler(self, launch: ClusterLaunch) -> State:
        # Three fsynced files: off the event loop, so API requests never wait on the disk.
        try:
            await trio.to_thread.run_sync(self._write_credentials, launch)
        except OSError as exc:
            raise BackendError(f"cannot write the cluster's credentials: {exc}") from exc
        cert, key, token = self._certs(launch.name)
        env = process_environment(
            launch,
            role="scheduler",
            cert_path=str(cert),
            key_path=str(key),
            token_path=str(token),
            parent_env=self._parent_env,
        )
        workdir = self.cluster_dir(launch.name)
        argv = resolve_program(scheduler_command(launch, self.host), env.get("PATH"))
        state = await self._spawn(
            argv,
            env,
            workdir,
            workdir / "logs" / "scheduler.log",
            forkable=not launch.environment,
        )
        state["workdir"] = str(workdir)
        log.info(
            "cluster %s: scheduler started, pid %d%s",
            launch.name,
            state["pid"],
            " (forked)" if state.get("forked") else "",
        )
        return state

    async def start_worker(self, launch: ClusterLaunch, worker_name: str) -> State:
        if not _SAFE_NAME.match(worker_name):
            raise BackendError(f"unsafe worker name {worker_name!r}")
        if not launch.scheduler_address:
            raise BackendError(f"cluster {launch.name} has no scheduler address yet")
        cert, key, token = self._certs(launch.name)
        if not cert.exists():  # e.g. removed by hand; workers need them
            try:
                await trio.to_thread.run_sync(self._write_credentials, launch)
            except OSError as exc:
                raise BackendError(f"cannot write the cluster's credentials: {exc}") from exc
        env = process_environment(
            launch,
            role="worker",
            cert_path=str(cert),
            key_path=str(key),
            token_path=str(token),
            parent_env=self._parent_env,
        )
        workdir = self.cluster_dir(launch.name)
        argv = resolve_program(
            worker_command(launch, launch.scheduler_address, worker_name, self.host),
            env.get("PATH"),
        )
        logs = workdir / "logs"
        make_private_dir(logs)
        state = await self._spawn(
            argv, env, workdir, logs / f"worker-{worker_name}.log", forkable=not launch.environment
        )
        log.info(
            "cluster %s: worker %s started, pid %d%s",
            launch.name,
            worker_name,
            state["pid"],
            " (forked)" if state.get("forked") else "",
        )
        return state

    # -- liveness

    def is_alive(self, state: State) -> bool:
        pid = state.get("pid")
        proc = self._children.get(pid) if isinstance(pid, int) else None
        if proc is not None:
            return proc.poll() is None
        return same_process_alive(state)

    def adopt(self, state: State) -> bool:
        return self.is_alive(state)

    async def wait_exit(self, state: State) -> None:
        pid = state.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return
        proc = self._children.get(pid)
        if proc is None and not same_process_alive(state):
            return
        await self._wait_exit(pid, proc)

    # -- stopping

    async def _terminate(self, state: State) -> None:
        pid = state.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return
        proc = self._children.get(pid)
        if proc is None and not same_process_alive(state):
            return
        _signal_group(pid, signal.SIGTERM)
        with trio.move_on_after(self.stop_grace):
            await self._wait_exit(pid, proc)
            return
        log.warning("process %d ignored SIGTERM for %.1fs; killing it", pid, self.stop_grace)
        _signal_group(pid, signal.SIGKILL)
        with trio.move_on_after(5):
            await self._wait_exit(pid, proc)

    async def _wait_exit(self, pid: int, proc: trio.Process | None) -> None:
        if proc is not None:
            await proc.wait()
            return
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            fd = -1
        if fd < 0:
            # No pidfd (old kernel): a non-child's exit can only be polled.
            while _pid_exists(pid) and not _reap_if_child(pid):  # noqa: ASYNC110
                await trio.sleep(0.05)
            return
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        if not _reap_if_child(pid):
            # Exited, but somebody else's child (the fork server's, or init's after an API
            # restart): give its parent a moment to reap it, so "stopped" means the pid
            # is gone, not a zombie.
            with trio.move_on_after(2):
                while _is_zombie(pid):  # noqa: ASYNC110 - another process reaps it
                    await trio.sleep(0.01)

    async def stop_worker(self, cluster_name: str, worker_name: str, state: State) -> None:
        await self._terminate(state)

    async def stop_cluster(
        self, cluster_name: str, scheduler_state: State, worker_states: Mapping[str, State]
    ) -> None:
        async with trio.open_nursery() as nursery:
            for state in worker_states.values():
                nursery.start_soon(self._terminate, state)
            nursery.start_soon(self._terminate, scheduler_state)
        certs = self.cluster_dir(cluster_name) / ".certs"
        await trio.to_thread.run_sync(shutil.rmtree, certs, True)
        log.info("cluster %s: processes stopped", cluster_name)

    async def forget_cluster(self, cluster_name: str) -> None:
        await trio.to_thread.run_sync(shutil.rmtree, self.cluster_dir(cluster_name), True)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def _is_zombie(pid: int) -> bool:
    raw = _read_proc(pid, "stat")
    parsed = parse_proc_stat(raw.decode("utf-8", "replace")) if raw is not None else None
    return parsed is not None and parsed[0] in ("Z", "X")


def _reap_if_child(pid: int) -> bool:
    """Reap ``pid`` if it is an exited child of ours that no ``trio.Process`` owns any more
    (an earlier backend in this same process started it); True if it was reaped."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return reaped == pid


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by ``pid`` (its own session), else just the process."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise


@contextlib.asynccontextmanager
async def open_local_backend(
    root: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    stop_grace: float = 5.0,
    parent_env: Mapping[str, str] | None = None,
    fork_server: bool = True,
) -> AsyncIterator[LocalBackend]:
    """A :class:`LocalBackend` whose child reapers live in their own nursery.

    With ``fork_server`` (and on Linux) a fork server starts in the background; until it
    is ready processes are exec'd. Leaving the context stops watching the processes and
    ends the fork server but never kills cluster processes: clusters keep running across
    an API restart unless the manager stopped them first.
    """
    async with trio.open_nursery() as nursery:
        backend = LocalBackend(
            root, nursery, host=host, stop_grace=stop_grace, parent_env=parent_env
        )
        if fork_server and fork_supported():
            nursery.start_soon(backend.run_fork_server)
        try:
            yield backend
        finally:
            nursery.cancel_scope.cancel()
