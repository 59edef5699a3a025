"""Wiring of the scheduler proxy process: settings, feed, admin, listener, workers, signals.

Theory of operation
-------------------
One root nursery holds the route feed client, the admin endpoint (parent only) and, with
``--workers N``, one supervisor task per extra worker process. The listener opens only
after the first complete route sync, so a connection is never refused for lack of routes.

``--workers N`` runs N processes on one port: this process binds with ``SO_REUSEPORT``
and the kernel spreads new connections over it and N-1 child processes
(``python -m dask_gateway_scheduler_proxy`` with the same settings, the concrete port,
the token in the environment). Each child follows the feed on its own and serves no admin
endpoint. Children live in their own session so a terminal's Ctrl-C reaches only the
parent, which forwards the stop; and each child holds the read end of a pipe whose write
end only the parent has: when the parent dies in any way (even SIGKILL) the pipe reports
EOF and the child stops. A child that crashes (non-zero exit) is restarted after a pause.

Stopping: the first SIGTERM/SIGINT stops accepting, forwards SIGTERM to the children and
lets open connections finish for ``shutdown_grace`` seconds, then everything is cancelled;
a second signal cancels at once.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from dask_gateway_common.admin import serve_admin
from dask_gateway_common.feed_client import RouteFeedClient
from dask_gateway_common.logs import setup_logging
from dask_gateway_common.metrics import ProxyMetrics, new_registry
from dask_gateway_common.routes import RouteTable

from .config import PROG, TOKEN_ENV, ProxySettings, SettingsError, load_settings
from .proxy import serve_scheduler_proxy

__all__ = ["PARENT_FD_ENV", "SHUTDOWN_GRACE", "Running", "StartupError", "main", "run"]

log = logging.getLogger("dask_gateway.scheduler_proxy")

#: Set in a worker child's environment: the fd of its parent-liveness pipe.
PARENT_FD_ENV = "DASK_GATEWAY_SCHEDULER_PROXY_PARENT_FD"
SHUTDOWN_GRACE = 5.0
RESTART_DELAY = 1.0


class StartupError(Exception):
    """The process cannot start serving (e.g. its address is taken); the message says why."""


def _find_startup_error(exc: BaseException) -> StartupError | None:
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_startup_error(inner)
            if found is not None:
                return found
    return None


async def _start_or_explain(nursery: trio.Nursery, what: str, fn: Callable[..., Any]) -> Any:
    """``nursery.start(fn)``, turning a bind failure into a StartupError naming ``what``."""
    try:
        return await nursery.start(fn)
    except OSError as exc:
        raise StartupError(f"cannot listen on {what}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Running:
    """What ``run`` reports once it serves."""

    port: int
    admin_port: int | None


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def child_argv(settings: ProxySettings, port: int) -> list[str]:
    """The command line of a worker child: the same settings on the concrete port."""
    argv = [
        sys.executable,
        "-m",
        "dask_gateway_scheduler_proxy",
        "--address",
        format_host_port(settings.address[0], port),
        "--api-url",
        settings.api_url,
        "--log-level",
        settings.log_level,
        "--hello-timeout",
        repr(settings.hello_timeout),
        "--connect-timeout",
        repr(settings.connect_timeout),
    ]
    if settings.http_forward is not None:
        argv += ["--http-forward", format_host_port(*settings.http_forward)]
    return argv


class _Stopper:
    """First request: graceful stop once serving (immediate before); second: immediate."""

    def __init__(self, root: trio.CancelScope, stop: trio.Event) -> None:
        self.root = root
        self.stop = stop
        self.serving = False

    def request(self, why: str) -> None:
        if self.serving and not self.stop.is_set():
            log.info("%s: stopping gracefully (again to stop now)", why)
            self.stop.set()
        else:
            log.info("%s: stopping now", why)
            self.root.cancel()


async def _watch_signals(stopper: _Stopper) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            stopper.request(signal.Signals(signum).name)


async def _watch_parent(fd: int, stopper: _Stopper) -> None:
    """Stop when the parent's end of the liveness pipe closes (the parent is gone)."""
    await trio.lowlevel.wait_readable(fd)
    stopper.request("parent process exited")


