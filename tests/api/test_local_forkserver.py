"""The local backend's fork server: the pure parts, the protocol, and real dask processes.

The real scenario forks a TLS scheduler with the official preload and a worker (nanny +
forked worker process) from a warm fork server, and checks that each behaves like the
exec'd program would: exact environment, own session, working directory, log file, no
inherited network sockets, SIGTERM honoured, the nanny restarting a killed worker process.
Then it kills the fork server and checks that the backend falls back to exec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from dask_gateway_api.backends import ClusterLaunch
from dask_gateway_api.backends.forkserver import (
    ForkPlan,
    ForkServer,
    ForkServerError,
    fork_plan,
    parse_reply,
    parse_request,
)
from dask_gateway_api.backends.local import (
    open_local_backend,
    process_environment,
    same_process_alive,
)
from dask_gateway_common.tls import generate_cluster_credentials

BIN = os.path.dirname(sys.executable)
DASK = os.path.join(BIN, "dask")

# ---------------------------------------------------------------- pure


def test_fork_plan_accepts_only_the_default_commands_of_this_interpreter() -> None:
    exe = sys.executable
    assert fork_plan([DASK, "scheduler", "--port", "0"], exe) == ForkPlan(
        "scheduler", ("--port", "0"), "dask scheduler", "script"
    )
    assert fork_plan([DASK, "worker", "tls://h:1"], exe) == ForkPlan(
        "worker", ("tls://h:1",), "dask worker", "script"
    )
    assert fork_plan([exe, "-m", "distributed.cli.dask_worker", "x"], exe) == ForkPlan(
        "worker", ("x",), "dask worker", "module"
    )
    assert fork_plan([exe, "-m", "distributed.cli.dask_scheduler"], exe) == ForkPlan(
        "scheduler", (), "dask scheduler", "module"
    )
    for argv in (
        ["dask", "scheduler"],  # unresolved name
        ["/other/venv/bin/dask", "scheduler"],
        [DASK, "cuda-worker"],
        [DASK],
        ["/usr/bin/python3", "-m", "distributed.cli.dask_worker"],
        [exe, "-m", "distributed.cli.dask_ssh"],
        [exe, "-c", "pass"],
        [],
    ):
        assert fork_plan(argv, exe) is None, argv


def test_parse_request_validates_every_field() -> None:
    good = {"argv": [DASK, "worker"], "env": {"A": "1"}, "cwd": "/tmp", "log": "/tmp/x.log"}
    request = parse_request(json.dumps(good).encode())
    assert request.argv == (DASK, "worker") and request.env == {"A": "1"}
    bad_cases = [
        (b"\xff", "malformed"),
        (b"{", "malformed"),
        (b"[]", "JSON object"),
        (json.dumps({**good, "argv": []}).encode(), "argv"),
        (json.dumps({**good, "argv": [1]}).encode(), "argv"),
        (json.dumps({**good, "env": {"A": 1}}).encode(), "env"),
        (json.dumps({**good, "env": []}).encode(), "env"),
        (json.dumps({**good, "cwd": "relative"}).encode(), "cwd"),
        (json.dumps({**good, "log": None}).encode(), "log"),
        (json.dumps({**good, "env": {"A=B": "1"}}).encode(), "NUL or '='"),
        (json.dumps({**good, "env": {"A": "x\0y"}}).encode(), "NUL or '='"),
        (json.dumps({**good, "argv": [DASK, "a\0b"]}).encode(), "NUL or '='"),
    ]
    for data, message in bad_cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_request(data)


def test_parse_reply() -> None:
    assert parse_reply(b'{"pid": 5}') == {"pid": 5}
    for data in (b"", b"null", b"[1]", b"\xff", b"{"):
        with pytest.raises(ForkServerError, match="malformed reply"):
            parse_reply(data)


# ---------------------------------------------------------------- protocol (cheap server)


async def test_protocol_errors_leave_the_server_serving(tmp_path: Path) -> None:
    with trio.fail_after(60):
        # Nothing to preload: ready at once; requests that fail never fork.
        server = await ForkServer.start(
            env={"PATH": os.environ.get("PATH", "")},
            cwd=str(tmp_path),
            log_path=str(tmp_path / "fs.log"),
            preload=("json",),
        )
        try:
            assert server.alive and server.argv[:3] == [
                sys.executable,
                "-m",
                "dask_gateway_api.backends.forkserver",
            ]
            log = str(tmp_path / "x.log")
            with pytest.raises(ForkServerError, match="not a forkable command"):
                await server.spawn(["/bin/sleep", "10"], {}, str(tmp_path), log)
            with pytest.raises(ForkServerError, match="cannot use directory"):
                await server.spawn([DASK, "scheduler"], {}, str(tmp_path / "nope"), log)
            with pytest.raises(ForkServerError, match="cannot open log file"):
                await server.spawn(
                    [DASK, "scheduler"], {}, str(tmp_path), str(tmp_path / "no" / "x.log")
                )
            with pytest.raises(ForkServerError, match="too large"):
                await server.spawn([DASK, "scheduler"], {"A": "x" * (1 << 20)}, "/", log)
            # A malformed request straight on the socket: an error reply, not a crash.
            async with server._lock:
                await server._sock.send(b"not json")
                assert "malformed" in parse_reply(await server._sock.recv(1 << 16))["error"]
            with pytest.raises(ForkServerError, match="not a forkable command"):
                await server.spawn(["/bin/true"], {}, str(tmp_path), log)
            assert server.alive
        finally:
            await server.aclose()
        # Closing our end makes it exit on its own (status 0).
        assert server.process.returncode == 0
        with pytest.raises(ForkServerError, match="not running"):
            await server.spawn([DASK, "scheduler"], {}, str(tmp_path), log)


async def test_start_failure_is_a_fork_server_error(tmp_path: Path) -> None:
    with trio.fail_after(30):
        with pytest.raises(ForkServerError, match="not ready in time"):
            await ForkServer.start(
                env={},
                cwd=str(tmp_path),
                log_path=str(tmp_path / "fs.log"),
                ready_timeout=0.001,
            )
        with pytest.raises(ForkServerError, match="cannot open"):
            await ForkServer.start(
                env={}, cwd=str(tmp_path), log_path=str(tmp_path / "no" / "fs.log")
            )


# ---------------------------------------------------------------- real dask processes


def make_launch(name: str, **kw: object) -> ClusterLaunch:
    cert, key = generate_cluster_credentials(name, key_type="ec")
    base: dict[str, object] = dict(
        name=name,
        username="alice",
        # Nobody listens here: the preload's heartbeats fail and are retried, harmlessly.
        api_url="http://127.0.0.1:9/api",
        token="tok-" + name,
        tls_cert=cert,
        tls_key=key,
        scheduler_cmd=("dask", "scheduler"),
        worker_cmd=("dask", "worker"),
        worker_threads=1,
        worker_memory=512 * 2**20,
    )
    base.update(kw)
    return ClusterLaunch(**base)  # type: ignore[arg-type]


async def wait_for_log(path: Path, pattern: str, count: int = 1) -> re.Match[str]:
    """Wait (the caller holds the deadline) until ``pattern`` occurs ``count`` times."""
    while True:
        try:
            text = await trio.Path(path).read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        matches = list(re.finditer(pattern, text))
        if len(matches) >= count:
            return matches[count - 1]
        await trio.sleep(0.05)


def proc_file(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


def introspect(address: str, certs: Path) -> dict[str, object]:
    """Ask the running scheduler and worker about themselves (a dask client, TLS)."""
    import numpy
    from distributed import Client
    from distributed.security import Security

    cert, key = str(certs / "dask.crt"), str(certs / "dask.pem")
    security = Security(
        tls_ca_file=cert, tls_client_cert=cert, tls_client_key=key, require_encryption=True
    )

    def state() -> dict[str, object]:
        import multiprocessing

        import dask

        return {
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "argv": list(sys.argv),
            "ca": dask.config.get("distributed.comm.tls.ca-file"),
            "random": numpy.random.randint(1 << 62),
            "authkey": multiprocessing.current_process().authkey.hex(),
        }

    with Client(address, security=security, timeout=30) as client:
        workers = client.run(state)
        return {
            "scheduler": client.run_on_scheduler(state),
            "worker": next(iter(workers.values())),
            "result": client.submit(lambda x: x + 1, 41).result(timeout=30),
        }


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                out.append(int(entry))
    return out


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def listening_inode(port: int) -> str:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                return fields[9]
    raise AssertionError(f"nothing listens on port {port}")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in "ZX"


async def test_forked_scheduler_and_worker_behave_like_execd_ones(tmp_path: Path) -> None:
    root = tmp_path / "clusters"
    started: list[dict] = []  # states of process group leaders, killed whatever happens
    try:
        with trio.fail_after(150):
            async with (
                open_local_backend(root, stop_grace=5, fork_server=False) as backend,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(backend.run_fork_server)
                server = backend.fork_server
                assert server is not None

                launch = make_launch("forked1")
                sched = await backend.start_scheduler(launch)
                assert sched["forked"] is True
                pid = sched["pid"]
                started.append(sched)
                workdir = root / "forked1"
                slog = workdir / "logs" / "scheduler.log"
                address = (await wait_for_log(slog, r"Scheduler at:\s+(tls://\S+)")).group(1)

                # Exactly the environment an exec'd scheduler gets, in its own session and
                # working directory, a child of the fork server, watched by identity.
                certs = workdir / ".certs"
                expected = process_environment(
                    launch,
                    role="scheduler",
                    cert_path=str(certs / "dask.crt"),
                    key_path=str(certs / "dask.pem"),
                    token_path=str(certs / "api-token"),
                    parent_env=os.environ,
                )
                assert os.getsid(pid) == pid
                assert os.readlink(f"/proc/{pid}/cwd") == str(workdir)
                assert pid in children_of(server.pid)
                assert proc_file(pid, "comm").strip() == b"dask-scheduler"
                assert proc_file(pid, "cmdline").startswith(b"dask\0scheduler\0--protocol\0tls")
                assert os.readlink(f"/proc/{pid}/fd/1") == str(slog)
                assert backend.is_alive(sched) and same_process_alive(sched)
                assert not same_process_alive(dict(sched, starttime=sched["starttime"] + 1))
                # The official preload ran with the gateway's flags.
                await wait_for_log(slog, r"dask_gateway.scheduler_preload")

                # A worker: forked nanny, which forks its worker process.
                wlaunch = dataclasses.replace(launch, scheduler_address=address)
                worker = await backend.start_worker(wlaunch, "w1")
                assert worker["forked"] is True
                nanny = worker["pid"]
                started.append(worker)
                wlog = workdir / "logs" / "worker-w1.log"
                await wait_for_log(wlog, r"Registered to:\s+" + re.escape(address))
                nanny_port = int(
                    (await wait_for_log(wlog, r"Start Nanny at: 'tls://[\d.]+:(\d+)'"))[1]
                )
                (child,) = children_of(nanny)
                # Forked, not spawned (a spawned one runs "python -c from multiprocessing..."):
                # it has the nanny's command line.
                assert proc_file(child, "cmdline").startswith(b"dask\0worker\0tls://")
                assert listening_inode(nanny_port) not in socket_inodes(child)

                # What the processes see: the request's environment and configuration.
                seen = await trio.to_thread.run_sync(introspect, address, certs)
                assert seen["result"] == 42
                sched_seen, worker_seen = seen["scheduler"], seen["worker"]
                # (dask's CLI itself adds __DASK_PARENT_PID, exec'd or not)
                assert sched_seen["env"] == {**expected, "__DASK_PARENT_PID": str(pid)}
                assert sched_seen["cwd"] == str(workdir)
                assert sched_seen["argv"][:2] == [os.path.join(BIN, "dask"), "scheduler"]
                assert sched_seen["ca"] == str(certs / "dask.crt")
                wenv = worker_seen["env"]
                assert wenv["DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"] == str(certs / "dask.pem")
                assert "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY" not in wenv
                assert wenv["OMP_NUM_THREADS"] == "1"  # the nanny's pre-spawn environment
                assert worker_seen["random"] != sched_seen["random"]  # numpy reseeded
                assert worker_seen["authkey"] != sched_seen["authkey"]

                # Restart semantics: the worker process honours SIGTERM and the nanny
                # starts a new one, which registers again.
                os.kill(child, signal.SIGTERM)
                await wait_for_log(wlog, r"Registered to:", count=2)
                (new_child,) = children_of(nanny)
                assert new_child != child

                # The fork server goes away: workers are exec'd instead.
                os.kill(server.pid, signal.SIGKILL)
                worker2 = await backend.start_worker(wlaunch, "w2")
                started.append(worker2)
                assert "forked" not in worker2
                await wait_for_log(workdir / "logs" / "worker-w2.log", r"Registered to:")

                await backend.stop_cluster("forked1", sched, {"w1": worker, "w2": worker2})
                for p in (pid, nanny, new_child, worker2["pid"]):
                    assert gone(p), p
                nursery.cancel_scope.cancel()
    finally:
        for state in started:
            if same_process_alive(state):
                with contextlib.suppress(OSError):
                    os.killpg(state["pid"], signal.SIGKILL)


def test_socket_helper_sees_only_inet_sockets() -> None:
    from dask_gateway_api.backends.forkserver import _inet_socket_fds

    a, b = socket.socketpair()
    tcp = socket.socket()
    try:
        fds = _inet_socket_fds()
        assert tcp.fileno() in fds
        assert a.fileno() not in fds and b.fileno() not in fds
    finally:
        for s in (a, b, tcp):
            s.close()


def processes_in(directory: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == str(directory):
                    found.append(int(entry))
            except OSError:
                continue
    return found


async def test_closing_the_backend_while_the_fork_server_imports(tmp_path: Path) -> None:
    root = (tmp_path / "clusters").resolve()
    with trio.fail_after(30):
        async with open_local_backend(root) as backend:
            # The fork server is starting: its process exists, it has not said ready.
            # (Popen runs in a worker thread, so wait for the process to appear; the
            # enclosing fail_after bounds the wait.)
            while not processes_in(root):  # noqa: ASYNC110 - no event for "spawned"
                await trio.sleep(0.005)
            assert backend.fork_server is None
            start = trio.current_time()
        # It is killed at once, not waited for until its imports are done.
        assert trio.current_time() - start < 3
        assert not processes_in(root)
