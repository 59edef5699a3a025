"""A fork server for the local backend: dask processes that start without import cost.

Theory of operation
-------------------
A fresh ``dask scheduler`` or ``dask worker`` spends seconds importing (distributed, numpy,
bokeh for the dashboards) before it does anything, and a worker pays twice: its nanny
imports everything, then spawns the worker process, which imports everything again. On a
small machine that is most of the time from "new cluster" to "first result".

The fork server is one helper process per API run, started by the local backend. It
imports those modules once (:data:`DEFAULT_PRELOAD`), tells the API it is ready, then
waits for requests on a Unix ``SOCK_SEQPACKET`` socket (one JSON message per request and
per reply). For each request it opens the log file and the working directory, forks, and
answers with the child's pid. The child becomes exactly the program of the request:

- its own session (``setsid``), like ``start_new_session=True``; stdin ``/dev/null``,
  stdout and stderr to its log file; the request's working directory;
- the request's environment *replaces* ``os.environ`` and dask's configuration is re-read
  from it (``dask.config.refresh``), so the per-cluster TLS paths and tokens apply;
- ``sys.argv``, ``sys.path[0]`` and ``__main__`` look as they would after an ``exec``;
  Python's ``random`` reseeds itself at fork, numpy's global generator is reseeded and
  multiprocessing gets a fresh authkey (the ``str`` hash seed stays the fork server's:
  the forked processes of one API run share it, which dask.bag's hashing even prefers);
- then it runs the same click command ``dask scheduler`` / ``dask worker`` runs and
  leaves through a normal interpreter exit (atexit handlers and finalizers run).

A worker's nanny creates its worker process with multiprocessing ``fork`` instead of
``spawn`` (the nanny is already warm): the nanny and its restart-on-failure behaviour stay.
That worker process starts with default signal handlers and without the nanny's network
sockets (:func:`_detach_from_nanny`), as a spawned one would.
The fork server itself starts with distributed's ``pre-spawn-environ`` variables
(``MALLOC_TRIM_THRESHOLD_``, ``OMP_NUM_THREADS``...), so C-level settings read at process
start match what a spawned worker gets. Anything else read at interpreter start
(``PYTHON*``, ``LD_*``, a custom ``environment`` of the cluster) cannot be replayed by a
fork, so only the default commands of this interpreter with no per-cluster environment
are forked (:func:`fork_plan`; the backend checks the environment); everything else is
started with a plain ``exec`` as before.

A child shows up in ``ps`` as ``dask scheduler ...`` / ``dask worker ...`` (its command
line is rewritten in place, truncated to the length of the fork server's) with the short
name ``dask-scheduler`` / ``dask-worker``; ``/proc/<pid>/environ`` still shows the fork
server's initial environment (the kernel never updates it), ``os.environ`` is right.

Lifetime: the fork server ignores ``SIGCHLD``, so the kernel reaps its children (never
zombies; the API watches them by pid and pidfd like any adopted process). It runs in its
own session and exits when the API's end of the socket closes; its children keep running
(they are clusters, which outlive an API restart). It refuses to fork while it has more
than one thread. Any failure of the fork server is reported as :class:`ForkServerError`
and the backend falls back to ``exec``.

This module is both sides: :class:`ForkServer` (API side, trio) and :func:`main`
(the server process, ``python -m dask_gateway_api.backends.forkserver --fd N``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

__all__ = [
    "DEFAULT_PRELOAD",
    "PRE_SPAWN_ENV",
    "ForkPlan",
    "ForkServer",
    "ForkServerError",
    "fork_plan",
    "fork_supported",
    "main",
    "parse_request",
]

#: Modules a scheduler or worker imports before or while starting (dashboards included).
#: Missing ones are skipped; the two CLI modules are required.
DEFAULT_PRELOAD: tuple[str, ...] = (
    "distributed.cli.dask_scheduler",
    "distributed.cli.dask_worker",
    "dask_gateway.scheduler_preload",
    "distributed.dashboard.scheduler",
    "distributed.dashboard.worker",
    "distributed.diagnostics.websocket",
    "distributed.http.health",
    "distributed.http.prometheus",
    "distributed.http.proxy",
    "distributed.http.statics",
    "distributed.http.scheduler.info",
    "distributed.http.scheduler.json",
    "distributed.http.scheduler.prometheus",
    "distributed.http.worker.prometheus",
    "multiprocessing.connection",
)

#: distributed's default ``distributed.nanny.pre-spawn-environ``: the fork server starts
#: with these so the C-level state (malloc, BLAS thread pools) of a forked worker matches
#: a spawned one.
PRE_SPAWN_ENV: dict[str, str] = {
    "MALLOC_TRIM_THRESHOLD_": "65536",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}

#: The CLI module of each role.
ROLE_MODULES = {
    "scheduler": "distributed.cli.dask_scheduler",
    "worker": "distributed.cli.dask_worker",
}

#: Largest request or reply (a request carries a whole environment).
MAX_MESSAGE = 1 << 20


class ForkServerError(Exception):
    """The fork server is unavailable or refused a request (message is loggable)."""


def fork_supported() -> bool:
    """Whether this platform can run the fork server (Linux: ``fork`` and ``/proc``)."""
    return hasattr(os, "fork") and sys.platform.startswith("linux")


# ---------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class ForkPlan:
    """How a forked child runs an argv: the role, the click arguments, and what
    ``sys.argv`` / ``sys.path[0]`` / ``__main__`` would be after an ``exec``."""

    role: str
    args: tuple[str, ...]
    prog_name: str
    #: ``"script"`` (``<bin>/dask scheduler``) or ``"module"`` (``python -m ...``).
    mode: str


def fork_plan(argv: Sequence[str], executable: str) -> ForkPlan | None:
    """The plan for ``argv`` if it is a default command of ``executable``, else None.

    Accepted: ``<dir of executable>/dask scheduler|worker ...`` and
    ``<executable> -m distributed.cli.dask_scheduler|dask_worker ...``.
    """
    argv = list(argv)
    script = os.path.join(os.path.dirname(executable), "dask")
    if len(argv) >= 2 and argv[0] == script and argv[1] in ROLE_MODULES:
        return ForkPlan(argv[1], tuple(argv[2:]), f"dask {argv[1]}", "script")
    if len(argv) >= 3 and argv[0] == executable and argv[1] == "-m":
        for role, module in ROLE_MODULES.items():
            if argv[2] == module:
                return ForkPlan(role, tuple(argv[3:]), f"dask {role}", "module")
    return None


@dataclass(frozen=True)
class SpawnRequest:
    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    log: str

    def encode(self) -> bytes:
        return json.dumps(
            {"argv": list(self.argv), "env": self.env, "cwd": self.cwd, "log": self.log}
        ).encode()


def parse_request(data: bytes) -> SpawnRequest:
    """Decode and validate one request; raises ``ValueError`` with a readable reason."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed request: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("request must be a JSON object")
    argv, env, cwd, log = (obj.get(k) for k in ("argv", "env", "cwd", "log"))
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise ValueError("'argv' must be a non-empty list of strings")
    if not (
        isinstance(env, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    ):
        raise ValueError("'env' must map strings to strings")
    for key, value in (("cwd", cwd), ("log", log)):
        if not (isinstance(value, str) and os.path.isabs(value)):
            raise ValueError(f"'{key}' must be an absolute path")
    bad = [k for k, v in env.items() if not k or "=" in k or "\0" in k or "\0" in v]
    if bad or any("\0" in a for a in argv):
        raise ValueError("NUL or '=' in the environment or arguments")
    return SpawnRequest(tuple(argv), dict(env), cwd, log)


def parse_reply(data: bytes) -> dict[str, Any]:
    """Decode a reply of the fork server; raises ``ForkServerError`` if it is not one."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    if not isinstance(obj, dict):
        raise ForkServerError("fork server sent a malformed reply")
    return obj


# ---------------------------------------------------------------- API side


class ForkServer:
    """The API's handle on a running fork server. Build it with :meth:`start`."""

    def __init__(
        self, process: trio.Process, sock: trio.socket.SocketType, argv: list[str]
    ) -> None:
        self.process = process
        self._sock = sock
        self._lock = trio.Lock()
        self._broken = False
        #: The server's argv: forked children show the same command line.
        self.argv = argv

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self._broken and self.process.poll() is None

    @classmethod
    async def start(
        cls,
        *,
        env: Mapping[str, str],
        cwd: str,
        log_path: str,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        ready_timeout: float = 120.0,
    ) -> ForkServer:
        """Start a fork server and wait until it has imported ``preload``.

        ``env`` is its environment (the backend's inherited variables); the
        :data:`PRE_SPAWN_ENV` defaults are added. Output goes to ``log_path``.
        Raises :class:`ForkServerError` if it exits or is not ready in time.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", __name__, "--fd", str(theirs.fileno())]
        if tuple(preload) != DEFAULT_PRELOAD:
            argv += ["--preload", ",".join(preload)]
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            ours.close()
            theirs.close()
            raise ForkServerError(f"cannot open {log_path}: {exc.strerror}") from None
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd=cwd,
                env={**PRE_SPAWN_ENV, **env},
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise ForkServerError(f"cannot start the fork server: {exc}") from None
        finally:
            os.close(log_fd)
            theirs.close()
        server = cls(process, trio.socket.from_stdlib_socket(ours), argv)
        try:
            with trio.fail_after(ready_timeout):
                hello = parse_reply(await server._sock.recv(MAX_MESSAGE) or b"null")
        except (trio.TooSlowError, OSError, ForkServerError) as exc:
            await server.aclose(timeout=0)
            reason = "not ready in time" if isinstance(exc, trio.TooSlowError) else str(exc)
            raise ForkServerError(f"fork server failed to start: {reason}") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await server.aclose(timeout=0)
            raise
        if hello.get("ready") is not True:
            await server.aclose()
            raise ForkServerError(f"fork server failed to start: {hello.get('error')}")
        return server

    async def spawn(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str, log_path: str
    ) -> int:
        """Fork a child running ``argv``; return its pid. Raises ``ForkServerError``."""
        if not self.alive:
            raise ForkServerError("fork server is not running")
        request = SpawnRequest(tuple(argv), dict(env), cwd, log_path).encode()
        if len(request) > MAX_MESSAGE:
            raise ForkServerError("request too large for the fork server")
        async with self._lock:
            try:
                with trio.fail_after(30):
                    await self._sock.send(request)
                    data = await self._sock.recv(MAX_MESSAGE)
            except (trio.TooSlowError, OSError) as exc:
                self._give_up()
                raise ForkServerError(f"fork server unresponsive: {exc!r}") from None
            except BaseException:
                # Cancelled mid-request: the reply would be read by the next caller.
                self._give_up()
                raise
        if not data:
            self._give_up()
            raise ForkServerError("fork server exited")
        reply = parse_reply(data)
        pid = reply.get("pid")
        if isinstance(pid, int) and pid > 0:
            return pid
        raise ForkServerError(str(reply.get("error") or "fork server refused the request"))

    def _give_up(self) -> None:
        """Out of step with the server: never use it again, and end it (not its children)."""
        self._broken = True
        if self.process.poll() is None:
            self.process.kill()

    async def wait(self) -> int:
        """Wait for the fork server process to exit; return its status."""
        return await self.process.wait()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop the fork server (never its children): it exits when its socket closes;
        after ``timeout`` (at once with ``timeout=0``, e.g. while it is still importing)
        it is killed."""
        self._broken = True
        self._sock.close()
        with trio.move_on_after(timeout) as scope:
            await self.process.wait()
        if scope.cancelled_caught:
            self.process.kill()
            with trio.move_on_after(5):
                await self.process.wait()


# ---------------------------------------------------------------- server side


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _preload(modules: Sequence[str]) -> list[str]:
    """Import ``modules``; return those that failed. The CLI modules must import."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:
            if name in ROLE_MODULES.values():
                raise
            missing.append(name)
    return missing


@dataclass
class _Child:
    """What a freshly forked child needs to become its program."""

    request: SpawnRequest
    plan: ForkPlan
    log_fd: int
    cwd_fd: int


def _send(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.send(json.dumps(obj).encode())


def _fork(sock: socket.socket, request: SpawnRequest) -> _Child | None:
    """Fork for ``request``: in the parent, reply and return None; in the child, return
    what it needs. Errors are replied to the API."""
    plan = fork_plan(request.argv, sys.executable)
    if plan is None:
        _send(sock, {"error": f"not a forkable command: {request.argv[0]}"})
        return None
    threads = _thread_count()
    if threads > 1:
        _send(sock, {"error": f"fork server has {threads} threads; refusing to fork"})
        return None
    try:
        cwd_fd = os.open(request.cwd, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        _send(sock, {"error": f"cannot use directory {request.cwd}: {exc.strerror}"})
        return None
    try:
        log_fd = os.open(request.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as exc:
        os.close(cwd_fd)
        _send(sock, {"error": f"cannot open log file {request.log}: {exc.strerror}"})
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(cwd_fd)
        os.close(log_fd)
        _send(sock, {"error": f"fork failed: {exc.strerror}"})
        return None
    if pid == 0:
        return _Child(request, plan, log_fd, cwd_fd)
    os.close(cwd_fd)
    os.close(log_fd)
    _send(sock, {"pid": pid})
    return None


def serve(sock: socket.socket) -> _Child | None:
    """Answer requests until the API goes away (returns None), or, in a forked child,
    return the child's job (the caller then runs it, outside this loop)."""
    while True:
        try:
            data = sock.recv(MAX_MESSAGE)
        except OSError:
            return None
        if not data:
            return None
        try:
            request = parse_request(data)
        except ValueError as exc:
            _send(sock, {"error": str(exc)})
            continue
        child = _fork(sock, request)
        if child is not None:
            return child


def _set_process_name(name: str, argv: Sequence[str]) -> None:
    """Best effort: make ``ps``/``top`` show this child as what it runs, not as the fork
    server. Sets the kernel's short name (``comm``: ``pgrep dask-worker`` finds it) and
    rewrites the command line in place (truncated to the fork server's own length)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:
        pass
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (proc(5) 48, 49)
        size = end - start
        title = "\0".join(argv).encode()[: size - 1]
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(title + b"\0" * (size - len(title)))
    except (OSError, ValueError, IndexError):
        pass


def _detach_from_nanny(nanny_pid: int) -> None:
    """In a worker process the nanny just forked: start from what a spawned one has.

    The nanny's signal handlers (which only wake the nanny's event loop: the worker would
    ignore SIGTERM) are reset to the defaults, and its network sockets are replaced by
    ``/dev/null`` so the worker does not keep the nanny's connections and listener open.
    Forks made later by the worker itself (``os.getppid() != nanny_pid``) are left alone.
    """
    if os.getppid() != nanny_pid:
        return
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in _inet_socket_fds():
            os.dup2(null, fd)
    finally:
        os.close(null)


def _inet_socket_fds() -> list[int]:
    """The file descriptors of this process that are IPv4/IPv6 sockets."""
    found = []
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for name in names:
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    found.append(fd)
        except OSError:
            continue
    return found


def _become(child: _Child, sock: socket.socket) -> int:
    """In the forked child: turn into the requested program and run it; its exit code."""
    sock.close()
    os.setsid()
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.fchdir(child.cwd_fd)
    os.close(child.cwd_fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(child.log_fd, 1)
    os.dup2(child.log_fd, 2)
    os.close(child.log_fd)

    request, plan = child.request, child.plan
    os.environ.clear()
    os.environ.update(request.env)
    import tempfile

    tempfile.tempdir = None
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
    import multiprocessing

    multiprocessing.current_process().authkey = os.urandom(32)
    _set_process_name(f"dask-{plan.role}", ["dask", plan.role, *plan.args])

    import dask.config

    dask.config.refresh()
    if plan.role == "worker":
        # The nanny is already warm: fork its worker process instead of spawning one.
        dask.config.set({"distributed.worker.multiprocessing-method": "fork"})
        os.register_at_fork(after_in_child=functools.partial(_detach_from_nanny, os.getpid()))

    module = importlib.import_module(ROLE_MODULES[plan.role])
    main_module = sys.modules["__main__"]
    if plan.mode == "script":
        sys.argv = list(request.argv)
        sys.path[0] = os.path.dirname(request.argv[0])
        main_module.__spec__ = None
        main_module.__file__ = request.argv[0]
    else:
        sys.argv = [module.__file__ or request.argv[2], *plan.args]
        sys.path[0] = os.getcwd()
        main_module.__spec__ = module.__spec__
        main_module.__file__ = module.__file__
    try:
        module.main.main(args=list(plan.args), prog_name=plan.prog_name, standalone_mode=True)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The fork server process (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="dask-gateway-fork-server")
    parser.add_argument("--fd", type=int, required=True, help="the API's socket")
    parser.add_argument("--preload", default=",".join(DEFAULT_PRELOAD))
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    # Children are reaped by the kernel; they restore the default in _become.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        missing = _preload([m for m in args.preload.split(",") if m])
    except Exception as exc:
        traceback.print_exc()
        _send(sock, {"ready": False, "error": f"import failed: {exc!r}"})
        return 1
    threads = _thread_count()
    if threads > 1:
        _send(sock, {"ready": False, "error": f"{threads} threads after imports"})
        return 1
    if missing:
        print(f"fork server: not preloaded (unavailable): {', '.join(missing)}", file=sys.stderr)
    try:
        _send(sock, {"ready": True, "pid": os.getpid()})
    except OSError:
        return 0  # the API went away while we were importing
    child = serve(sock)
    if child is None:
        return 0
    try:
        return _become(child, sock)
    except BaseException:
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