class _Workers:
    """Supervises the worker children of a ``--workers N`` parent."""

    def __init__(self, argv: list[str], env: Mapping[str, str], parent_fd: int) -> None:
        self.argv = argv
        self.env = dict(env)
        self.parent_fd = parent_fd
        self.stopping = False
        self.processes: dict[int, trio.Process] = {}
        self._changed = trio.Event()

    async def supervise(self, index: int) -> None:
        while not self.stopping:
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    functools.partial(
                        trio.run_process,
                        self.argv,
                        env=self.env,
                        check=False,
                        stdin=subprocess.DEVNULL,
                        pass_fds=(self.parent_fd,),
                        start_new_session=True,
                    )
                )
                self.processes[index] = process
                log.info("Started worker process %d (pid %d)", index, process.pid)
            del self.processes[index]
            self._notify()
            code = process.returncode
            if self.stopping or code == 0:
                return
            log.error("Worker process %d exited with %s; restarting", index, code)
            await trio.sleep(RESTART_DELAY)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def terminate(self) -> None:
        self.stopping = True
        for process in list(self.processes.values()):
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    async def wait_exited(self) -> None:
        while self.processes:
            await self._changed.wait()


async def run(
    settings: ProxySettings,
    *,
    parent_fd: int | None = None,
    handle_signals: bool = True,
    stop: trio.Event | None = None,
    shutdown_grace: float = SHUTDOWN_GRACE,
    feed_client_options: Mapping[str, object] | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one proxy process until stopped (a signal, ``stop`` being set, or its parent's
    exit when ``parent_fd`` is given, which also makes this a worker child)."""
    is_child = parent_fd is not None
    stop = trio.Event() if stop is None else stop
    table = RouteTable()
    registry = new_registry()
    metrics = ProxyMetrics(registry)
    feed = RouteFeedClient(
        settings.api_url,
        settings.token,
        table,
        kinds={"SNI"},
        **dict(feed_client_options or {}),  # type: ignore[arg-type]
    )
    workers: _Workers | None = None
    liveness: tuple[int, int] | None = None  # parent-liveness pipe (read end, write end)
    try:
        async with trio.open_nursery() as root:
            stopper = _Stopper(root.cancel_scope, stop)
            if handle_signals:
                root.start_soon(_watch_signals, stopper)
            if parent_fd is not None:
                root.start_soon(_watch_parent, parent_fd, stopper)
            await root.start(feed.run)
            admin_port = None
            if not is_child:
                host, port = settings.admin_address
                _, admin_port = await _start_or_explain(
                    root,
                    f"--admin-address {format_host_port(host, port)}",
                    functools.partial(
                        serve_admin, host, port, table=table, feed=feed,
                        token=settings.token, registry=registry,
                    ),
                )  # fmt: skip
                log.info("Admin endpoint on http://%s", format_host_port(host, admin_port))
            await feed.synced.wait()

            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accept:
                    port = await _start_or_explain(
                        accept,
                        f"--address {format_host_port(*settings.address)}",
                        functools.partial(
                            serve_scheduler_proxy, settings, table, metrics,
                            reuse_port=is_child or settings.workers > 1,
                            handler_nursery=connections,
                        ),
                    )  # fmt: skip
                    if settings.workers > 1 and not is_child:
                        liveness = os.pipe()
                        env = {**os.environ, TOKEN_ENV: settings.token}
                        env[PARENT_FD_ENV] = str(liveness[0])
                        workers = _Workers(child_argv(settings, port), env, liveness[0])
                        for index in range(1, settings.workers):
                            root.start_soon(workers.supervise, index)
                    stopper.serving = True
                    task_status.started(Running(port, admin_port))
                    await stop.wait()
                    if workers is not None:
                        workers.terminate()
                    accept.cancel_scope.cancel()
                log.info("Draining open connections for up to %gs", shutdown_grace)
                connections.cancel_scope.deadline = trio.current_time() + shutdown_grace
            if workers is not None:
                with trio.move_on_after(shutdown_grace + 1.0):
                    await workers.wait_exited()
            root.cancel_scope.cancel()
    finally:
        if liveness is not None:
            os.close(liveness[0])
            os.close(liveness[1])
    log.info("Scheduler proxy stopped")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Console script ``dask-gateway-scheduler-proxy``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env
    try:
        settings = load_settings(argv, env)
    except SettingsError as exc:
        print(f"{PROG}: invalid settings:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        print(f"Run '{PROG} --help' for usage.", file=sys.stderr)
        return 2
    parent_fd = None
    if env.get(PARENT_FD_ENV):
        try:
            parent_fd = int(env[PARENT_FD_ENV])
            os.fstat(parent_fd)
        except (ValueError, OSError):
            print(f"{PROG}: {PARENT_FD_ENV} does not name an open fd", file=sys.stderr)
            return 2
    setup_logging(settings.log_level)
    try:
        trio.run(functools.partial(run, settings, parent_fd=parent_fd))
    except BaseException as exc:
        error = _find_startup_error(exc)
        if error is None:
            raise
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    return 0
